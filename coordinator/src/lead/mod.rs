//! The study lead's side: the `coordinator` command line (`serve` aside, which the binary hands
//! to the server), the PKI commands, and the commands that talk to a running coordinator
//! over gRPC with an admin bundle; the printing; the demo.
//!
//! - [`args`]: the command line; [`client`]: the admin channel and the typed [`AdminClient`];
//!   `commands`: what each command does; `pki`: the CA's commands; `show` and [`watch`]: the
//!   printing and following of rounds; [`templates`]: the transfer study's task specs;
//!   [`demo`]: the whole study on phantoms, as processes.
//!
//! This module talks to the coordinator only through the gRPC API: it never imports
//! `server`, `service` or `store`.

pub mod args;
pub mod client;
mod commands;
pub mod demo;
mod ops;
mod pki;
mod show;
pub mod templates;
mod watch;

pub use args::{
    Cli, Command, Conn, ModelCommand, PkiCommand, RoundCommand, SiteCommand, StudyCommand, TaskArg,
};
pub use client::{AdminClient, connect, push_model};
pub use commands::{RoundNotCompleted, run_admin};
pub use show::{last_seen, results_json, round_line, round_state};
pub use watch::{WATCH_RECONNECT_SECONDS, watch};

/// Prints a line of command output on stdout.
fn out(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// A call the coordinator answered with an error status: shown as `Code: message`, and kept
/// whole so that callers (scripts, tests) can read its code with `downcast_ref`.
#[derive(Debug, thiserror::Error)]
#[error("{:?}: {}", .0.code(), .0.message())]
pub struct CallFailed(pub tonic::Status);

fn status(e: tonic::Status) -> anyhow::Error {
    CallFailed(e).into()
}
