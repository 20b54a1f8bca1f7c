//! Whole-system tests: the real binaries, run as an operator would.

mod audit_anchor;
mod authz;
mod cli;
mod demo;
mod diagnosis;
mod disk;
mod faults;
mod federated;
mod federation;
mod hospital;
mod hostile_rpc;
mod operations;
mod policy;
mod preflight;
mod refusals;
mod revocation;
mod scale;
mod stalled;
mod stock_clients;
