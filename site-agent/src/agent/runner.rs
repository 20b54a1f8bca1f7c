//! One step of a task: training a model (with progress events and the stop flag) and
//! scoring it on the test split, as the protocol's arm result.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use proto::pb;

use super::policy::effective_epochs;
use super::site::Site;
use crate::data::{Dataset, Split};
use crate::evaluate::evaluate;
use crate::model::Net;
use crate::train::{SliceSet, TrainError, TrainEvent, TrainOptions, train_until};
use crate::weights::{self, WeightsManifest};

/// How running a task ended early: a failure, or a refusal found once the model was known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Ended {
    Failure(pb::FailureCode),
    Refusal(pb::RefusalCode, String),
}

impl From<pb::FailureCode> for Ended {
    fn from(c: pb::FailureCode) -> Self {
        Self::Failure(c)
    }
}

pub(super) fn train_options(spec: &pb::TaskSpec) -> TrainOptions {
    let d = TrainOptions::default();
    TrainOptions {
        epochs: effective_epochs(spec) as usize,
        batch_size: if spec.batch_size == 0 { d.batch_size } else { spec.batch_size as usize },
        learning_rate: if spec.learning_rate > 0.0 { spec.learning_rate } else { d.learning_rate },
        seed: if spec.seed == 0 { d.seed } else { spec.seed },
        ..d
    }
}

/// Where a task's trained weights stay at the site (and, for a transfer source, what is
/// uploaded).
pub fn weights_path(site: &Site, task_id: &str, arm: Option<usize>) -> PathBuf {
    let name = match arm {
        None => format!("{task_id}.safetensors"),
        Some(i) => format!("{task_id}.arm{i}.safetensors"),
    };
    site.storage.join("weights").join(name)
}

/// Where arm `arm`'s trained tail is written for upload.
pub fn tail_path(site: &Site, task_id: &str, arm: usize) -> PathBuf {
    site.storage.join("weights").join(format!("{task_id}.arm{arm}.tail.safetensors"))
}

/// Whether an id the coordinator sent (a task or round id) is safe as part of a file name.
pub fn safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The model files a task's weights were downloaded to, by sha256.
pub type ModelFiles = HashMap<String, PathBuf>;

/// The bytes of the downloaded model `sha256`.
pub(super) fn model_bytes(models: &ModelFiles, sha256: &str) -> Result<Vec<u8>, pb::FailureCode> {
    let path = models.get(sha256).ok_or_else(|| {
        tracing::error!(sha256, "a model the task names was not downloaded");
        pb::FailureCode::Internal
    })?;
    std::fs::read(path).map_err(fail(pb::FailureCode::Internal, "reading downloaded weights"))
}

pub(super) fn load_split(site: &Site, split: Split) -> Result<Dataset, pb::FailureCode> {
    site.manifest.load_split(split).map_err(|e| {
        tracing::error!(error = %e, ?split, "the split failed validation");
        pb::FailureCode::DataInvalid
    })
}

/// Base weights that fit this site's organ map: the net, its manifest and sha256. `known` is
/// the sha256 of weights checked as they were downloaded (not hashed again); without it the
/// bytes are hashed.
pub(super) fn load_base(
    bytes: &[u8],
    site: &Site,
    known: Option<&str>,
) -> Result<(Net, WeightsManifest, String), pb::FailureCode> {
    let loaded = match known {
        Some(sha) => weights::decode(bytes, &site.device).map(|(n, m)| (n, m, sha.to_owned())),
        None => weights::from_bytes(bytes, &site.device),
    };
    let (net, manifest, sha) =
        loaded.map_err(fail(pb::FailureCode::ModelMismatch, "loading the base weights"))?;
    if manifest.organs != site.manifest.organs {
        tracing::error!(
            model = ?manifest.organs.names(),
            site = ?site.manifest.organs.names(),
            "the base model's organ map differs from this site's manifest"
        );
        return Err(pb::FailureCode::ModelMismatch);
    }
    Ok((net, manifest, sha))
}

/// Logs `e` (details stay in this site's log) and fails with `code`.
pub(super) fn fail<E: std::fmt::Display>(
    code: pb::FailureCode,
    what: &'static str,
) -> impl FnOnce(E) -> pb::FailureCode {
    move |e| {
        tracing::error!(error = %e, "{what}");
        code
    }
}

/// Training one model: what to train, on which slices, and where its weights go.
pub(super) struct Training<'a> {
    pub(super) net: &'a Net,
    pub(super) k: usize,
    pub(super) slices: &'a SliceSet,
    pub(super) opts: TrainOptions,
    pub(super) parent: Option<String>,
    pub(super) out: PathBuf,
    /// Also write the trained tail (the last `k` layers over the parent) here, for upload.
    pub(super) tail_out: Option<PathBuf>,
}

/// What running a task needs besides the work itself.
pub(super) struct Runner<'a> {
    pub(super) progress: &'a mut dyn FnMut(pb::Progress),
    pub(super) stop: &'a dyn Fn() -> bool,
    /// The share of the task's progress this step covers.
    pub(super) span: (f64, f64),
}

