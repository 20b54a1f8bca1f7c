//! `site-agent experiment` and `site-agent bench`: the three-arm experiment on one machine, and
//! throughput on this machine.

use std::path::PathBuf;

use crate::data::phantom;
use crate::model::ModelConfig;
use anyhow::{Context, Result};
use clap::Args;

use super::{DeviceArg, load_manifest, out};
use crate::experiment::{self, ExperimentOptions};
use crate::train::TrainOptions;

#[derive(Debug, Args)]
pub struct ExperimentArgs {
    /// The source center's manifest.
    #[arg(long, required_unless_present = "demo")]
    pub source: Option<PathBuf>,
    /// The target center's manifest.
    #[arg(long, required_unless_present = "demo")]
    pub target: Option<PathBuf>,
    /// Generate phantom centers (source and target-a) and run on them.
    #[arg(long, conflicts_with_all = ["source", "target"])]
    pub demo: bool,
    /// Model config: tiny, small or resnet103.
    #[arg(long, default_value = "small")]
    pub config: String,
    /// Layers fine-tuned for Model_ST; default: the paper's share (10 of 103, rounded up).
    #[arg(long)]
    pub trainable_layers: Option<usize>,
    /// Epochs for Model_S (the source center's model).
    #[arg(long, default_value_t = 12)]
    pub source_epochs: usize,
    /// Epochs for Model_T.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Epochs for Model_ST.
    #[arg(long, default_value_t = 16)]
    pub finetune_epochs: usize,
    /// Peak learning rate for Model_ST.
    #[arg(long, default_value_t = 1e-2)]
    pub finetune_lr: f64,
    /// Slices per optimizer step, every arm.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Peak learning rate for Model_S and Model_T.
    #[arg(long, default_value_t = 1e-2)]
    pub lr: f64,
    /// Seed of the phantoms (demo), initialisation and shuffling.
    #[arg(long, default_value_t = 17)]
    pub seed: u64,
    /// Demo: source training cases.
    #[arg(long, default_value_t = 6)]
    pub source_cases: usize,
    /// Demo: target training cases.
    #[arg(long, default_value_t = 4)]
    pub target_train_cases: usize,
    /// Demo: target test cases.
    #[arg(long, default_value_t = 8)]
    pub target_test_cases: usize,
    /// Folder for weights and results.json (the demo also writes its phantoms there);
    /// default for the demo: a temporary folder, removed afterwards.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub device: DeviceArg,
    /// Model config: tiny, small or resnet103.
    #[arg(long, default_value = "tiny")]
    pub config: String,
    /// Slices per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// In-plane size; default: the config's.
    #[arg(long)]
    pub size: Option<usize>,
    /// Timed steps per figure.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Timed runs per figure; each figure is the best of them (noise on a shared machine only
    /// ever slows a run down).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeat: u32,
    /// Layers trained in the tail runs; default: the config's share (10 of 103).
    #[arg(long)]
    pub trainable_layers: Option<usize>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also print where each figure's timed runs spent their time, per CPU op and layer shape.
    #[arg(long)]
    pub profile: bool,
}

pub(super) fn experiment_cmd(a: &ExperimentArgs, quiet: bool) -> Result<()> {
    let config = ModelConfig::preset(&a.config)?;
    let train = TrainOptions {
        epochs: a.epochs,
        batch_size: a.batch_size,
        learning_rate: a.lr,
        seed: a.seed,
        ..Default::default()
    };
    let finetune =
        TrainOptions { epochs: a.finetune_epochs, learning_rate: a.finetune_lr, ..train.clone() };
    let source_train = TrainOptions { epochs: a.source_epochs, ..train.clone() };
    let (source, target, _tmp, out_dir) = if a.demo {
        let (dir, tmp) =
            experiment::demo_dir(a.out.as_deref()).context("creating the demo folder")?;
        tracing::info!(folder = %dir.display(), "generating phantom centers");
        let src = phantom::write_center(
            phantom::Center::Source,
            a.source_cases + 1,
            1,
            a.seed,
            &dir.join("source"),
        )?;
        let tgt = phantom::write_center(
            phantom::Center::TargetA,
            a.target_train_cases + a.target_test_cases,
            a.target_test_cases,
            a.seed,
            &dir.join("target-a"),
        )?;
        let out_dir = a.out.as_ref().map(|_| dir.join("results"));
        (src, tgt, tmp, out_dir)
    } else {
        let s = a.source.as_deref().expect("clap requires --source without --demo");
        let t = a.target.as_deref().expect("clap requires --target without --demo");
        (load_manifest(s)?, load_manifest(t)?, None, a.out.clone())
    };
    let opts = ExperimentOptions {
        config,
        trainable_layers: a.trainable_layers,
        source_train,
        train,
        finetune,
        out: out_dir.clone(),
        quiet,
        device: a.device.select()?,
    };
    let result = experiment::run(&source, &target, &opts)?;
    if a.json {
        out(&serde_json::to_string_pretty(&result)?);
    } else {
        out(&experiment::render_table(&result));
        if let Some(dir) = out_dir {
            out(&format!("weights and results.json in {}", dir.display()));
        }
    }
    Ok(())
}

pub(super) fn bench_cmd(a: &BenchArgs) -> Result<()> {
    let selected = a.device.device.select()?;
    let mut config = ModelConfig::preset(&a.config)?;
    if let Some(s) = a.size {
        config.image_size = s;
        config.validate()?;
    }
    let r = crate::bench::run(&crate::bench::BenchOptions {
        config,
        batch: a.batch,
        steps: a.steps,
        repeat: a.repeat as usize,
        trainable_layers: a.trainable_layers,
        device: selected.device,
        device_name: selected.info.to_string(),
        profile: a.profile,
    })?;
    if a.json {
        out(&serde_json::to_string(&r)?);
    } else {
        out(&format!(
            "config {} size {} batch {} ({} layers, {} trained in tail runs, {} parameters) on {}",
            r.config, r.size, r.batch, r.layers, r.trainable_layers, r.parameters, r.device
        ));
        out(&format!("full training              {:>9.1} images/s", r.full_train_images_per_s));
        out(&format!("tail, prefix recomputed    {:>9.1} images/s", r.tail_recompute_images_per_s));
        out(&format!("tail, frozen-prefix cache  {:>9.1} images/s", r.tail_cached_images_per_s));
        out(&format!("evaluation                 {:>9.1} slices/s", r.eval_slices_per_s));
        if let Some(m) = r.peak_rss_mib {
            out(&format!("peak memory (host)         {m:>9.0} MiB"));
        }
        if let Some(m) = r.peak_device_mib {
            out(&format!("peak memory (GPU, driver)  {m:>9.0} MiB"));
        }
        for f in r.profile.iter().flatten() {
            out(&format!("\n{}: {:.2} s in the timed runs", f.figure, f.seconds));
            let mut covered = 0.0;
            for op in &f.ops {
                covered += op.seconds;
                let share = 100.0 * op.seconds / f.seconds;
                out(&format!(
                    "  {:<44} {:>6} calls {:>8.3} s {share:>5.1} %",
                    op.op, op.calls, op.seconds
                ));
            }
            let rest = f.seconds - covered;
            out(&format!(
                "  {:<44} {:>12} {rest:>8.3} s {:>5.1} %",
                "other (candle ops, loss, optimizer)",
                "",
                100.0 * rest / f.seconds
            ));
        }
    }
    Ok(())
}
