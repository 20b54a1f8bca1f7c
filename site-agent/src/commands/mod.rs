//! The `site-agent` subcommands: flags (clap) and what each one does.

mod dicom;
mod measure;
mod model;
mod ops;

use std::path::{Path, PathBuf};

use crate::data::{self, Manifest, Split, phantom};
use crate::evaluate::{LabelScore, present_labels, score_labels};
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use measure::{BenchArgs, ExperimentArgs, bench_cmd, experiment_cmd};
pub use model::{
    DeviceArg, EvaluateArgs, FinetuneArgs, PredictArgs, SplitArg, TrainArgs, TrainFlags,
};
use model::{evaluate_cmd, finetune_cmd, predict_cmd, train_cmd};

/// The fedtune site agent: runs next to a hospital's data.
#[derive(Debug, Parser)]
#[command(name = "site-agent", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[command(flatten)]
    pub log: shared::cli::LogArgs,
    /// No progress bars.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a phantom center: NIfTI images, labels and a manifest.
    Phantom(PhantomArgs),
    /// Validate a manifest and every case it lists (a dry run for hospital IT).
    CheckData(CheckDataArgs),
    /// Convert DICOM CT series and their RTSTRUCTs to NIfTI images, labels and a manifest.
    ImportDicom(dicom::ImportDicomArgs),
    /// Train a model from scratch on a manifest's train split.
    Train(TrainArgs),
    /// Fine-tune the last K layers of a model on a manifest's train split.
    Finetune(FinetuneArgs),
    /// Evaluate weights on a manifest's split: Dice and HD95 per organ.
    Evaluate(EvaluateArgs),
    /// Segment one image and write the label map.
    Predict(PredictArgs),
    /// Dice and HD95 between a truth and a predicted label volume.
    Metrics(MetricsArgs),
    /// The three-arm experiment: Model_S, Model_T and Model_ST on a target's test split.
    Experiment(ExperimentArgs),
    /// Training and inference throughput on this machine.
    Bench(BenchArgs),
    /// Run the agent: dial out to the coordinator and work on its tasks until SIGINT/SIGTERM.
    #[command(
        after_help = "Example:\n  site-agent check-data --manifest data/manifest.toml && site-agent run --config site.toml"
    )]
    Run(RunArgs),
    /// Every message this agent sent to the coordinator: UTC time, RPC, size, sha256 and the
    /// message field by field.
    Audit(AuditArgs),
    /// Make this site's private key and a certificate signing request (the key stays here).
    #[command(
        after_help = "Example:\n  site-agent init --name hospital-a --out /etc/fedtune/bundle"
    )]
    Init(ops::InitArgs),
    /// Check the setup before running: config, certificate, proxy, coordinator, TLS and
    /// identity, clock, data, device, disk. One line per check; exit 1 if any fails.
    Doctor(ops::DoctorArgs),
    /// Load test: N light agents (real protocol, one mutual-TLS connection and site
    /// certificate each) with a fixed fake workload, against one coordinator; writes a JSON
    /// report of what they did. Not for production: it runs no model and reads no data.
    #[command(after_help = "Example:
  site-agent simulate --coordinator https://127.0.0.1:50051 --bundles pki/sites --count 100 --seconds 60 --report sim.json")]
    Simulate(ops::SimulateArgs),
    /// Print a shell completion script.
    #[command(
        after_help = "Example:\n  site-agent completions bash > /etc/bash_completion.d/site-agent"
    )]
    Completions(ops::CompletionsArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// site.toml (deploy/site.toml documents every field and its default).
    #[arg(long, env = "FEDTUNE_SITE_CONFIG")]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// site.toml of the agent whose log to read.
    #[arg(long, env = "FEDTUNE_SITE_CONFIG")]
    pub config: PathBuf,
    /// One JSON object per line: the entry (with the encoded message, hex), its UTC time and
    /// the message decoded.
    #[arg(long)]
    pub json: bool,
    /// Check the hash chain, and the log against the newest entry the coordinator was told
    /// of (which finds a cut tail or a rewritten log); exit 1 on any problem.
    #[arg(long)]
    pub verify: bool,
    /// With --verify: check the chain alone, without asking the coordinator.
    #[arg(long, requires = "verify")]
    pub offline: bool,
}

#[derive(Debug, Args)]
pub struct PhantomArgs {
    /// source, target-a or target-b (profiles are documented in the README).
    #[arg(long)]
    pub center: phantom::Center,
    /// Cases to write.
    #[arg(long, default_value_t = 20)]
    pub cases: usize,
    /// Cases in the test split (the last ones); default: a fifth, at least one.
    #[arg(long)]
    pub test: Option<usize>,
    /// Seed of the phantoms (the same seed writes the same files).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Folder to write (images/, labels/, manifest.toml).
    #[arg(long)]
    pub out: PathBuf,
    /// Write a planning-system export instead: one folder per patient with its CT series and
    /// an RTSTRUCT (for trying import-dicom).
    #[arg(long)]
    pub dicom: bool,
}

#[derive(Debug, Args)]
pub struct CheckDataArgs {
    /// The site manifest (manifest.toml).
    #[arg(long)]
    pub manifest: PathBuf,
}

