//! The published experiment on one machine: Model_S trained on the source's train split,
//! Model_T on the target's train split, Model_ST fine-tuned from Model_S with the last k layers
//! on the target's train split; all three evaluated on the target's test split.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::data::{Manifest, Split};
use crate::model::{ModelConfig, Net};
use crate::weights::{self, Provenance};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use shared::metrics::stats::{self, Summary, TTest, Wilcoxon, WilcoxonMethod};
use shared::organs::OrganMap;

use crate::evaluate::{CaseScores, dice_of, evaluate};
use crate::progress::TrainProgress;
use crate::train::{SliceSet, TrainOptions, TrainReport, train};

/// What the experiment runs.
#[derive(Clone, Debug)]
pub struct ExperimentOptions {
    pub config: ModelConfig,
    /// Layers fine-tuned for Model_ST; `None` = the paper's share (10 of 103, rounded up).
    pub trainable_layers: Option<usize>,
    /// Training of Model_S (the source center's model, in the paper trained on six times more
    /// cases than Model_T).
    pub source_train: TrainOptions,
    /// Training of Model_T.
    pub train: TrainOptions,
    /// Fine-tuning of Model_ST.
    pub finetune: TrainOptions,
    /// Where to write the three weights files and `results.json`.
    pub out: Option<PathBuf>,
    /// Where to train and evaluate.
    pub device: Device,
    pub quiet: bool,
}

/// One arm's training and evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Arm {
    pub name: String,
    pub train: TrainReport,
    pub weights_sha256: String,
    /// Per test case (by index in the target's test split), per organ.
    pub cases: Vec<CaseScores>,
}

/// Per-organ comparison of the arms.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrganRow {
    pub label: u16,
    pub organ: String,
    /// Dice summaries for S, T, ST.
    pub dice: [Option<Summary>; 3],
    pub st_vs_s_wilcoxon: Option<Wilcoxon>,
    pub st_vs_t_wilcoxon: Option<Wilcoxon>,
    pub st_vs_s_ttest: Option<TTest>,
    pub st_vs_t_ttest: Option<TTest>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExperimentResult {
    pub config: ModelConfig,
    pub organs: OrganMap,
    pub trainable_layers: usize,
    pub total_layers: usize,
    /// Model_S, Model_T, Model_ST.
    pub arms: Vec<Arm>,
    pub rows: Vec<OrganRow>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
    #[error(
        "source and target organ maps differ ({source_organs:?} vs {target:?}); both manifests must list the same [organs]"
    )]
    OrganMismatch { source_organs: Vec<String>, target: Vec<String> },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn train_arm(
    name: &str,
    net: &Net,
    k: usize,
    data: &SliceSet,
    opts: &TrainOptions,
    quiet: bool,
) -> Result<TrainReport, ExperimentError> {
    let _span = tracing::info_span!("arm", name).entered();
    let mut bar = TrainProgress::new(name, opts.epochs, quiet);
    let report = train(net, k, data, opts, &mut |e| bar.on_event(e))?;
    bar.finish();
    tracing::info!(
        arm = name,
        seconds = report.seconds,
        final_loss = report.epoch_losses.last().copied().unwrap_or(f64::NAN),
        "trained"
    );
    Ok(report)
}

