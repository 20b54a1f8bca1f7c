//! The fedtune site agent: everything that runs inside a hospital, next to its data.
//!
//! # Layout
//! The engine:
//! - [`model`]: the 2D residual encoder-decoder as an explicit ordered list of named layers, its
//!   CPU ops (and cuDNN with the `cuda` feature), the loss and the optimiser.
//! - [`data`]: volumes, NIfTI-1 reading and writing, site manifests, validation, axial slicing,
//!   and the phantom centers generator.
//! - [`weights`]: writing a network into a weights file and loading it onto a device.
//! - [`device`]: `--device auto|cpu|cuda[:N]`, checked against the build and the machine.
//! - [`train`]: slices in memory, the training loop (train from scratch or fine-tune the last k
//!   layers), and the frozen-prefix cache.
//! - [`evaluate`]: whole-volume prediction at the original grid, and per-case Dice and HD95.
//! - [`experiment`]: the published three-arm experiment (Model_S, Model_T, Model_ST) on one machine.
//! - [`bench`]: training and inference throughput on this machine.
//! - [`memory`]: how long the allocator keeps freed pages (reused between training steps).
//! - [`dicom`]: DICOM CT series and RTSTRUCT in (`import-dicom`), predicted contours out as an
//!   RTSTRUCT.
//!
//! The agent and the program:
//! - [`agent`]: the connection loop, task executor, policy and audit log.
//! - [`commands`]: what each `site-agent` subcommand does; `main.rs` only parses flags.
//!
//! # Invariants
//! Training is synchronous, CPU-bound code; async callers run it on a blocking thread.
//! Case identifiers and file names stay in this process: results are keyed by case index.

pub mod agent;
pub mod bench;
pub mod commands;
pub mod data;
pub mod device;
pub mod dicom;
pub mod evaluate;
pub mod experiment;
pub mod memory;
pub mod model;
pub mod progress;
pub mod simulate;
pub mod train;
pub mod weights;
