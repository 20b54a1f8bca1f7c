//! The fedtune wire protocol, package `fedtune.v1`.
//!
//! This crate will hold `proto/fedtune/v1/*.proto` and the tonic/prost code generated from them
//! (with a pure-Rust proto compiler, so no system `protoc` is needed). The local engine has no
//! network yet, so nothing is defined here; the crate exists so that the dependency direction
//! of the workspace (`coordinator` and `site-agent` depend on `proto` and `shared`, never on each
//! other) is fixed from the start.

/// The protocol package name every message and service lives in.
pub const PACKAGE: &str = "fedtune.v1";
