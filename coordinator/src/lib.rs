//! The fedtune coordinator: models, sites, studies, rounds and reports.
//!
//! The coordinator is the part of fedtune that runs outside the hospitals: a gRPC server with
//! its state in sled, and the study lead's command line. Its first job is to carry the local
//! engine's experiment (see the `site-agent` crate) to many sites; until the federation exists
//! it has no binary, so that no command pretends to work.
//!
//! # Invariants
//! The coordinator never receives images, labels, contours, file names or case identifiers:
//! only metrics keyed by case index, progress, and weights where a site's policy allows.

pub use proto::PACKAGE;
