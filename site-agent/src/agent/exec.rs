//! Running one task with the engine, off the async runtime: policy check, data, weights,
//! training, evaluation, and the result message (scores by case index only).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use proto::pb;
use shared::data::{Manifest, Split};
use shared::model::{ModelConfig, Net};
use shared::weights;

use super::config::{Policy, SiteConfig};
use crate::evaluate::evaluate;
use crate::train::{SliceSet, TrainError, TrainEvent, TrainOptions, train_until};

/// What a task ended with.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Result(pb::TaskResult),
    Failure(pb::FailureCode),
    Refusal(pb::RefusalCode),
}

impl Outcome {
    pub fn into_proto(self) -> pb::submit_result_request::Outcome {
        use pb::submit_result_request::Outcome as O;
        match self {
            Outcome::Result(r) => O::Result(r),
            Outcome::Failure(c) => O::Failure(c as i32),
            Outcome::Refusal(c) => O::Refusal(c as i32),
        }
    }
}

pub fn kind_name(kind: pb::TaskKind) -> &'static str {
    match kind {
        pb::TaskKind::Evaluate => "evaluate",
        pb::TaskKind::Finetune => "finetune",
        pb::TaskKind::Train => "train",
        pb::TaskKind::Unspecified => "unspecified",
    }
}

/// Rough seconds per training slice per epoch on this machine's CPU, for the `max_hours`
/// check; deliberately generous (the `small` config's measured rate is ~25 ms per slice).
const SECONDS_PER_SLICE_EPOCH: f64 = 0.05;

/// The policy's verdict on a task, before any work: `Some(reason)` refuses it.
pub fn check_policy(
    policy: &Policy,
    spec: &pb::TaskSpec,
    train_slices: usize,
) -> Option<pb::RefusalCode> {
    let kind = pb::TaskKind::try_from(spec.kind).unwrap_or(pb::TaskKind::Unspecified);
    if !policy.allowed_tasks.iter().any(|k| k == kind_name(kind)) {
        return Some(pb::RefusalCode::KindNotAllowed);
    }
    let epochs = effective_epochs(spec);
    if kind != pb::TaskKind::Evaluate {
        if epochs > policy.max_epochs {
            return Some(pb::RefusalCode::TooManyEpochs);
        }
        let hours = epochs as f64 * train_slices as f64 * SECONDS_PER_SLICE_EPOCH / 3600.0;
        if hours > policy.max_hours {
            return Some(pb::RefusalCode::TooLong);
        }
    }
    None
}

fn effective_epochs(spec: &pb::TaskSpec) -> u32 {
    if spec.epochs == 0 { TrainOptions::default().epochs as u32 } else { spec.epochs }
}

fn train_options(spec: &pb::TaskSpec) -> TrainOptions {
    let d = TrainOptions::default();
    TrainOptions {
        epochs: effective_epochs(spec) as usize,
        batch_size: if spec.batch_size == 0 { d.batch_size } else { spec.batch_size as usize },
        learning_rate: if spec.learning_rate > 0.0 { spec.learning_rate } else { d.learning_rate },
        seed: if spec.seed == 0 { d.seed } else { spec.seed },
        ..d
    }
}

/// Everything a task needs from the site.
#[derive(Debug)]
pub struct Site {
    pub manifest: Manifest,
    pub storage: PathBuf,
    pub policy: Policy,
    /// Smallest and largest voxel spacing per axis over the site's images (read at start).
    pub spacing_range: ([f64; 3], [f64; 3]),
}

impl Site {
    pub fn open(cfg: &SiteConfig) -> Result<Self, shared::data::DataError> {
        let manifest = Manifest::load(&cfg.data.manifest)?;
        let (mut lo, mut hi) = ([f64::INFINITY; 3], [0f64; 3]);
        for case in &manifest.cases {
            // Unreadable cases are reported when a task validates its split, not here.
            if let Ok(image) = shared::data::read_image(&case.image) {
                for i in 0..3 {
                    lo[i] = lo[i].min(f64::from(image.spacing[i]));
                    hi[i] = hi[i].max(f64::from(image.spacing[i]));
                }
            }
        }
        Ok(Self {
            manifest,
            storage: cfg.storage.dir.clone(),
            policy: cfg.policy.clone(),
            spacing_range: (lo, hi),
        })
    }

    pub fn train_cases(&self) -> usize {
        self.manifest.cases_in(Split::Train).count()
    }
}