/// Runs the experiment.
pub fn run(
    source: &Manifest,
    target: &Manifest,
    opts: &ExperimentOptions,
) -> Result<ExperimentResult, ExperimentError> {
    if source.organs != target.organs {
        return Err(ExperimentError::OrganMismatch {
            source_organs: source.organs.names().iter().map(|s| s.to_string()).collect(),
            target: target.organs.names().iter().map(|s| s.to_string()).collect(),
        });
    }
    let organs = &source.organs;
    let device = opts.device.clone();
    // Validate every case before any work.
    let source_train = source.load_split(Split::Train)?;
    let target_train = target.load_split(Split::Train)?;
    let target_test = target.load_split(Split::Test)?;
    let layers = opts.config.num_layers();
    let k = opts.trainable_layers.unwrap_or_else(|| opts.config.default_trainable_layers());

    let save = |net: &Net, prov: &Provenance, file: &str| -> Result<String, ExperimentError> {
        match &opts.out {
            Some(dir) => Ok(weights::save(net, prov, &dir.join(file))?),
            None => Ok(weights::sha256_hex(&weights::to_bytes(net, prov)?)),
        }
    };
    if let Some(dir) = &opts.out {
        std::fs::create_dir_all(dir)
            .map_err(|source| ExperimentError::Write { path: dir.clone(), source })?;
    }

    // Model_S: from scratch on the source.
    let net_s = Net::new(&opts.config, organs, opts.source_train.seed, &device)?;
    let data_s = SliceSet::from_dataset(&source_train, &net_s)?;
    let rep_s = train_arm("Model_S", &net_s, layers, &data_s, &opts.source_train, opts.quiet)?;
    drop(data_s);
    let prov_s = Provenance {
        epochs: opts.source_train.epochs,
        seed: opts.source_train.seed,
        site: Some("source".into()),
        train_slices: rep_s.slices,
        federated: None,
        ..Default::default()
    };
    let bytes_s = weights::to_bytes(&net_s, &prov_s)?;
    let sha_s = save(&net_s, &prov_s, "model_s.safetensors")?;

    // Model_T: from scratch on the target.
    let net_t = Net::new(&opts.config, organs, opts.train.seed, &device)?;
    let data_t = SliceSet::from_dataset(&target_train, &net_t)?;
    let rep_t = train_arm("Model_T", &net_t, layers, &data_t, &opts.train, opts.quiet)?;
    let prov_t = Provenance {
        epochs: opts.train.epochs,
        seed: opts.train.seed,
        site: Some("target".into()),
        train_slices: rep_t.slices,
        federated: None,
        ..Default::default()
    };
    let sha_t = save(&net_t, &prov_t, "model_t.safetensors")?;

    // Model_ST: Model_S's weights, last k layers fine-tuned on the target.
    let (net_st, _, _) = weights::from_bytes(&bytes_s, &device)?;
    let rep_st = train_arm("Model_ST", &net_st, k, &data_t, &opts.finetune, opts.quiet)?;
    let prov_st = Provenance {
        parent_sha256: Some(sha_s.clone()),
        trainable_layers: Some(k),
        epochs: opts.finetune.epochs,
        seed: opts.finetune.seed,
        site: Some("target".into()),
        train_slices: rep_st.slices,
        federated: None,
    };
    let sha_st = save(&net_st, &prov_st, "model_st.safetensors")?;
    drop(data_t);

    let mut arms = Vec::new();
    for (name, net, rep, sha) in [
        ("Model_S", &net_s, rep_s, sha_s),
        ("Model_T", &net_t, rep_t, sha_t),
        ("Model_ST", &net_st, rep_st, sha_st),
    ] {
        let cases = evaluate(net, &target_test)?;
        arms.push(Arm { name: name.into(), train: rep, weights_sha256: sha, cases });
    }
    let rows = compare(organs, &arms);
    let result = ExperimentResult {
        config: opts.config.clone(),
        organs: organs.clone(),
        trainable_layers: k,
        total_layers: layers,
        arms,
        rows,
    };
    if let Some(dir) = &opts.out {
        let path = dir.join("results.json");
        let json = serde_json::to_string_pretty(&result).expect("results serialise");
        std::fs::write(&path, json).map_err(|source| ExperimentError::Write { path, source })?;
    }
    Ok(result)
}

