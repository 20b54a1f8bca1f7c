//! The fedtune site agent: everything that runs inside a hospital, next to its data.
//!
//! # Layout
//! - [`train`]: slices in memory, the training loop (train from scratch or fine-tune the last k
//!   layers), and the frozen-prefix cache.
//! - [`evaluate`]: whole-volume prediction at the original grid, and per-case Dice and HD95.
//! - [`experiment`]: the published three-arm experiment (Model_S, Model_T, Model_ST) on one machine.
//! - [`bench`]: training and inference throughput on this machine.
//! - [`dicom`]: DICOM CT series and RTSTRUCT in (`import-dicom`), predicted contours out as an
//!   RTSTRUCT.
//! - [`commands`]: what each `site-agent` subcommand does; `main.rs` only parses flags.
//!
//! # Invariants
//! Training is synchronous, CPU-bound code; async callers run it on a blocking thread.
//! Case identifiers and file names stay in this process: results are keyed by case index.

pub mod agent;
pub mod bench;
pub mod commands;
pub mod dicom;
pub mod evaluate;
pub mod experiment;
pub mod progress;
pub mod train;
