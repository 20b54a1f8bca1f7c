//! The coordinator's configuration file and its binary's command line.
//!
//! (This integration test also makes `cargo test --workspace` build the `coordinator` binary,
//! which the whole-system tests in `tests/` run.)

mod browser;
mod report;
use std::path::Path;

use coordinator::server::ServerConfig;

const GOOD: &str = r#"
version = 1
[tls]
cert = "pki/server/cert.pem"
key = "pki/server/key.pem"
client_ca = "/etc/fedtune/ca.pem"
"#;

#[test]
fn defaults_and_relative_paths() {
    let cfg = ServerConfig::parse(GOOD, Path::new("/srv/fedtune/coordinator.toml")).expect("valid");
    assert_eq!(cfg.listen, "127.0.0.1:7443");
    assert_eq!(cfg.data_dir, Path::new("/srv/fedtune/coordinator-data"));
    assert_eq!(cfg.tls.cert, Path::new("/srv/fedtune/pki/server/cert.pem"));
    assert_eq!(cfg.tls.client_ca, Path::new("/etc/fedtune/ca.pem"), "absolute paths stay");
    assert_eq!(cfg.tls.crl, None);
    assert_eq!(cfg.limits.lease_seconds, 120);
    assert_eq!(cfg.limits.max_attempts, 3);
    assert_eq!(cfg.limits.handshake_seconds, 10);
    assert_eq!(cfg.limits.max_connections, 256);
    assert_eq!(cfg.limits.idle_seconds, 60);
    assert_eq!(cfg.limits.keepalive_seconds, 30);
}

/// What the tests write with `toml::to_string` reads back the same.
#[test]
fn a_written_configuration_reads_back() {
    let cfg = ServerConfig::parse(GOOD, Path::new("/srv/fedtune/coordinator.toml")).expect("valid");
    let text = toml::to_string(&cfg).expect("serialize");
    let again = ServerConfig::parse(&text, Path::new("/elsewhere/c.toml")).expect("reads back");
    assert_eq!(again.data_dir, cfg.data_dir, "absolute paths stay");
    assert_eq!(again.limits.max_connections, cfg.limits.max_connections);
}

#[test]
fn bad_files_are_refused_with_the_file_and_the_reason() {
    let path = Path::new("c.toml");
    for (text, expect) in [
        (GOOD.replace("version = 1", "version = 2"), "this coordinator reads version 1"),
        (format!("{GOOD}\nlisten_port = 1\n"), "unknown field"),
        (format!("{GOOD}\n[limits]\nlease_seconds = 1\n"), "lease_seconds must be at least 2"),
        (format!("{GOOD}\n[limits]\nhandshake_seconds = 0\n"), "every other limit at least 1"),
        (format!("{GOOD}\n[limits]\nmax_connections = 0\n"), "every other limit at least 1"),
        (GOOD.replace("client_ca = \"/etc/fedtune/ca.pem\"", ""), "client_ca"),
    ] {
        let err = ServerConfig::parse(&text, path).expect_err(expect).to_string();
        assert!(err.starts_with("c.toml: "), "{err}");
        assert!(err.contains(expect), "{err} should say {expect}");
    }
}

#[test]
fn usage_errors_exit_64() {
    let bin = env!("CARGO_BIN_EXE_coordinator");
    let out = std::process::Command::new(bin).args(["serve"]).output().expect("run coordinator");
    assert_eq!(out.status.code(), Some(64));
    let out = std::process::Command::new(bin).arg("--version").output().expect("run coordinator");
    assert_eq!(out.status.code(), Some(0));
}

/// Every subcommand says what it does (none borrows another's description) and every argument
/// has help text.
#[test]
fn every_command_and_argument_is_explained() {
    use clap::CommandFactory;
    let mut cli = coordinator::lead::Cli::command();
    let problems = shared::cli::undocumented(&cli);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The commands a study lead starts with show an example.
    for path in [["round", "start"], ["study", "create"], ["pki", "issue-site"]] {
        let sub = cli
            .find_subcommand_mut(path[0])
            .and_then(|c| c.find_subcommand_mut(path[1]))
            .expect("the subcommand");
        let help = sub.render_long_help().to_string();
        assert!(help.contains("Example"), "{path:?}: {help}");
    }
}

/// A database written by a newer coordinator (a higher schema version) is refused at open,
/// saying so, and is left as it was.
#[test]
fn a_newer_schema_is_refused_and_left_alone() {
    use coordinator::store::{SCHEMA_VERSION, Store, StoreError};
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("db");
    drop(Store::open(&db).expect("a new store"));
    {
        let raw = locked_retry(|| sled::open(&db)).expect("sled");
        let meta = raw.open_tree("meta").expect("meta");
        assert_eq!(
            meta.get("schema_version").unwrap().as_deref(),
            Some(&SCHEMA_VERSION.to_be_bytes()[..])
        );
        meta.insert("schema_version", &(SCHEMA_VERSION + 1).to_be_bytes()).unwrap();
        raw.flush().unwrap();
    }
    match locked_retry(|| Store::open(&db)) {
        Err(e @ StoreError::Schema { .. }) => {
            assert!(e.to_string().contains("newer coordinator"), "{e}");
        }
        other => panic!("a newer schema opened: {other:?}"),
    }
    let raw = locked_retry(|| sled::open(&db)).expect("sled");
    let v = raw.open_tree("meta").unwrap().get("schema_version").unwrap().unwrap();
    assert_eq!(v.as_ref(), (SCHEMA_VERSION + 1).to_be_bytes(), "left as it was");
}

/// `open()` again while it fails only because sled's threads still hold the file lock of a
/// handle just dropped (for up to 10 s).
fn locked_retry<T, E: std::fmt::Display>(open: impl Fn() -> Result<T, E>) -> Result<T, E> {
    for _ in 0..100 {
        match open() {
            Err(e) if e.to_string().contains("could not acquire lock") => {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            other => return other,
        }
    }
    open()
}
