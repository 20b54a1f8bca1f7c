//! What the coordinator and every site agent must agree on.
//!
//! # Layout
//! - [`organs`]: the organ label map (label value -> organ name) that a dataset and a model share.
//! - [`structures`]: the organs fedtune knows, their TG-263 names, and clinical structure names
//!   (aliases and a center's own) mapped to them.
//! - [`architecture`]: a model's configuration as data: presets, the layer list, the input spec.
//! - [`weights`]: the manifest in a weights file's safetensors header, read without tensors.
//! - [`metrics`]: Dice, HD95 and the paired statistics used by every report.
//! - [`cert`]: reading a party's own certificate, and UTC times as people read them.
//! - [`cli`]: the logging flags, exit codes and tracing set-up both binaries share.
//!
//! # Invariants
//! This crate has no async runtime, no network, no database and no training stack: it never
//! depends on tokio, tonic, sled, candle or an image format. The engine (model, ops, data,
//! phantoms) is the site agent's.
//! Nothing in here sends anything anywhere; it only computes.

pub mod architecture;
pub mod cert;
pub mod cli;
pub mod metrics;
pub mod organs;
pub mod structures;
pub mod weights;