/// Runs a task whose base weights (if any) are at `base`. `progress` gets phase and training
/// events; `stop` is polled after every optimizer step.
pub fn run_task(
    site: &Site,
    task: &pb::Task,
    base: Option<&Path>,
    progress: &mut dyn FnMut(pb::Progress),
    stop: &dyn Fn() -> bool,
) -> Outcome {
    let spec = task.spec.clone().unwrap_or_default();
    let kind = pb::TaskKind::try_from(spec.kind).unwrap_or(pb::TaskKind::Unspecified);
    let device = Device::Cpu;
    let organs = &site.manifest.organs;
    let phase = |name: &str, fraction: f64| pb::Progress {
        phase: name.into(),
        fraction,
        ..Default::default()
    };

    // The base model, or a new one for `train`.
    let (net, parent) = match (kind, base) {
        (pb::TaskKind::Train, _) => {
            let name = if spec.config.is_empty() { "small" } else { spec.config.as_str() };
            let config = match ModelConfig::preset(name) {
                Ok(c) => c,
                Err(_) => return Outcome::Failure(pb::FailureCode::ModelMismatch),
            };
            match Net::new(&config, organs, train_options(&spec).seed, &device) {
                Ok(n) => (n, None),
                Err(e) => {
                    tracing::error!(error = %e, "building the model");
                    return Outcome::Failure(pb::FailureCode::Internal);
                }
            }
        }
        (_, Some(path)) => match weights::load(path, &device) {
            Ok((net, manifest, sha)) => {
                if &manifest.organs != organs {
                    tracing::error!(
                        model = ?manifest.organs.names(),
                        site = ?organs.names(),
                        "the base model's organ map differs from this site's manifest"
                    );
                    return Outcome::Failure(pb::FailureCode::ModelMismatch);
                }
                (net, Some(sha))
            }
            Err(e) => {
                tracing::error!(error = %e, "loading the base weights");
                return Outcome::Failure(pb::FailureCode::ModelMismatch);
            }
        },
        (_, None) => return Outcome::Failure(pb::FailureCode::Internal),
    };

    // Validate and load the data (details stay in this site's log, never in the result).
    progress(phase("load", 0.05));
    let test = match site.manifest.load_split(Split::Test) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "the test split failed validation");
            return Outcome::Failure(pb::FailureCode::DataInvalid);
        }
    };

    let mut result = pb::TaskResult { device: "cpu".into(), ..Default::default() };
    if kind != pb::TaskKind::Evaluate {
        let train = match site.manifest.load_split(Split::Train) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "the training split failed validation");
                return Outcome::Failure(pb::FailureCode::DataInvalid);
            }
        };
        let k = match kind {
            pb::TaskKind::Finetune => spec.trainable_layers as usize,
            _ => net.num_layers(),
        };
        if k == 0 || k > net.num_layers() {
            return Outcome::Failure(pb::FailureCode::ModelMismatch);
        }
        let opts = train_options(&spec);
        let slices = match SliceSet::from_dataset(&train, &net) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "preparing training slices");
                return Outcome::Failure(pb::FailureCode::Internal);
            }
        };
        let epochs = opts.epochs as u32;
        let mut on_event = |e: &TrainEvent| match *e {
            TrainEvent::Caching { done, total } => progress(pb::Progress {
                phase: "cache".into(),
                fraction: 0.1 * done as f64 / total.max(1) as f64,
                epochs,
                ..Default::default()
            }),
            TrainEvent::Step { epoch, step, steps_per_epoch, loss } => progress(pb::Progress {
                phase: "train".into(),
                epoch: epoch as u32 + 1,
                epochs,
                loss,
                fraction: 0.1
                    + 0.8 * (epoch as f64 + (step + 1) as f64 / steps_per_epoch.max(1) as f64)
                        / f64::from(epochs.max(1)),
            }),
            TrainEvent::Epoch { .. } => {}
        };
        let report = match train_until(&net, k, &slices, &opts, &mut on_event, stop) {
            Ok(r) => r,
            Err(TrainError::Stopped) => return Outcome::Failure(pb::FailureCode::AgentShutdown),
            Err(TrainError::Diverged(..)) => return Outcome::Failure(pb::FailureCode::Diverged),
            Err(e) => {
                tracing::error!(error = %e, "training");
                return Outcome::Failure(pb::FailureCode::Internal);
            }
        };
        let prov = report.provenance(parent, net.num_layers(), &opts);
        let out = site.storage.join("weights").join(format!("{}.safetensors", task.task_id));
        if let Some(dir) = out.parent()
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            tracing::error!(error = %e, dir = %dir.display(), "creating the weights folder");
            return Outcome::Failure(pb::FailureCode::Internal);
        }
        match weights::save(&net, &prov, &out) {
            Ok(sha) => {
                tracing::info!(path = %out.display(), "trained weights kept at this site");
                result.weights_sha256 = sha;
            }
            Err(e) => {
                tracing::error!(error = %e, "saving the trained weights");
                return Outcome::Failure(pb::FailureCode::Internal);
            }
        }
        result.train_seconds = report.seconds;
        result.cache_seconds = report.cache_seconds;
        result.epoch_losses = report.epoch_losses;
        result.train_slices = report.slices as u32;
    }

    progress(phase("evaluate", 0.92));
    let started = Instant::now();
    let cases = match evaluate(&net, &test) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "evaluation");
            return Outcome::Failure(pb::FailureCode::Internal);
        }
    };
    result.eval_seconds = started.elapsed().as_secs_f64();
    result.organs = organs
        .labels()
        .into_iter()
        .map(|label| pb::OrganScores {
            organ: organs.name(label).unwrap_or("?").to_owned(),
            cases: cases
                .iter()
                .filter_map(|c| {
                    c.scores.iter().find(|s| s.label == label).map(|s| pb::CaseScore {
                        case_index: c.case_index as u32,
                        dice: s.dice,
                        hd95_mm: s.hd95_mm,
                    })
                })
                .collect(),
        })
        .collect();
    progress(phase("done", 1.0));
    Outcome::Result(result)
}
