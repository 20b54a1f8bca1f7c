//! The `coordinator` command line: `serve`, the PKI commands, and the study lead's commands,
//! which talk to a running coordinator over gRPC with an admin bundle.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use proto::limits;
use proto::pb::{self, admin_service_client::AdminServiceClient};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::demo::DemoArgs;
use crate::identity::Role;
use crate::pki::{LEAF_DAYS, Pki};
use crate::report::{self, Format};
use crate::templates::{self, Template, TemplateOptions};

#[derive(Debug, Parser)]
#[command(
    name = "coordinator",
    version,
    about = "The fedtune coordinator and the study lead's command line"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub log: shared::cli::LogArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator server.
    Serve {
        /// coordinator.toml (see README for every field and its default).
        #[arg(long)]
        config: PathBuf,
    },
    /// The consortium's certificate authority.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Weights models.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Sites.
    #[command(subcommand)]
    Site(SiteCommand),
    /// Studies: a base model and the sites enrolled.
    #[command(subcommand)]
    Study(StudyCommand),
    /// Rounds: one task per site of a study.
    #[command(subcommand)]
    Round(RoundCommand),
    /// A study's report: per organ and arm, Dice mean ± SD, median, n, paired p-values of
    /// Model_ST vs Model_S and vs Model_T, per site and pooled; training times; the sweeps.
    Report {
        /// The study's name.
        study: String,
        /// table (terminal), md, csv, json or html (with box plots and sweep plots).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// The transfer study end to end on phantom data: a CA, a coordinator and site agents as
    /// processes on loopback with mutual TLS, the rounds, the report.
    Demo(DemoArgs),
    /// Per-site, per-organ scores of a round.
    Results {
        /// The round id `round start` printed.
        round: String,
        /// Per-case scores (by case index) as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Make a new CA and the coordinator's server bundle in DIR.
    Init {
        /// The PKI folder to create (the CA key stays here: keep it offline).
        #[arg(long)]
        dir: PathBuf,
        /// DNS names or IP addresses agents dial the coordinator by (repeatable).
        #[arg(long = "server-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        server_names: Vec<String>,
    },
    /// Issue a site bundle (DIR/sites/NAME) to hand over out of band.
    #[command(
        after_help = "Example:\n  coordinator pki issue-site hospital-a --dir pki   # -> pki/sites/hospital-a/"
    )]
    IssueSite {
        /// The site's name (lowercase letters, digits and '-'), as it will appear everywhere.
        name: String,
        /// The PKI folder made by `pki init`.
        #[arg(long)]
        dir: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = LEAF_DAYS)]
        days: i64,
        /// Replace an existing bundle: its certificate is revoked first, so the old copy stops
        /// working.
        #[arg(long)]
        force: bool,
    },
    /// Issue an admin bundle (DIR/admins/NAME).
    IssueAdmin {
        /// The study lead's name.
        name: String,
        /// The PKI folder made by `pki init`.
        #[arg(long)]
        dir: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = LEAF_DAYS)]
        days: i64,
        /// Replace an existing bundle: its certificate is revoked first, so the old copy stops
        /// working.
        #[arg(long)]
        force: bool,
    },
    /// Revoke a bundle: its certificate goes on DIR/revoked.txt, which the server re-reads.
    Revoke {
        /// The site's (or with --admin, the admin's) name.
        name: String,
        /// The PKI folder made by `pki init`.
        #[arg(long)]
        dir: PathBuf,
        /// Revoke an admin bundle instead of a site bundle.
        #[arg(long)]
        admin: bool,
    },
}