impl Runner<'_> {
    pub(super) fn phase(&mut self, name: &str, at: f64) {
        let fraction = self.span.0 + (self.span.1 - self.span.0) * at;
        (self.progress)(pb::Progress { phase: name.into(), fraction, ..Default::default() });
    }

    /// Trains, saves the weights at the site, and returns the arm's training figures.
    pub(super) fn train(&mut self, t: Training<'_>) -> Result<pb::ArmResult, pb::FailureCode> {
        let epochs = t.opts.epochs as u32;
        let (lo, hi) = self.span;
        let progress = &mut *self.progress;
        let batch = t.opts.batch_size;
        let mut last_step = std::time::Instant::now();
        let mut on_event = |e: &TrainEvent| match *e {
            TrainEvent::Caching { done, total } => progress(pb::Progress {
                phase: "cache".into(),
                fraction: lo + (hi - lo) * 0.1 * done as f64 / total.max(1) as f64,
                epochs,
                ..Default::default()
            }),
            TrainEvent::Step { epoch, step, steps_per_epoch, loss } => {
                super::faults::pause_at("train");
                super::metrics::get().step(last_step.elapsed().as_secs_f64(), batch);
                last_step = std::time::Instant::now();
                progress(pb::Progress {
                    phase: "train".into(),
                    epoch: epoch as u32 + 1,
                    epochs,
                    loss,
                    fraction: lo
                        + (hi - lo)
                            * (0.1
                                + 0.8
                                    * (epoch as f64
                                        + (step + 1) as f64 / steps_per_epoch.max(1) as f64)
                                    / f64::from(epochs.max(1))),
                })
            }
            TrainEvent::Epoch { .. } => {}
        };
        let report = match train_until(t.net, t.k, t.slices, &t.opts, &mut on_event, self.stop) {
            Ok(r) => r,
            Err(TrainError::Stopped) => {
                return Err(pb::FailureCode::AgentShutdown);
            }
            Err(TrainError::Diverged(..)) => {
                return Err(pb::FailureCode::Diverged);
            }
            Err(e) => return Err(fail(pb::FailureCode::Internal, "training")(e)),
        };
        let prov = report.provenance(t.parent.clone(), t.net.num_layers(), &t.opts);
        if let Some(dir) = t.out.parent() {
            std::fs::create_dir_all(dir)
                .map_err(fail(pb::FailureCode::Internal, "creating the weights folder"))?;
        }
        let sha = weights::save(t.net, &prov, &t.out)
            .map_err(fail(pb::FailureCode::Internal, "saving the trained weights"))?;
        tracing::info!(path = %t.out.display(), "trained weights kept at this site");
        let tail_sha256 = match (&t.tail_out, &t.parent) {
            (Some(path), Some(parent)) => {
                let bytes = weights::tail_to_bytes(t.net, t.k, parent, &prov)
                    .map_err(fail(pb::FailureCode::Internal, "writing the trained tail"))?;
                write_atomic(path, &bytes)
                    .map_err(fail(pb::FailureCode::Internal, "saving the trained tail"))?;
                weights::sha256_hex(&bytes)
            }
            _ => String::new(),
        };
        Ok(pb::ArmResult {
            tail_sha256,
            train_seconds: report.seconds,
            cache_seconds: report.cache_seconds,
            epoch_losses: report.epoch_losses,
            weights_sha256: sha,
            train_slices: report.slices as u32,
            trainable_layers: t.k as u32,
            ..Default::default()
        })
    }

    /// Scores `net` on the test split: per organ, per case index.
    pub(super) fn evaluate(
        &mut self,
        net: &Net,
        test: &Dataset,
        arm: &mut pb::ArmResult,
    ) -> Result<(), pb::FailureCode> {
        self.phase("evaluate", 0.92);
        let started = Instant::now();
        let cases = evaluate(net, test).map_err(fail(pb::FailureCode::Internal, "evaluation"))?;
        arm.eval_seconds = started.elapsed().as_secs_f64();
        arm.scores = case_rows(&cases, &test.organs);
        Ok(())
    }
}

/// Writes `bytes` to `path` through a temp file, fsynced, then renamed.
pub(super) fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Per-case scores as the long rows the protocol carries: one per organ and case, organs in
/// label order within a case.
fn case_rows(
    cases: &[crate::evaluate::CaseScores],
    organs: &shared::organs::OrganMap,
) -> Vec<pb::CaseScore> {
    cases
        .iter()
        .flat_map(|c| {
            organs.labels().into_iter().filter_map(move |label| {
                c.scores.iter().find(|s| s.label == label).map(|s| pb::CaseScore {
                    organ: organs.name(label).unwrap_or("?").to_owned(),
                    case_index: c.case_index as u32,
                    dice: s.dice,
                    hd95_mm: s.hd95_mm,
                })
            })
        })
        .collect()
}
