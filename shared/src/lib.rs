//! What the coordinator and every site agent must agree on.
//!
//! # Layout
//! - [`organs`]: the organ label map (label value -> organ name) that a dataset and a model share.
//! - [`structures`]: the organs fedtune knows, their TG-263 names, and clinical structure names
//!   (aliases and a center's own) mapped to them.
//! - [`data`]: volumes, NIfTI-1 reading and writing, site manifests, validation, axial slicing,
//!   and the phantom centers generator.
//! - [`model`]: the 2D residual encoder-decoder as an explicit ordered list of named layers,
//!   the loss, and the frozen-prefix split.
//! - [`weights`]: safetensors files whose `__metadata__` carries the model manifest.
//! - [`metrics`]: Dice, HD95 and the paired statistics used by every report.
//! - [`device`]: `--device auto|cpu|cuda[:N]`, checked against the build and the machine.
//! - [`cli`]: the logging flags, exit codes and tracing set-up both binaries share.
//!
//! # Invariants
//! This crate has no async runtime, no network and no database: it never depends on tokio,
//! tonic or sled.
//! Nothing in here sends anything anywhere; it only computes.

pub mod cert;
pub mod cli;
pub mod data;
pub mod device;
pub mod metrics;
pub mod model;
pub mod organs;
pub mod structures;
pub mod weights;