/// Per-organ summaries and paired tests between the arms (S, T, ST order).
pub fn compare(organs: &OrganMap, arms: &[Arm]) -> Vec<OrganRow> {
    organs
        .iter()
        .map(|(label, organ)| {
            let d: Vec<Vec<f64>> = arms.iter().map(|a| dice_of(&a.cases, label)).collect();
            OrganRow {
                label,
                organ: organ.to_owned(),
                dice: [stats::summary(&d[0]), stats::summary(&d[1]), stats::summary(&d[2])],
                st_vs_s_wilcoxon: stats::wilcoxon(&d[2], &d[0]).ok(),
                st_vs_t_wilcoxon: stats::wilcoxon(&d[2], &d[1]).ok(),
                st_vs_s_ttest: stats::ttest_rel(&d[2], &d[0]).ok(),
                st_vs_t_ttest: stats::ttest_rel(&d[2], &d[1]).ok(),
            }
        })
        .collect()
}

fn fmt_summary(s: &Option<Summary>) -> String {
    match s {
        Some(s) => format!("{:.3} ± {:.3}", s.mean, s.sd.unwrap_or(0.0)),
        None => "-".into(),
    }
}

fn fmt_p(w: &Option<Wilcoxon>, t: &Option<TTest>) -> String {
    let w = match w {
        Some(w) => {
            let mark = match w.method {
                WilcoxonMethod::Exact => "e",
                WilcoxonMethod::Asymptotic => "a",
            };
            format!("{:.4}{mark}", w.p_value)
        }
        None => "-".into(),
    };
    let t = match t {
        Some(t) if t.p_value.is_finite() => format!("{:.4}", t.p_value),
        _ => "-".into(),
    };
    format!("{w:>8} {t:>7}")
}

/// The three-arm table: Dice mean ± SD per organ, paired p-values, and training time per arm.
pub fn render_table(r: &ExperimentResult) -> String {
    let mut s = String::new();
    let n = r.rows.first().and_then(|row| row.dice[0].as_ref()).map_or(0, |d| d.n);
    let _ = writeln!(
        s,
        "Dice on the target's test split (n = {n} cases); Model_ST = last {} of {} layers fine-tuned",
        r.trainable_layers, r.total_layers
    );
    let _ = writeln!(
        s,
        "{:<16} {:>15} {:>15} {:>15}  {:>16}  {:>16}",
        "organ", "Model_S", "Model_T", "Model_ST", "ST vs S: W    t", "ST vs T: W    t"
    );
    for row in &r.rows {
        let _ = writeln!(
            s,
            "{:<16} {:>15} {:>15} {:>15}  {}  {}",
            row.organ,
            fmt_summary(&row.dice[0]),
            fmt_summary(&row.dice[1]),
            fmt_summary(&row.dice[2]),
            fmt_p(&row.st_vs_s_wilcoxon, &row.st_vs_s_ttest),
            fmt_p(&row.st_vs_t_wilcoxon, &row.st_vs_t_ttest),
        );
    }
    let _ = writeln!(
        s,
        "p-values: W = paired Wilcoxon signed-rank, two-sided (e = exact, a = normal approximation); t = paired t-test"
    );
    for arm in &r.arms {
        let _ = writeln!(
            s,
            "training {:<9} {:>7.1} s  ({} layers trained, {} slices, {} steps{})",
            arm.name,
            arm.train.seconds,
            arm.train.trainable_layers,
            arm.train.slices,
            arm.train.steps,
            if arm.train.used_cache {
                format!(", frozen-prefix cache built in {:.1} s", arm.train.cache_seconds)
            } else {
                String::new()
            }
        );
    }
    s
}

/// Folder for the demo's generated phantoms and outputs.
pub fn demo_dir(out: Option<&Path>) -> std::io::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match out {
        Some(p) => {
            std::fs::create_dir_all(p)?;
            Ok((p.to_owned(), None))
        }
        None => {
            let t = tempfile::Builder::new().prefix("fedtune-demo-").tempdir()?;
            Ok((t.path().to_owned(), Some(t)))
        }
    }
}
