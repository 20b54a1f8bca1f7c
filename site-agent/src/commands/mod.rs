//! The `site-agent` subcommands: flags (clap) and what each one does.

mod dicom;
mod measure;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use shared::data::{self, Manifest, Split, phantom};
use shared::metrics::{LabelScore, present_labels, score_labels};
use shared::model::{ModelConfig, Net};
use shared::weights;

use crate::evaluate::{CaseScores, evaluate, predict};
use crate::progress::TrainProgress;
use crate::train::{SliceSet, TrainOptions, train};
use measure::{BenchArgs, ExperimentArgs, bench_cmd, experiment_cmd};

/// `--device`, shared by every command that computes.
#[derive(Debug, Args)]
pub struct DeviceArg {
    /// Where to compute: auto (the first CUDA GPU when this build has CUDA and the driver shows
    /// one, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", env = "FEDTUNE_DEVICE")]
    pub device: shared::device::DeviceChoice,
}

impl DeviceArg {
    /// Opens the device, logging which one and why.
    pub fn select(&self) -> Result<Device> {
        let s = self.device.select()?;
        tracing::info!(device = %s.info, "compute device");
        Ok(s.device)
    }
}

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
    Run(RunArgs),
    /// Every message this agent sent to the coordinator.
    Audit(AuditArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// site.toml (README: every field and its default).
    #[arg(long)]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// site.toml of the agent whose log to read.
    #[arg(long)]
    pub config: PathBuf,
    /// One JSON object per line, with the encoded message.
    #[arg(long)]
    pub json: bool,
    /// Check the hash chain; exit 1 if an entry was altered or removed.
    #[arg(long)]
    pub verify: bool,
}

#[derive(Debug, Args)]
pub struct PhantomArgs {
    /// source, target-a or target-b (profiles are documented in the README).
    #[arg(long)]
    pub center: phantom::Center,
    #[arg(long, default_value_t = 20)]
    pub cases: usize,
    /// Cases in the test split (the last ones); default: a fifth, at least one.
    #[arg(long)]
    pub test: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long)]
    pub out: PathBuf,
    /// Write a planning-system export instead: one folder per patient with its CT series and
    /// an RTSTRUCT (for trying import-dicom).
    #[arg(long)]
    pub dicom: bool,
}

#[derive(Debug, Args)]
pub struct CheckDataArgs {
    #[arg(long)]
    pub manifest: PathBuf,
}

/// Training hyperparameters shared by `train` and `finetune`.
#[derive(Debug, Args)]
pub struct TrainFlags {
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1e-2)]
    pub lr: f64,
    #[arg(long, default_value_t = 17)]
    pub seed: u64,
    /// Random intensity scale and shift per batch (turns the frozen-prefix cache off).
    #[arg(long)]
    pub augment: bool,
    /// Recompute the frozen prefix every step instead of caching its output.
    #[arg(long)]
    pub no_cache: bool,
}

