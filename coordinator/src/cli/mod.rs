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

mod show;
mod watch;

use show::{device_summary, print_results, print_round};
pub use show::{last_seen, results_json, round_line, round_state};
use watch::eprintln_note;
pub use watch::{WATCH_RECONNECT_SECONDS, watch};

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
