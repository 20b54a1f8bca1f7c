//! The fedtune coordinator: models, sites, studies, rounds and reports.
//!
//! The coordinator is the part of fedtune that runs outside the hospitals: a gRPC server with
//! its state in sled, and the study lead's command line.
//!
//! # Layout
//! - [`pki`]: the consortium CA and the bundles it issues (rcgen).
//! - [`identity`]: the role and name a client certificate carries.
//! - [`metrics`]: the Prometheus registry, the RPC-counting layer and the HTTP endpoint.
//! - [`ops`]: the commands run on the server's machine beside `serve`: `doctor`, `restore`.
//! - [`backup`]: archives of the state and blobs, and restoring a data dir from one.
//! - [`store`]: records in sled; [`rounds`]: the round and task state machine, pure.
//! - [`service`]: `SiteService` and `AdminService`; [`server`]: configuration, health,
//!   reflection, call deadlines and the lease ticker; [`listener`]: the accept loop (mutual
//!   TLS, handshake deadline, connection cap); [`cli`]: the `coordinator` command line.
//! - [`templates`]: the transfer study's arms; [`report`]: statistics, tables and plots from
//!   a study's results; [`demo`]: the whole study on phantoms, as real processes.
//!
//! # Invariants
//! The coordinator never receives images, labels, contours, file names or case identifiers:
//! only metrics keyed by case index, progress, and weights where a site's policy allows.
//! Identity and role come from the client certificate, never from a request field.

pub mod backup;
pub mod identity;
pub mod lead;
pub mod metrics;
pub mod ops;
pub mod pki;
pub mod report;
pub mod rounds;
pub mod server;
pub mod service;
pub mod store;

pub use proto::PACKAGE;
