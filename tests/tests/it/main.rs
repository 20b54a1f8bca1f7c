//! Whole-system tests: the real binaries, run as an operator would.

mod cli;
mod demo;
mod federation;