impl TrainFlags {
    fn options(&self) -> TrainOptions {
        TrainOptions {
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.lr,
            seed: self.seed,
            augment: self.augment,
            cache: !self.no_cache,
            ..Default::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[arg(long)]
    pub manifest: PathBuf,
    /// Model config: tiny, small or resnet103.
    #[arg(long, default_value = "small")]
    pub config: String,
    /// Output weights file (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub train: TrainFlags,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    #[arg(long)]
    pub manifest: PathBuf,
    /// Weights to start from.
    #[arg(long)]
    pub base: PathBuf,
    /// Train the last K layers; default: the paper's share (10 of 103, rounded up).
    #[arg(long)]
    pub trainable_layers: Option<usize>,
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub train: TrainFlags,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(Debug, Args)]
pub struct EvaluateArgs {
    #[arg(long)]
    pub manifest: PathBuf,
    #[arg(long)]
    pub weights: PathBuf,
    /// Which split to score.
    #[arg(long, value_enum, default_value_t = SplitArg::Test)]
    pub split: SplitArg,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SplitArg {
    Train,
    Test,
}

#[derive(Debug, Args)]
pub struct PredictArgs {
    #[arg(long)]
    pub weights: PathBuf,
    /// A NIfTI image, or the folder of one DICOM CT series.
    #[arg(long)]
    pub image: PathBuf,
    /// Output label map (.nii or .nii.gz), on the input's own grid and header (for DICOM
    /// input: the grid import-dicom writes).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the predicted organs as a DICOM RTSTRUCT on the CT (DICOM input only).
    #[arg(long)]
    pub rtstruct_out: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(Debug, Args)]
pub struct MetricsArgs {
    #[arg(long)]
    pub truth: PathBuf,
    #[arg(long)]
    pub pred: PathBuf,
    /// Label values to score (default: every label present in either volume).
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<u16>>,
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
        let problems = crate::agent::audit::verify(&entries);
        let n = entries.len();
        if problems.is_empty() {
            out(&format!("audit log intact: {n} entries from the {source}, hash chain verified"));
            return Ok(());
        }
        for p in &problems {
            out(p);
        }
        bail!("the audit log was altered: {} problems in {n} entries", problems.len());
    }
    for e in entries {
        if a.json {
            out(&serde_json::to_string(&e)?);
        } else {
            let t = e.time_ms as f64 / 1000.0;
            out(&format!(
                "{:>6} {t:>16.3} {:<40} {:>8} bytes  sha256 {}",
                e.seq, e.rpc, e.bytes, e.sha256
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

fn train_and_save(
    net: &Net,
    k: usize,
    manifest: &Manifest,
    opts: &TrainOptions,
    parent: Option<String>,
    out_path: &Path,
    quiet: bool,
) -> Result<()> {
    let data = manifest.load_split(Split::Train)?;
    let slices = SliceSet::from_dataset(&data, net)?;
    let mut bar = TrainProgress::new("train", opts.epochs, quiet);
    let report = train(net, k, &slices, opts, &mut |e| bar.on_event(e))?;
    bar.finish();
    let prov = report.provenance(parent, net.num_layers(), opts);
    let sha = weights::save(net, &prov, out_path)?;
    let hp = out_path.with_extension("train.json");
    let record = serde_json::json!({ "options": opts, "report": report, "sha256": sha });
    std::fs::write(&hp, serde_json::to_string_pretty(&record)?)
        .with_context(|| format!("writing {}", hp.display()))?;
    out(&format!(
        "trained {k} of {} layers on {} slices in {:.1} s (final loss {:.4}); wrote {} (sha256 {sha})",
        net.num_layers(),
        report.slices,
        report.seconds,
        report.epoch_losses.last().copied().unwrap_or(f64::NAN),
        out_path.display()
    ));
    Ok(())
}

fn train_cmd(a: &TrainArgs, quiet: bool) -> Result<()> {
    let m = load_manifest(&a.manifest)?;
    let config = ModelConfig::preset(&a.config)?;
    let opts = a.train.options();
    let net = Net::new(&config, &m.organs, opts.seed, &a.device.select()?)?;
    train_and_save(&net, net.num_layers(), &m, &opts, None, &a.out, quiet)
}

fn finetune_cmd(a: &FinetuneArgs, quiet: bool) -> Result<()> {
    let m = load_manifest(&a.manifest)?;
    let (net, manifest, sha) = weights::load(&a.base, &a.device.select()?)?;
    weights::check_compatible(&manifest, &m.organs, None).with_context(|| {
        format!("base weights {} against {}", a.base.display(), a.manifest.display())
    })?;
    let k = a.trainable_layers.unwrap_or_else(|| manifest.config.default_trainable_layers());
    train_and_save(&net, k, &m, &a.train.options(), Some(sha), &a.out, quiet)
}

fn evaluate_cmd(a: &EvaluateArgs) -> Result<()> {
    let m = load_manifest(&a.manifest)?;
    let (net, manifest, _) = weights::load(&a.weights, &a.device.select()?)?;
    weights::check_compatible(&manifest, &m.organs, None)?;
    let split = match a.split {
        SplitArg::Train => Split::Train,
        SplitArg::Test => Split::Test,
    };
    let data = m.load_split(split)?;
    let cases: Vec<CaseScores> = evaluate(&net, &data)?;
    if a.json {
        out(&serde_json::to_string_pretty(&serde_json::json!({ "cases": cases }))?);
        return Ok(());
    }
    out(&format!("{:<18} {:>15} {:>17}  n", "organ", "Dice", "HD95 (mm)"));
    for (label, organ) in m.organs.iter() {
        let dice = crate::evaluate::dice_of(&cases, label);
        let hd: Vec<f64> = cases
            .iter()
            .filter_map(|c| c.scores.iter().find(|s| s.label == label).and_then(|s| s.hd95_mm))
            .collect();
        let d = shared::metrics::stats::summary(&dice);
        let h = shared::metrics::stats::summary(&hd);
        let fmt = |s: Option<shared::metrics::stats::Summary>, p: usize| match s {
            Some(s) => format!("{:.p$} ± {:.p$}", s.mean, s.sd.unwrap_or(0.0)),
            None => "-".into(),
        };
        out(&format!("{organ:<18} {:>15} {:>17}  {}", fmt(d, 3), fmt(h, 2), dice.len()));
    }
    Ok(())
}

fn predict_cmd(a: &PredictArgs) -> Result<()> {
    let (net, _, _) = weights::load(&a.weights, &a.device.select()?)?;
    if a.image.is_dir() {
        let input = dicom::read_dicom_input(&a.image)?;
        let labels = predict(&net, &input.image)?;
        data::write_labels(&a.out, &labels)?;
        out(&format!("wrote {}", a.out.display()));
        if let Some(rt) = &a.rtstruct_out {
            dicom::write_prediction_rtstruct(&input, &labels, net.organs(), rt)?;
        }
        return Ok(());
    }
    if let Some(rt) = &a.rtstruct_out {
        bail!(
            "--rtstruct-out {}: an RTSTRUCT references the CT's DICOM slices, so give --image \
             the folder of the DICOM CT series rather than a NIfTI file",
            rt.display()
        );
    }
    let (image, source) = data::read_image_with_source(&a.image)?;
    let labels = predict(&net, &image)?;
    data::write_labels_like(&a.out, &labels, &source)?;
    out(&format!("wrote {} (on the grid and header of {})", a.out.display(), a.image.display()));
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
