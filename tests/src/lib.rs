//! Harness for whole-system tests: finds the workspace's binaries and runs them.
//!
//! `CARGO_BIN_EXE_*` exists only for tests in the binary's own package, so the binaries are
//! found beside the test executable (`target/<profile>/`), where `cargo test --workspace`
//! builds them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

pub mod agents;
pub mod federation;
pub mod privacy;
pub mod scale;

/// Says that a test skipped a check and why, on stderr and in `skipped-tests.txt` in
/// `tmpdir` (the test's `CARGO_TARGET_TMPDIR`, `target/tmp`), which `.ci/run` prints after the
/// suite (cargo hides a passing test's output).
pub fn skipped(tmpdir: &str, what: &str) {
    use std::io::Write;
    eprintln!("skipped: {what}");
    let path = Path::new(tmpdir).join("skipped-tests.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{what}");
    }
}

/// Path of a workspace binary built next to this executable: a test's (in
/// `target/<profile>/deps/`) or a binary's of this crate (in `target/<profile>/`).
pub fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut dir = exe.parent().context("the executable has no folder")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("test executable has no target dir")?;
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        bail!(
            "{} is missing: run `cargo test --workspace` (or `cargo build -p {name}`) first",
            path.display()
        );
    }
    Ok(path)
}

/// The outcome of a command: exit code and captured output.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Self {
        Self {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Fails with the captured output unless the command exited 0.
    pub fn ok(self) -> Result<Self> {
        if self.code != Some(0) {
            bail!("exit {:?}\nstdout:\n{}\nstderr:\n{}", self.code, self.stdout, self.stderr);
        }
        Ok(self)
    }
}

/// Runs `site-agent` with `args` and no progress bars.
pub fn site_agent(args: &[&str]) -> Result<Run> {
    let out = Command::new(bin("site-agent")?)
        .arg("--quiet")
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "warn")
        .output()
        .context("starting site-agent")?;
    Ok(Run::from(out))
}

/// Runs `coordinator` with `args`.
pub fn coordinator(args: &[&str]) -> Result<Run> {
    let out = Command::new(bin("coordinator")?)
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "warn")
        .output()
        .context("starting coordinator")?;
    Ok(Run::from(out))
}

/// Starts `coordinator serve --config CONFIG` with `env` added, its log appended to `log`, and
/// waits (up to 30 s) for the `listening on` line it prints once it serves.
pub async fn spawn_coordinator(
    config: &Path,
    log: &Path,
    env: &[(&str, &str)],
) -> Result<std::process::Child> {
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut child = Command::new(bin("coordinator")?)
        .args(["serve", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .context("starting the coordinator binary")?;
    let stdout = child.stdout.take().context("coordinator stdout")?;
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    let line = tokio::time::timeout(std::time::Duration::from_secs(30), line)
        .await
        .context("coordinator start")???;
    if !line.starts_with("listening on") {
        let _ = child.kill();
        bail!("the coordinator did not start: {line:?} (see {})", log.display());
    }
    Ok(child)
}