// How the study lead's commands reach the coordinator. (A plain comment: clap would give a
// doc comment here as the description of every subcommand that flattens this and has none.)
#[derive(Debug, Args)]
pub struct Conn {
    /// The coordinator's address.
    #[arg(long, env = "FEDTUNE_COORDINATOR", default_value = "https://127.0.0.1:7443")]
    pub coordinator: String,
    /// An admin bundle folder (cert.pem, key.pem, ca.pem) from `pki issue-admin`; or set
    /// FEDTUNE_ADMIN_BUNDLE once for every command.
    #[arg(long, env = "FEDTUNE_ADMIN_BUNDLE")]
    pub bundle: PathBuf,
    /// The name in the coordinator's certificate to expect.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Upload a weights file.
    Push {
        /// The weights (.safetensors written by `site-agent train` or `finetune`).
        file: PathBuf,
        /// The name studies refer to it by.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// The models the coordinator holds: name, sha256, size, config and layers.
    List {
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
pub enum SiteCommand {
    /// The sites that said hello: state (approved, revoked, certificate revoked), when each
    /// last called, device, data and certificate.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Let a site receive tasks.
    Approve {
        /// The site's name (as in its certificate).
        name: String,
        /// Let a site revoked with `site revoke` in again (refused without it).
        #[arg(long)]
        reinstate: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Refuse a site's every call from now on.
    Revoke {
        /// The site's name (as in its certificate).
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
pub enum StudyCommand {
    /// Create a study: a base model and the sites enrolled.
    #[command(
        after_help = "Example:\n  coordinator study create npc --base model-s --sites hospital-a,hospital-b"
    )]
    Create {
        /// The study's name.
        name: String,
        /// The base model's name or sha256 (Model_S); leave it out when a transfer round's
        /// source site trains Model_S.
        #[arg(long, default_value = "")]
        base: String,
        /// Comma-separated site names.
        #[arg(long, value_delimiter = ',', required = true)]
        sites: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// The studies: base model and sites.
    List {
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TaskArg {
    /// Score the study's base model at every site.
    Evaluate,
    /// Fine-tune the last --trainable-layers K of the base model at every site, then score.
    Finetune,
    /// Train a --config model from scratch at every site, then score.
    Train,
    /// The published experiment at every target: Model_S, Model_T, Model_ST.
    Transfer,
    /// Model_S and Model_ST for each of --trainable-layers K1,K2,...
    Sweep,
    /// Model_S, then Model_T and Model_ST for each of --train-cases N1,N2,...
    CasesSweep,
}

// Parsed once per run: boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum RoundCommand {
    /// Start a round: one task per site of the study.
    #[command(
        after_help = "Examples:\n  coordinator round start npc --task finetune --trainable-layers 2 --epochs 5 --watch\n  \
        coordinator round start npc-oar --task transfer --source source-hospital --watch\n\
        Exit codes with --watch: 0 completed, 2 failed, 3 cancelled."
    )]
    Start {
        /// The study's name.
        study: String,
        /// What every site does.
        #[arg(long, value_enum)]
        task: TaskArg,
        /// Layers to fine-tune: required for finetune (one K); for Model_ST of transfer and
        /// cases-sweep, default the paper's share (10 of 103, rounded up); a list for sweep.
        #[arg(long, value_delimiter = ',')]
        trainable_layers: Vec<u32>,
        /// cases-sweep: training-set sizes (the first N cases of each target's training split).
        #[arg(long, value_delimiter = ',')]
        train_cases: Vec<u32>,
        /// Transfer templates: the study site that trains Model_S and uploads it (its policy
        /// must share weights); without it, the study's base model is Model_S.
        #[arg(long)]
        source: Option<String>,
        /// Epochs of Model_S at the source site.
        #[arg(long)]
        source_epochs: Option<u32>,
        /// Epochs (Model_T for the transfer templates); default: the agent's, 10.
        #[arg(long)]
        epochs: Option<u32>,
        /// Epochs of Model_ST (default: --epochs).
        #[arg(long)]
        finetune_epochs: Option<u32>,
        /// Peak learning rate of Model_ST (default: --lr).
        #[arg(long)]
        finetune_lr: Option<f64>,
        /// Slices per optimizer step; default: the agent's, 8.
        #[arg(long)]
        batch_size: Option<u32>,
        /// Peak learning rate (cosine decay to 5 %); default: the agent's, 0.01.
        #[arg(long)]
        lr: Option<f64>,
        /// Seed of initialisation and shuffling; default: the agent's, 17.
        #[arg(long)]
        seed: Option<u64>,
        /// Model config for `train` and for a source's Model_S (default: small).
        #[arg(long)]
        config: Option<String>,
        /// Sites that must succeed (default: all).
        #[arg(long)]
        quorum: Option<u32>,
        /// The round fails its unfinished tasks after this long; default: the coordinator's
        /// limits.round_deadline_seconds (86400).
        #[arg(long)]
        deadline_seconds: Option<u32>,
        /// Leases of one task before it fails; default: the coordinator's limits.max_attempts (3).
        #[arg(long)]
        max_attempts: Option<u32>,
        /// Follow the round until it ends (exit 0 completed, 2 failed, 3 cancelled).
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Every round, newest first: id, study, task, state, start time (UTC), sites done.
    #[command(after_help = "Example:\n  coordinator round list --study npc")]
    List {
        /// Only this study's rounds.
        #[arg(long)]
        study: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// A round's state and each site's task; exits 2 if the round failed, 3 if it was
    /// cancelled (0 while it runs and once it completed).
    Status {
        /// The round id `round start` printed.
        round: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Per-site progress bars until the round ends; exits 0 when it completed, 2 when it
    /// failed, 3 when it was cancelled.
    Watch {
        /// The round id `round start` printed.
        round: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancel a round: its unfinished tasks end, and agents still working on them stop.
    Cancel {
        /// The round id `round start` printed.
        round: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Prints a line of command output on stdout.
fn out(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Connects to the coordinator with an admin bundle.
pub async fn connect(conn: &Conn) -> Result<AdminServiceClient<Channel>> {
    let read = |f: &str| {
        let p = conn.bundle.join(f);
        std::fs::read(&p).with_context(|| format!("reading {} of the admin bundle", p.display()))
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .identity(Identity::from_pem(read("cert.pem")?, read("key.pem")?))
        .domain_name(conn.server_name.clone());
    let channel = Channel::from_shared(conn.coordinator.clone())
        .with_context(|| format!("coordinator address {}", conn.coordinator))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", conn.coordinator))?;
    Ok(AdminServiceClient::new(channel)
        .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(limits::MAX_MESSAGE_BYTES))
}

/// A call the coordinator answered with an error status: shown as `Code: message`, and kept
/// whole so that callers (scripts, tests) can read its code with `downcast_ref`.
#[derive(Debug, thiserror::Error)]
#[error("{:?}: {}", .0.code(), .0.message())]
pub struct CallFailed(pub tonic::Status);

fn status(e: tonic::Status) -> anyhow::Error {
    CallFailed(e).into()
}

/// Uploads a weights file with a progress bar; returns what the coordinator stored.
pub async fn push_model(
    client: &mut AdminServiceClient<Channel>,
    file: &Path,
    name: &str,
    progress: bool,
) -> Result<pb::ModelInfo> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let bar = if progress {
        indicatif::ProgressBar::new(bytes.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes}")
            .expect("valid template"),
    );
    bar.set_message(format!("uploading {name}"));
    let header = pb::PushModelRequest {
        part: Some(pb::push_model_request::Part::Header(pb::ModelRef {
            sha256,
            size: bytes.len() as u64,
            name: name.into(),
        })),
    };
    let chunks: Vec<pb::PushModelRequest> = bytes
        .chunks(limits::CHUNK_BYTES)
        .map(|c| pb::PushModelRequest {
            part: Some(pb::push_model_request::Part::Chunk(c.to_vec())),
        })
        .collect();
    let b = bar.clone();
    let stream =
        tokio_stream::iter(std::iter::once(header).chain(chunks.into_iter().inspect(move |c| {
            if let Some(pb::push_model_request::Part::Chunk(d)) = &c.part {
                b.inc(d.len() as u64);
            }
        })));
    let info = client.push_model(stream).await.map_err(status)?.into_inner();
    bar.finish_and_clear();
    Ok(info)
}

/// What a site trains on, from its last Hello: `  cuda (NVIDIA H200, 139.8 GiB, policy cap
/// 40.0 GiB)` or `  cpu (16 threads)`.
/// When a site last called, in words: "online" within a minute (agents poll every 20 s by
/// default), else how long ago.
pub fn last_seen(now: i64, seen: i64) -> String {
    let ago = now - seen;
    match ago {
        _ if seen <= 0 => "never seen".into(),
        ..=60 => "online".into(),
        61..=3_600 => format!("last seen {} min ago", ago / 60),
        3_601..=172_800 => format!("last seen {} h ago", ago / 3_600),
        _ => format!("last seen {} days ago", ago / 86_400),
    }
}

fn device_summary(c: &pb::Capabilities) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match c.device.as_str() {
        "" => String::new(),
        "cuda" => {
            let cap = if c.max_gpu_memory_bytes > 0 {
                format!(", policy cap {:.1} GiB", gib(c.max_gpu_memory_bytes))
            } else {
                String::new()
            };
            format!(
                "  cuda ({}, {:.1} GiB, {:.1} GiB free at hello{cap})",
                c.gpu_name,
                gib(c.gpu_memory_bytes),
                gib(c.gpu_free_bytes)
            )
        }
        other => format!("  {other} ({} threads)", c.threads),
    }
}

fn task_state(s: i32) -> &'static str {
    match pb::TaskState::try_from(s).unwrap_or(pb::TaskState::Unspecified) {
        pb::TaskState::Waiting => "waiting",
        pb::TaskState::Pending => "pending",
        pb::TaskState::Leased => "running",
        pb::TaskState::Succeeded => "succeeded",
        pb::TaskState::Failed => "failed",
        pb::TaskState::Refused => "refused",
        pb::TaskState::Cancelled => "cancelled",
        pb::TaskState::Unspecified => "?",
    }
}

pub fn round_state(s: i32) -> &'static str {
    match pb::RoundState::try_from(s).unwrap_or(pb::RoundState::Unspecified) {
        pb::RoundState::Running => "running",
        pb::RoundState::Completed => "completed",
        pb::RoundState::Failed => "failed",
        pb::RoundState::Cancelled => "cancelled",
        pb::RoundState::Unspecified => "?",
    }
}

/// A round that ended without completing, as `round start --watch`, `round watch` and `round
/// status` report it: the process exits with [`RoundNotCompleted::exit_code`], so that a script
/// or scheduler can tell a failed round from a good one.
#[derive(Debug, thiserror::Error)]
#[error("round {round} {state}{reason}")]
pub struct RoundNotCompleted {
    pub round: String,
    pub state: &'static str,
    /// ` (why)`, or empty.
    pub reason: String,
}

impl RoundNotCompleted {
    /// 2 for a failed round, 3 for a cancelled one.
    pub fn exit_code(&self) -> u8 {
        if self.state == "cancelled" { 3 } else { 2 }
    }
}

/// `Err` for a round that failed or was cancelled; a running or completed round is `Ok`.
fn ended_well(r: &pb::RoundInfo) -> Result<()> {
    match pb::RoundState::try_from(r.state) {
        Ok(pb::RoundState::Failed | pb::RoundState::Cancelled) => Err(RoundNotCompleted {
            round: r.round_id.clone(),
            state: round_state(r.state),
            reason: if r.reason.is_empty() { String::new() } else { format!(" ({})", r.reason) },
        }
        .into()),
        _ => Ok(()),
    }
}

/// One round in a line: id, study, task, state, start (UTC), succeeded of all sites.
pub fn round_line(r: &pb::RoundInfo) -> String {
    let spec = r.spec.clone().unwrap_or_default();
    let task = if spec.template.is_empty() {
        pb::TaskKind::try_from(spec.kind)
            .map(|k| k.as_str_name().trim_start_matches("TASK_KIND_").to_ascii_lowercase())
            .unwrap_or_else(|_| format!("kind {}", spec.kind))
    } else {
        spec.template.clone()
    };
    let started = time::OffsetDateTime::from_unix_timestamp(r.created_unix)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute()
            )
        })
        .unwrap_or_else(|_| r.created_unix.to_string());
    let done = r.tasks.iter().filter(|t| t.state == pb::TaskState::Succeeded as i32).count();
    format!(
        "{}  {:<16} {:<12} {:<10} {started}  {done}/{} sites succeeded",
        r.round_id,
        r.study,
        task,
        round_state(r.state),
        r.tasks.len()
    )
}

fn print_round(r: &pb::RoundInfo) {
    let reason = if r.reason.is_empty() { String::new() } else { format!(" ({})", r.reason) };
    out(&format!("round {} of study {}: {}{reason}", r.round_id, r.study, round_state(r.state)));
    for t in &r.tasks {
        let progress = t
            .progress
            .as_ref()
            .filter(|_| t.state == pb::TaskState::Leased as i32)
            .map(|p| {
                format!(
                    " {} {:.0}% epoch {}/{} loss {:.3}",
                    p.phase,
                    p.fraction * 100.0,
                    p.epoch,
                    p.epochs,
                    p.loss
                )
            })
            .unwrap_or_default();
        let reason = if t.reason.is_empty() { String::new() } else { format!(" ({})", t.reason) };
        out(&format!(
            "  {:<16} {:<10} attempt {}{progress}{reason}",
            t.site,
            task_state(t.state),
            t.attempt
        ));
    }
}

/// One line per change of a site's task (state, phase or epoch), for a watch whose output is
/// not a terminal (a cron job, CI log or pipe), where progress bars draw nothing.
#[derive(Debug, Default)]
struct ChangeLog {
    last: std::collections::BTreeMap<String, (i32, String, u32)>,
}

impl ChangeLog {
    fn lines(&mut self, info: &pb::RoundInfo, started: std::time::Instant) -> Vec<String> {
        let mut out = Vec::new();
        for t in &info.tasks {
            let p = t.progress.as_ref().filter(|_| t.state == pb::TaskState::Leased as i32);
            let key =
                (t.state, p.map(|p| p.phase.clone()).unwrap_or_default(), p.map_or(0, |p| p.epoch));
            if self.last.get(&t.site) == Some(&key) {
                continue;
            }
            let detail = match p {
                Some(p) if p.epochs > 0 => {
                    format!(" {} epoch {}/{} loss {:.3}", p.phase, p.epoch, p.epochs, p.loss)
                }
                Some(p) => format!(" {}", p.phase),
                None if !t.reason.is_empty() => format!(" ({})", t.reason),
                None => String::new(),
            };
            out.push(format!(
                "[{:>7.1} s] {}: {}{detail}",
                started.elapsed().as_secs_f64(),
                t.site,
                task_state(t.state)
            ));
            self.last.insert(t.site.clone(), key);
        }
        out
    }
}

/// Follows a round until it ends: one progress bar per site on a terminal, else one line per
/// change of a site's task.
/// How long a watch keeps trying to reach a coordinator that went away (a restart, a network
/// cut) before it gives up; the round goes on meanwhile.
pub const WATCH_RECONNECT_SECONDS: u64 = 600;

/// Whether a failed watch call may succeed again once the coordinator is back.
fn transient(s: &tonic::Status) -> bool {
    use tonic::Code as C;
    matches!(
        s.code(),
        C::Unavailable | C::Unknown | C::Cancelled | C::DeadlineExceeded | C::Aborted
    )
}

pub async fn watch(client: &mut AdminServiceClient<Channel>, round: &str) -> Result<pb::RoundInfo> {
    use std::io::IsTerminal;
    let (terminal, started) = (std::io::stderr().is_terminal(), std::time::Instant::now());
    let mut changes = ChangeLog::default();
    let multi = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template("{prefix:<16} [{bar:30}] {msg}")
        .expect("valid template");
    let mut bars: std::collections::BTreeMap<String, indicatif::ProgressBar> = Default::default();
    let mut last: Option<pb::RoundInfo> = None;
    // Since when the coordinator has been out of reach, and how often we tried.
    let mut lost: Option<(std::time::Instant, u32)> = None;
    loop {
        let opened = client.watch_round(pb::RoundRequest { round_id: round.into() }).await;
        let broke = match opened {
            // Before the first state, an error is the answer (no such round, no access, no
            // coordinator at that address).
            Err(s) if last.is_none() || !transient(&s) => return Err(status(s)),
            Err(s) => s,
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(info)) => {
                            if lost.take().is_some() {
                                multi.suspend(|| eprintln_note("reconnected; the round went on"));
                            }
                            if terminal {
                                draw_bars(&multi, &style, &mut bars, &info);
                            } else {
                                for line in changes.lines(&info, started) {
                                    out(&line);
                                }
                            }
                            last = Some(info);
                        }
                        Ok(None) => break tonic::Status::unavailable("the watch stream ended"),
                        Err(s) if last.is_some() && transient(&s) => break s,
                        Err(s) => return Err(status(s)),
                    }
                }
            }
        };
        let state = last.as_ref().map(|r| r.state);
        if state.is_some_and(|s| s != pb::RoundState::Running as i32) {
            break;
        }
        let (since, tries) = lost.get_or_insert((std::time::Instant::now(), 0));
        if *tries == 0 {
            multi.suspend(|| {
                eprintln_note(&format!(
                    "lost the coordinator ({}); reconnecting for up to {WATCH_RECONNECT_SECONDS} s \
                     (the round goes on without the watch)",
                    broke.message()
                ))
            });
        }
        if since.elapsed() > std::time::Duration::from_secs(WATCH_RECONNECT_SECONDS) {
            anyhow::bail!(
                "lost the coordinator for {} s watching round {round} (last: {}); the round may \
                 still run: `coordinator round status {round}` when it is back",
                since.elapsed().as_secs(),
                broke.message()
            );
        }
        *tries += 1;
        let wait = std::time::Duration::from_millis(250u64 << (*tries).min(5))
            .min(std::time::Duration::from_secs(5));
        tokio::time::sleep(wait).await;
    }
    for b in bars.values() {
        b.finish();
    }
    last.ok_or_else(|| anyhow::anyhow!("the coordinator closed the watch without a state"))
}

#[allow(clippy::print_stderr)]
fn eprintln_note(s: &str) {
    eprintln!("{s}");
}

/// Progress bars per site, on a terminal.
fn draw_bars(
    multi: &indicatif::MultiProgress,
    style: &indicatif::ProgressStyle,
    bars: &mut std::collections::BTreeMap<String, indicatif::ProgressBar>,
    info: &pb::RoundInfo,
) {
    for t in &info.tasks {
        let bar = bars.entry(t.site.clone()).or_insert_with(|| {
            let b = multi.add(indicatif::ProgressBar::new(1000));
            b.set_style(style.clone());
            b.set_prefix(t.site.clone());
            b
        });
        let (pos, msg) = match (&t.progress, task_state(t.state)) {
            (_, "succeeded") => (1000, "succeeded".to_string()),
            (Some(p), "running") => (
                (p.fraction.clamp(0.0, 1.0) * 1000.0) as u64,
                format!("{} epoch {}/{} loss {:.3}", p.phase, p.epoch, p.epochs, p.loss),
            ),
            (_, s) => (bar.position(), format!("{s} {}", t.reason)),
        };
        bar.set_position(pos);
        bar.set_message(msg);
    }
}

/// Mean and SD of a slice (SD with n - 1).
fn mean_sd(v: &[f64]) -> (f64, f64) {
    shared::metrics::stats::summary(v)
        .map(|s| (s.mean, s.sd.unwrap_or(0.0)))
        .unwrap_or((f64::NAN, 0.0))
}

fn organs_json(organs: &[pb::OrganScores]) -> serde_json::Value {
    organs
        .iter()
        .map(|o| {
            serde_json::json!({
                "organ": o.organ,
                "cases": o.cases.iter().map(|c| serde_json::json!({
                    "case_index": c.case_index, "dice": c.dice, "hd95_mm": c.hd95_mm,
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// `results --json`: every site's scores per organ and case; `arms` holds a transfer target's
/// arms, or a finetune task's base model scored on the same cases before fine-tuning.
pub fn results_json(r: &pb::RoundResults) -> serde_json::Value {
    let round = r.round.as_ref();
    serde_json::json!({
        "round": round.map(|r| r.round_id.clone()),
        "study": round.map(|r| r.study.clone()),
        "state": round.map(|r| round_state(r.state)),
        "sites": r.results.iter().map(|s| {
            let res = s.result.clone().unwrap_or_default();
            serde_json::json!({
                "site": s.site,
                "device": res.device,
                "train_seconds": res.train_seconds,
                "cache_seconds": res.cache_seconds,
                "eval_seconds": res.eval_seconds,
                "epoch_losses": res.epoch_losses,
                "weights_sha256": res.weights_sha256,
                "organs": organs_json(&res.organs),
                "arms": res.arms.iter().map(|a| serde_json::json!({
                    "arm": crate::report::arm_name(a.spec.as_ref()),
                    "trainable_layers": a.trainable_layers,
                    "train_cases": a.train_cases,
                    "train_seconds": a.train_seconds,
                    "organs": organs_json(&a.organs),
                })).collect::<Vec<_>>(),
            })
        }).collect::<Vec<_>>(),
    })
}

/// `mean ± SD` of Dice values; the mean alone for one case (no SD is defined), "-" for none.
fn dice_cell(v: &[f64]) -> String {
    match shared::metrics::stats::summary(v) {
        Some(s) => match s.sd {
            Some(sd) => format!("{:.3} ± {sd:.3}", s.mean),
            None => format!("{:.3}", s.mean),
        },
        None => "-".into(),
    }
}

/// One scored model of a task: its label, training seconds and scores.
struct Scored<'a> {
    label: String,
    train_seconds: f64,
    organs: &'a [pb::OrganScores],
}

/// Every model a task scored: the task's own (evaluate, train, finetune, a source's Model_S)
/// and each arm (a transfer target's arms, a finetune task's base model).
fn scored_models(res: &pb::TaskResult) -> Vec<Scored<'_>> {
    let mut out = Vec::new();
    // A task with a model of its own and a base arm is a finetune task with its baseline.
    let finetune_base = !res.organs.is_empty()
        && res
            .arms
            .iter()
            .any(|a| a.spec.as_ref().is_some_and(|s| s.kind == pb::ArmKind::Base as i32));
    if !res.organs.is_empty() {
        let label = if finetune_base { "fine-tuned" } else { "Dice" };
        out.push(Scored {
            label: label.into(),
            train_seconds: res.train_seconds,
            organs: &res.organs,
        });
    }
    for a in &res.arms {
        let kind = a.spec.as_ref().map_or(0, |s| s.kind);
        let mut label = if finetune_base && kind == pb::ArmKind::Base as i32 {
            "base model".to_string()
        } else {
            crate::report::arm_name(a.spec.as_ref()).to_string()
        };
        if kind == pb::ArmKind::Finetune as i32 {
            label.push_str(&format!(" k={}", a.trainable_layers));
        }
        if kind != pb::ArmKind::Base as i32 && a.spec.as_ref().is_some_and(|s| s.train_cases > 0) {
            label.push_str(&format!(" n={}", a.train_cases));
        }
        out.push(Scored { label, train_seconds: a.train_seconds, organs: &a.organs });
    }
    out
}

fn print_results(r: &pb::RoundResults) {
    if let Some(round) = &r.round {
        out(&format!(
            "round {} of study {}: {}",
            round.round_id,
            round.study,
            round_state(round.state)
        ));
    }
    for s in &r.results {
        let Some(res) = &s.result else { continue };
        let models = scored_models(res);
        let eval: f64 = res.eval_seconds + res.arms.iter().map(|a| a.eval_seconds).sum::<f64>();
        let trained: Vec<String> = models
            .iter()
            .filter(|m| m.train_seconds > 0.0)
            .map(|m| format!("{} {:.1} s", m.label, m.train_seconds))
            .collect();
        let trained = if trained.is_empty() {
            String::new()
        } else {
            format!("training {}, ", trained.join(", "))
        };
        out(&format!("site {} ({}; {trained}evaluation {eval:.1} s)", s.site, res.device));
        if models.is_empty() {
            continue;
        }
        let mut header = format!("  {:<18}", "organ");
        for m in &models {
            header.push_str(&format!(" {:>15}", m.label));
        }
        out(&format!("{header} {:>8} {:>4}", "HD95 mm", "n"));
        // Organs in the order the first model lists them; HD95 and n of the first model.
        for o in models[0].organs {
            let mut line = format!("  {:<18}", o.organ);
            for m in &models {
                let dice: Vec<f64> = m
                    .organs
                    .iter()
                    .find(|x| x.organ == o.organ)
                    .map(|x| x.cases.iter().map(|c| c.dice).collect())
                    .unwrap_or_default();
                line.push_str(&format!(" {:>15}", dice_cell(&dice)));
            }
            let hd: Vec<f64> = o.cases.iter().filter_map(|c| c.hd95_mm).collect();
            let hd = if hd.is_empty() { "-".to_string() } else { format!("{:.1}", mean_sd(&hd).0) };
            out(&format!("{line} {hd:>8} {:>4}", o.cases.len()));
        }
    }
}

/// Runs a parsed command (`serve` is the binary's: it owns signals and the listener).
pub async fn run_admin(command: Command) -> Result<()> {
    match command {
        Command::Serve { .. } => unreachable!("serve is handled by main"),
        Command::Pki(p) => pki(p),
        Command::Model(ModelCommand::Push { file, name, conn }) => {
            let mut c = connect(&conn).await?;
            let info = push_model(&mut c, &file, &name, true).await?;
            let m = info.model.unwrap_or_default();
            out(&format!(
                "stored model {} ({} bytes, sha256 {}, config {}, {} layers)",
                m.name, m.size, m.sha256, info.config, info.layers
            ));
            Ok(())
        }
        Command::Model(ModelCommand::List { conn }) => {
            let models = connect(&conn)
                .await?
                .list_models(pb::ListModelsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            for info in models.models {
                let m = info.model.unwrap_or_default();
                out(&format!(
                    "{:<20} {} {:>10} bytes  {} ({} layers)",
                    m.name, m.sha256, m.size, info.config, info.layers
                ));
            }
            Ok(())
        }
        Command::Site(SiteCommand::List { conn }) => {
            let sites = connect(&conn)
                .await?
                .list_sites(pb::ListSitesRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let now = crate::service::now_s();
            for s in sites.sites {
                let state = if s.certificate_revoked {
                    "revoked (its certificate is on the revocation list)"
                } else if s.revoked {
                    "revoked"
                } else if s.approved {
                    "approved"
                } else {
                    "waiting for approval"
                };
                let days = (s.certificate_not_after_unix - now) / 86_400;
                let cert = if s.certificate_not_after_unix == 0 {
                    String::new()
                } else if s.certificate_not_after_unix < now {
                    format!(
                        "  EXPIRED: its certificate expired on {} and it cannot connect; issue \
                         a new bundle (`pki revoke site {n}`, `pki issue-site {n}`)",
                        shared::cert::utc(s.certificate_not_after_unix),
                        n = s.name
                    )
                } else if days < 30 {
                    format!("  WARNING: certificate expires in {days} days")
                } else {
                    format!("  certificate valid {days} more days")
                };
                let data = s
                    .dataset
                    .map(|d| {
                        format!(
                            "  {} train / {} test cases, {} organs",
                            d.train_cases,
                            d.test_cases,
                            d.organs.len()
                        )
                    })
                    .unwrap_or_default();
                let device = s.capabilities.as_ref().map(device_summary).unwrap_or_default();
                let seen = last_seen(now, s.last_seen_unix);
                out(&format!("{:<16} {state}  {seen}{device}{data}{cert}", s.name));
            }
            Ok(())
        }
        Command::Site(SiteCommand::Approve { name, reinstate, conn }) => {
            let s = connect(&conn)
                .await?
                .approve_site(pb::SiteRequest { name, reinstate })
                .await
                .map_err(status)?
                .into_inner();
            out(&format!("site {} approved", s.name));
            Ok(())
        }
        Command::Site(SiteCommand::Revoke { name, conn }) => {
            let s = connect(&conn)
                .await?
                .revoke_site(pb::SiteRequest { name, reinstate: false })
                .await
                .map_err(status)?
                .into_inner();
            out(&format!("site {} revoked", s.name));
            Ok(())
        }
        Command::Study(StudyCommand::Create { name, base, sites, conn }) => {
            let s = connect(&conn)
                .await?
                .create_study(pb::CreateStudyRequest { name, base_model: base, sites })
                .await
                .map_err(status)?
                .into_inner();
            out(&format!(
                "study {} on base model {} with sites {}",
                s.name,
                s.base.map(|b| b.name).unwrap_or_default(),
                s.sites.join(",")
            ));
            Ok(())
        }
        Command::Study(StudyCommand::List { conn }) => {
            let studies = connect(&conn)
                .await?
                .list_studies(pb::ListStudiesRequest {})
                .await
                .map_err(status)?
                .into_inner();
            for s in studies.studies {
                out(&format!(
                    "{:<20} base {:<16} sites {}",
                    s.name,
                    s.base.map(|b| b.name).unwrap_or_default(),
                    s.sites.join(",")
                ));
            }
            Ok(())
        }
        Command::Round(RoundCommand::Start {
            study,
            task,
            trainable_layers,
            train_cases,
            source,
            source_epochs,
            epochs,
            finetune_epochs,
            finetune_lr,
            batch_size,
            lr,
            seed,
            config,
            quorum,
            deadline_seconds,
            max_attempts,
            watch: follow,
            conn,
        }) => {
            let template = match task {
                TaskArg::Transfer => Some(Template::Transfer),
                TaskArg::Sweep => Some(Template::Sweep),
                TaskArg::CasesSweep => Some(Template::CasesSweep),
                _ => None,
            };
            let (spec, source_spec) = match template {
                Some(t) => {
                    let o = TemplateOptions {
                        trainable_layers,
                        train_cases,
                        epochs: epochs.unwrap_or(0),
                        finetune_epochs: finetune_epochs.or(epochs).unwrap_or(0),
                        learning_rate: lr.unwrap_or(0.0),
                        finetune_learning_rate: finetune_lr.or(lr).unwrap_or(0.0),
                        batch_size: batch_size.unwrap_or(0),
                        seed: seed.unwrap_or(0),
                        config: config.unwrap_or_default(),
                    };
                    let spec = templates::target_spec(t, &o).map_err(anyhow::Error::msg)?;
                    let ss = source
                        .is_some()
                        .then(|| templates::source_spec(&o, source_epochs.or(epochs).unwrap_or(0)));
                    (spec, ss)
                }
                None => {
                    if source.is_some() {
                        bail!("--source is for --task transfer, sweep or cases-sweep");
                    }
                    let kind = match task {
                        TaskArg::Evaluate => pb::TaskKind::Evaluate,
                        TaskArg::Finetune => pb::TaskKind::Finetune,
                        _ => pb::TaskKind::Train,
                    };
                    let k = match (task, trainable_layers.as_slice()) {
                        (TaskArg::Finetune, [k]) => *k,
                        (TaskArg::Finetune, _) => {
                            bail!("--task finetune needs one --trainable-layers K")
                        }
                        _ => 0,
                    };
                    let spec = pb::TaskSpec {
                        kind: kind as i32,
                        trainable_layers: k,
                        epochs: epochs.unwrap_or(0),
                        batch_size: batch_size.unwrap_or(0),
                        learning_rate: lr.unwrap_or(0.0),
                        seed: seed.unwrap_or(0),
                        config: config.unwrap_or_default(),
                        ..Default::default()
                    };
                    (spec, None)
                }
            };
            let mut c = connect(&conn).await?;
            let r = c
                .start_round(pb::StartRoundRequest {
                    study,
                    spec: Some(spec),
                    quorum: quorum.unwrap_or(0),
                    deadline_seconds: deadline_seconds.unwrap_or(0),
                    max_attempts: max_attempts.unwrap_or(0),
                    source_site: source.unwrap_or_default(),
                    source_spec,
                })
                .await
                .map_err(status)?
                .into_inner();
            out(&format!("round {} started", r.round_id));
            for w in &r.warnings {
                eprintln_note(&format!("warning: {w}"));
            }
            if follow {
                let r = watch(&mut c, &r.round_id).await?;
                print_round(&r);
                return ended_well(&r);
            }
            Ok(())
        }
        Command::Round(RoundCommand::List { study, conn }) => {
            let list = connect(&conn)
                .await?
                .list_rounds(pb::ListRoundsRequest { study: study.unwrap_or_default() })
                .await
                .map_err(status)?
                .into_inner();
            if list.rounds.is_empty() {
                out("no rounds");
            }
            for r in &list.rounds {
                out(&round_line(r));
            }
            Ok(())
        }
        Command::Round(RoundCommand::Status { round, conn }) => {
            let r = connect(&conn)
                .await?
                .get_round(pb::RoundRequest { round_id: round })
                .await
                .map_err(status)?
                .into_inner();
            print_round(&r);
            ended_well(&r)
        }
        Command::Round(RoundCommand::Watch { round, conn }) => {
            let r = watch(&mut connect(&conn).await?, &round).await?;
            print_round(&r);
            ended_well(&r)
        }
        Command::Round(RoundCommand::Cancel { round, conn }) => {
            let r = connect(&conn)
                .await?
                .cancel_round(pb::RoundRequest { round_id: round })
                .await
                .map_err(status)?
                .into_inner();
            print_round(&r);
            Ok(())
        }
        Command::Report { study, format, out: path, conn } => {
            let results = connect(&conn)
                .await?
                .get_study_results(pb::StudyRequest { name: study })
                .await
                .map_err(status)?
                .into_inner();
            let text = report::render(&report::build(&results), format);
            match path {
                Some(p) => {
                    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
                    out(&format!("report written to {}", p.display()));
                }
                None => out(text.trim_end()),
            }
            Ok(())
        }
        Command::Demo(a) => {
            let rep = crate::demo::run(&a).await?;
            out(report::render(&rep, Format::Table).trim_end());
            Ok(())
        }
        Command::Results { round, json, conn } => {
            let r = connect(&conn)
                .await?
                .get_results(pb::RoundRequest { round_id: round })
                .await
                .map_err(status)?
                .into_inner();
            if json {
                out(&serde_json::to_string_pretty(&results_json(&r))?);
            } else {
                print_results(&r);
            }
            Ok(())
        }
    }
}

/// Issues a bundle; with `force`, an existing one's certificate is revoked first.
fn issue(dir: &std::path::Path, role: Role, name: &str, days: i64, force: bool) -> Result<PathBuf> {
    let pki = Pki::open(dir)?;
    if force && pki.bundle_dir(role, name).join("cert.pem").exists() {
        let fp = pki.revoke(role, name)?;
        out(&format!(
            "revoked the previous {role} certificate of {name} (sha256 {fp}); listed in {}",
            pki.revocation_list_path().display()
        ));
    }
    Ok(pki.issue(role, name, days)?)
}

fn pki(p: PkiCommand) -> Result<()> {
    match p {
        PkiCommand::Init { dir, server_names } => {
            let pki = Pki::init(&dir, &server_names)?;
            out(&format!("CA: {}", pki.ca_cert_path().display()));
            out(&format!(
                "server bundle ({}): {}",
                server_names.join(", "),
                pki.server_dir().display()
            ));
            out("keep ca.key offline when you can; it signs every bundle");
        }
        PkiCommand::IssueSite { name, dir, days, force } => {
            let path = issue(&dir, Role::Site, &name, days, force)?;
            out(&format!(
                "site bundle for {name}: {} (hand it to the site's IT out of band)",
                path.display()
            ));
        }
        PkiCommand::IssueAdmin { name, dir, days, force } => {
            let path = issue(&dir, Role::Admin, &name, days, force)?;
            out(&format!("admin bundle for {name}: {}", path.display()));
        }
        PkiCommand::Revoke { name, dir, admin } => {
            let role = if admin { Role::Admin } else { Role::Site };
            let pki = Pki::open(&dir)?;
            let fp = pki.revoke(role, &name)?;
            out(&format!(
                "revoked {role} {name} (certificate sha256 {fp}); listed in {}",
                pki.revocation_list_path().display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_list_says_what_each_site_trains_on() {
        let cpu = pb::Capabilities { device: "cpu".into(), threads: 16, ..Default::default() };
        assert_eq!(device_summary(&cpu), "  cpu (16 threads)");
        let gib = 1u64 << 30;
        let gpu = pb::Capabilities {
            device: "cuda".into(),
            gpu_name: "NVIDIA H200".into(),
            gpu_memory_bytes: 140 * gib,
            gpu_free_bytes: 139 * gib,
            max_gpu_memory_bytes: 40 * gib,
            ..Default::default()
        };
        assert_eq!(
            device_summary(&gpu),
            "  cuda (NVIDIA H200, 140.0 GiB, 139.0 GiB free at hello, policy cap 40.0 GiB)"
        );
        assert_eq!(device_summary(&pb::Capabilities::default()), "", "an agent before devices");
    }

    #[test]
    fn results_list_every_model_a_task_scored() {
        let organ = |dice: &[f64]| {
            vec![pb::OrganScores {
                organ: "brainstem".into(),
                cases: dice
                    .iter()
                    .enumerate()
                    .map(|(i, d)| pb::CaseScore { case_index: i as u32, dice: *d, hd95_mm: None })
                    .collect(),
            }]
        };
        let arm = |kind: pb::ArmKind, k: u32, dice: &[f64]| pb::ArmResult {
            spec: Some(pb::ArmSpec { kind: kind as i32, ..Default::default() }),
            trainable_layers: k,
            organs: organ(dice),
            ..Default::default()
        };
        // A transfer target: no model of its own, three arms.
        let transfer = pb::TaskResult {
            arms: vec![
                arm(pb::ArmKind::Base, 0, &[0.5, 0.6]),
                arm(pb::ArmKind::Scratch, 22, &[0.6, 0.7]),
                arm(pb::ArmKind::Finetune, 3, &[0.7]),
            ],
            ..Default::default()
        };
        let labels: Vec<String> = scored_models(&transfer).into_iter().map(|m| m.label).collect();
        assert_eq!(labels, ["Model_S", "Model_T", "Model_ST k=3"]);
        // A finetune task: its own model and the base model.
        let finetune = pb::TaskResult {
            organs: organ(&[0.7, 0.8]),
            arms: vec![arm(pb::ArmKind::Base, 0, &[0.5, 0.6])],
            ..Default::default()
        };
        let labels: Vec<String> = scored_models(&finetune).into_iter().map(|m| m.label).collect();
        assert_eq!(labels, ["fine-tuned", "base model"]);
        assert_eq!(dice_cell(&[0.7]), "0.700", "no SD for one case");
        assert_eq!(dice_cell(&[0.5, 0.7]), "0.600 ± 0.141");
        assert_eq!(dice_cell(&[]), "-");
    }

    #[test]
    fn last_seen_in_words() {
        let now = 1_000_000;
        assert_eq!(last_seen(now, 0), "never seen");
        assert_eq!(last_seen(now, now - 15), "online");
        assert_eq!(last_seen(now, now - 61), "last seen 1 min ago");
        assert_eq!(last_seen(now, now - 7_200), "last seen 2 h ago");
        assert_eq!(last_seen(now, now - 3 * 86_400), "last seen 3 days ago");
    }
}
