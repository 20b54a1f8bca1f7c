//! The fedtune wire protocol, package `fedtune.v1` (`proto/fedtune/v1/fedtune.proto`).
//!
//! The code is generated at build time by `build.rs` with protox, a pure-Rust proto compiler,
//! so a fresh machine needs no system `protoc`.
//!
//! # Layout
//! - [`pb`]: the messages and the tonic clients and servers of `SiteService` and
//!   `AdminService`.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection and for the
//!   test that checks what the messages can carry.
//! - [`limits`]: sizes both ends agree on.
//! - [`codec`]: prost encoding, with requests that do not decode answered as INVALID_ARGUMENT.

pub mod codec;

/// The protocol package name every message and service lives in.
pub const PACKAGE: &str = "fedtune.v1";

/// Request metadata on every site call: the sequence number of the newest entry of the
/// agent's audit log when the call was made (see `GetAuditAnchor`).
pub const AUDIT_SEQ_HEADER: &str = "x-fedtune-audit-seq";
/// Request metadata on every site call: that entry's hash, 64 hex digits.
pub const AUDIT_HEAD_HEADER: &str = "x-fedtune-audit-head";

mod generated {
    #![allow(clippy::all, clippy::pedantic, unreachable_pub, missing_debug_implementations)]
    #![allow(rust_2018_idioms)]
    #[rustfmt::skip]
    pub mod fedtune_v1 {
        include!(concat!(env!("OUT_DIR"), "/fedtune.v1.rs"));
        include!(concat!(env!("OUT_DIR"), "/fedtune.v1.serde.rs"));
    }
}

/// The generated messages and services.
pub mod pb {
    pub use crate::generated::fedtune_v1::*;
}

/// The encoded `FileDescriptorSet` of the protocol.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fedtune_v1_descriptor.bin"));

/// The gRPC paths of the methods whose request is a stream (uploads of weights). The test
/// over the descriptors checks this list against the .proto.
pub const CLIENT_STREAMING_METHODS: &[&str] =
    &["/fedtune.v1.SiteService/UploadModel", "/fedtune.v1.AdminService/PushModel"];

/// Sizes both ends agree on.
pub mod limits {
    /// Largest weights chunk in `ModelChunk` and `PushModelRequest`.
    pub const CHUNK_BYTES: usize = 1 << 20;
    /// Largest encoded message either end decodes: a chunk plus its framing, or a result of
    /// many organs times many cases (a few hundred bytes per case and organ).
    pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
    /// Largest model the coordinator accepts.
    pub const MAX_MODEL_BYTES: u64 = 2 << 30;
}