#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// The reference label map (NIfTI).
    #[arg(long)]
    pub truth: PathBuf,
    /// The predicted label map, on the same grid.
    #[arg(long)]
    pub pred: PathBuf,
    /// Label values to score (default: every label present in either volume).
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<u16>>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs a parsed command.
pub fn run(cli: Cli) -> Result<()> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Phantom(a) => phantom_cmd(&a),
        Command::CheckData(a) => check_data(&a),
        Command::ImportDicom(a) => dicom::import_dicom(&a),
        Command::Train(a) => train_cmd(&a, quiet),
        Command::Finetune(a) => finetune_cmd(&a, quiet),
        Command::Evaluate(a) => evaluate_cmd(&a),
        Command::Predict(a) => predict_cmd(&a),
        Command::Metrics(a) => metrics_cmd(&a),
        Command::Experiment(a) => experiment_cmd(&a, quiet),
        Command::Bench(a) => bench_cmd(&a),
        Command::Run(a) => run_cmd(&a),
        Command::Audit(a) => audit_cmd(&a),
        Command::Init(a) => ops::init(&a),
        Command::Doctor(a) => ops::doctor(&a),
        Command::Simulate(a) => ops::simulate(&a, shutdown_signal()),
        Command::Completions(a) => {
            ops::completions(&a);
            Ok(())
        }
    }
}

fn run_cmd(a: &RunArgs) -> Result<()> {
    let cfg = crate::agent::config::SiteConfig::load(&a.config)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(crate::agent::run(cfg, shutdown_signal()))?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn audit_cmd(a: &AuditArgs) -> Result<()> {
    let cfg = crate::agent::config::SiteConfig::load(&a.config)?;
    let (entries, source) = crate::agent::audit::AuditLog::read(&cfg.storage.dir)
        .with_context(|| format!("reading the audit log in {}", cfg.storage.dir.display()))?;
    if a.verify {
        let mut problems = crate::agent::audit::verify(&entries);
        let n = entries.len();
        let mut checked = "hash chain verified".to_owned();
        if !a.offline {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let anchor =
                runtime.block_on(crate::agent::link::Link::audit_anchor(&cfg)).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot ask the coordinator at {} for this site's audit head ({e}); \
                         `--offline` checks the hash chain alone",
                        cfg.coordinator.address
                    )
                })?;
            if anchor.present {
                let seq = anchor.seq;
                problems.extend(crate::agent::audit::check_anchor(&entries, seq, &anchor.head));
                checked = format!(
                    "{checked}, entry {seq} matches the head the coordinator kept ({})",
                    shared::cert::utc(anchor.recorded_unix)
                );
            } else {
                checked = format!("{checked}; the coordinator holds no head for this site yet");
            }
        }
        if problems.is_empty() {
            out(&format!("audit log intact: {n} entries from the {source}, {checked}"));
            return Ok(());
        }
        for p in &problems {
            out(p);
        }
        bail!("the audit log was altered: {} problems in {n} entries", problems.len());
    }
    for e in entries {
        let decoded = e.decoded().unwrap_or_else(|why| format!("(unreadable: {why})"));
        if a.json {
            let mut v = serde_json::to_value(&e)?;
            v["time_utc"] = e.time_utc().into();
            v["decoded"] = decoded.into();
            out(&serde_json::to_string(&v)?);
        } else {
            out(&format!(
                "{:>6} {} {} {} bytes sha256 {}\n       {decoded}",
                e.seq,
                e.time_utc(),
                e.rpc,
                e.bytes,
                e.sha256
            ));
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
pub(crate) fn out(s: &str) {
    println!("{s}");
}

fn phantom_cmd(a: &PhantomArgs) -> Result<()> {
    if a.dicom {
        return dicom::phantom_export(a.center, a.cases, a.seed, &a.out);
    }
    let test = a.test.unwrap_or((a.cases / 5).max(1));
    let m = phantom::write_center(a.center, a.cases, test, a.seed, &a.out)
        .with_context(|| format!("writing phantom center {} to {}", a.center, a.out.display()))?;
    out(&format!(
        "wrote {} {} cases ({} train, {} test) and {}",
        a.cases,
        a.center,
        a.cases - test,
        test,
        m.path.display()
    ));
    Ok(())
}

fn load_manifest(path: &Path) -> Result<Manifest> {
    Manifest::load(path).map_err(anyhow::Error::from)
}

fn check_data(a: &CheckDataArgs) -> Result<()> {
    let m = load_manifest(&a.manifest)?;
    let errors = m.check();
    if !errors.is_empty() {
        for e in &errors {
            tracing::error!("{e}");
        }
        bail!(
            "{} of {} cases failed validation (listed above); fix them and run check-data again",
            errors.len(),
            m.cases.len()
        );
    }
    let train = m.cases_in(Split::Train).count();
    out(&format!(
        "ok: {} cases ({train} train, {} test), {} organs: {}",
        m.cases.len(),
        m.cases.len() - train,
        m.organs.len(),
        m.organs.names().join(", ")
    ));
    Ok(())
}

#[derive(Serialize)]
struct MetricsJson {
    labels: Vec<LabelScore>,
}

fn metrics_cmd(a: &MetricsArgs) -> Result<()> {
    let truth = data::read_labels(&a.truth)?;
    let pred = data::read_labels(&a.pred)?;
    if truth.dims != pred.dims {
        bail!(
            "{} has shape {:?} but {} has shape {:?}; both volumes must be on the same grid",
            a.truth.display(),
            truth.dims,
            a.pred.display(),
            pred.dims
        );
    }
    let labels = a.labels.clone().unwrap_or_else(|| present_labels(&truth, &pred));
    let scores = score_labels(&truth, &pred, &labels)?;
    if a.json {
        out(&serde_json::to_string(&MetricsJson { labels: scores })?);
    } else {
        out(&format!("{:>6} {:>8} {:>10}", "label", "dice", "hd95_mm"));
        for s in scores {
            let hd = s.hd95_mm.map_or("undefined".to_owned(), |h| format!("{h:.3}"));
            out(&format!("{:>6} {:>8.4} {:>10}", s.label, s.dice, hd));
        }
    }
    Ok(())
}
