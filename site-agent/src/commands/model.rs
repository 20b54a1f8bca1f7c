//! The commands that run the model on a manifest or an image: `train`, `finetune`, `evaluate`,
//! `predict`, with `--device` and the training flags they share.

use std::path::{Path, PathBuf};

use crate::data::{self, Manifest, Split};
use crate::model::{ModelConfig, Net};
use crate::weights;
use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::{Args, ValueEnum};

use super::{dicom, load_manifest, out};
use crate::evaluate::{CaseScores, evaluate, predict};
use crate::progress::TrainProgress;
use crate::train::{SliceSet, TrainOptions, train};

/// `--device`, shared by every command that computes.
#[derive(Debug, Args)]
pub struct DeviceArg {
    /// Where to compute: auto (the first CUDA GPU when this build has CUDA and the driver shows
    /// one, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", env = "FEDTUNE_DEVICE")]
    pub device: crate::device::DeviceChoice,
}

impl DeviceArg {
    /// Opens the device, logging which one and why.
    pub fn select(&self) -> Result<Device> {
        let s = self.device.select()?;
        tracing::info!(device = %s.info, "compute device");
        Ok(s.device)
    }
}

/// Training hyperparameters shared by `train` and `finetune`.
#[derive(Debug, Args)]
pub struct TrainFlags {
    /// Passes over the training slices.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Slices per optimizer step (at least 2: batch norm).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Peak learning rate (AdamW, cosine decay to 5 %).
    #[arg(long, default_value_t = 1e-2)]
    pub lr: f64,
    /// Seed of initialisation and shuffling (runs are reproducible on the CPU).
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
    /// The site manifest; its train split is used.
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
    /// The site manifest; its train split is used.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Weights to start from.
    #[arg(long)]
    pub base: PathBuf,
    /// Train the last K layers; default: the paper's share (10 of 103, rounded up).
    #[arg(long)]
    pub trainable_layers: Option<usize>,
    /// Output weights file (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub train: TrainFlags,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// The site manifest.
    #[arg(long)]
    pub manifest: PathBuf,
    /// The weights to score.
    #[arg(long)]
    pub weights: PathBuf,
    /// Which split to score.
    #[arg(long, value_enum, default_value_t = SplitArg::Test)]
    pub split: SplitArg,
    /// Per-case scores (by case index) as JSON instead of the table.
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
    /// The weights to segment with.
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

pub(super) fn train_cmd(a: &TrainArgs, quiet: bool) -> Result<()> {
    let m = load_manifest(&a.manifest)?;
    let config = ModelConfig::preset(&a.config)?;
    let opts = a.train.options();
    let net = Net::new(&config, &m.organs, opts.seed, &a.device.select()?)?;
    train_and_save(&net, net.num_layers(), &m, &opts, None, &a.out, quiet)
}

pub(super) fn finetune_cmd(a: &FinetuneArgs, quiet: bool) -> Result<()> {
    let m = load_manifest(&a.manifest)?;
    let (net, manifest, sha) = weights::load(&a.base, &a.device.select()?)?;
    weights::check_compatible(&manifest, &m.organs, None).with_context(|| {
        format!("base weights {} against {}", a.base.display(), a.manifest.display())
    })?;
    let k = a.trainable_layers.unwrap_or_else(|| manifest.config.default_trainable_layers());
    train_and_save(&net, k, &m, &a.train.options(), Some(sha), &a.out, quiet)
}

pub(super) fn evaluate_cmd(a: &EvaluateArgs) -> Result<()> {
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

pub(super) fn predict_cmd(a: &PredictArgs) -> Result<()> {
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
