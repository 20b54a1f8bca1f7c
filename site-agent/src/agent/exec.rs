//! Running one task with the engine, off the async runtime: data, weights,
//! training, evaluation, and the result message (scores by case index only).

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::data::{Dataset, Manifest, Split};
use crate::model::{ModelConfig, Net};
use crate::weights::{self, WeightsManifest};
use candle_core::Device;
use proto::pb;

use super::config::{Policy, SiteConfig};
use super::policy::{check_gpu_memory, effective_epochs};
use crate::evaluate::evaluate;
use crate::train::{SliceSet, TrainError, TrainEvent, TrainOptions, train_until};

/// What a task ended with.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Result(pb::TaskResult),
    Failure(pb::FailureCode),
    /// The code and which limit, in the policy's words.
    Refusal(pb::RefusalCode, String),
}

impl Outcome {
    pub fn into_proto(self) -> pb::submit_result_request::Outcome {
        use pb::submit_result_request::Outcome as O;
        match self {
            Outcome::Result(r) => O::Result(r),
            Outcome::Failure(c) => O::Failure(c as i32),
            Outcome::Refusal(c, _) => O::Refusal(c as i32),
        }
    }

    /// Which limit a refusal hit (empty for other outcomes).
    pub fn refusal_detail(&self) -> &str {
        match self {
            Outcome::Refusal(_, d) => d,
            _ => "",
        }
    }
}

/// How running a task ended early: a failure, or a refusal found once the model was known.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ended {
    Failure(pb::FailureCode),
    Refusal(pb::RefusalCode, String),
}

impl From<pb::FailureCode> for Ended {
    fn from(c: pb::FailureCode) -> Self {
        Self::Failure(c)
    }
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

/// Site data that failed the start-up check: the manifest and each problem (by case and file).
#[derive(Debug, thiserror::Error)]
#[error(
    "{} failed validation ({} problem(s)); fix them (`site-agent check-data --manifest {}` \
     re-checks) and start the agent again:\n  {}",
    manifest.display(),
    problems.len(),
    manifest.display(),
    problems.join("\n  ")
)]
pub struct SiteDataError {
    pub manifest: PathBuf,
    pub problems: Vec<String>,
}

/// Everything a task needs from the site.
#[derive(Debug)]
pub struct Site {
    pub manifest: Manifest,
    pub storage: PathBuf,
    pub policy: Policy,
    /// Smallest and largest voxel spacing per axis over the site's images (read at start).
    pub spacing_range: ([f64; 3], [f64; 3]),
    /// Where the engine runs (`agent.device`, selected at start).
    pub device: Device,
    pub device_info: crate::device::DeviceInfo,
}

impl Site {
    /// Opens the site's data: every case of the manifest is read and checked as `check-data`
    /// does, so an agent never starts on data that a task would later find invalid; every
    /// problem is returned, by case and file.
    pub fn open(
        cfg: &SiteConfig,
        selected: crate::device::Selected,
    ) -> Result<Self, SiteDataError> {
        let manifest = Manifest::load(&cfg.data.manifest).map_err(|e| SiteDataError {
            manifest: cfg.data.manifest.clone(),
            problems: vec![e.to_string()],
        })?;
        let (mut lo, mut hi) = ([f64::INFINITY; 3], [0f64; 3]);
        let mut problems = Vec::new();
        for case in &manifest.cases {
            match crate::data::load_case(case, &manifest.organs) {
                Ok(c) => {
                    for i in 0..3 {
                        lo[i] = lo[i].min(f64::from(c.image.spacing()[i]));
                        hi[i] = hi[i].max(f64::from(c.image.spacing()[i]));
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        if !problems.is_empty() {
            return Err(SiteDataError { manifest: cfg.data.manifest.clone(), problems });
        }
        Ok(Self {
            manifest,
            storage: cfg.storage.dir.clone(),
            policy: cfg.policy.clone(),
            spacing_range: (lo, hi),
            device: selected.device,
            device_info: selected.info,
        })
    }

    pub fn train_cases(&self) -> usize {
        self.manifest.cases_in(Split::Train).count()
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

/// Logs `e` (details stay in this site's log) and fails with `code`.
fn fail<E: std::fmt::Display>(
    code: pb::FailureCode,
    what: &'static str,
) -> impl FnOnce(E) -> pb::FailureCode {
    move |e| {
        tracing::error!(error = %e, "{what}");
        code
    }
}

/// Training one model: what to train, on which slices, and where its weights go.
struct Training<'a> {
    net: &'a Net,
    k: usize,
    slices: &'a SliceSet,
    opts: TrainOptions,
    parent: Option<String>,
    out: PathBuf,
}

/// What running a task needs besides the work itself.
struct Runner<'a> {
    progress: &'a mut dyn FnMut(pb::Progress),
    stop: &'a dyn Fn() -> bool,
    /// The share of the task's progress this step covers.
    span: (f64, f64),
}

impl Runner<'_> {
    fn phase(&mut self, name: &str, at: f64) {
        let fraction = self.span.0 + (self.span.1 - self.span.0) * at;
        (self.progress)(pb::Progress { phase: name.into(), fraction, ..Default::default() });
    }

    /// Trains, saves the weights at the site, and returns the arm's training figures.
    fn train(&mut self, t: Training<'_>) -> Result<pb::ArmResult, pb::FailureCode> {
        let epochs = t.opts.epochs as u32;
        let (lo, hi) = self.span;
        let progress = &mut *self.progress;
        let mut on_event = |e: &TrainEvent| match *e {
            TrainEvent::Caching { done, total } => progress(pb::Progress {
                phase: "cache".into(),
                fraction: lo + (hi - lo) * 0.1 * done as f64 / total.max(1) as f64,
                epochs,
                ..Default::default()
            }),
            TrainEvent::Step { epoch, step, steps_per_epoch, loss } => {
                super::faults::pause_at("train");
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
        let prov = report.provenance(t.parent, t.net.num_layers(), &t.opts);
        if let Some(dir) = t.out.parent() {
            std::fs::create_dir_all(dir)
                .map_err(fail(pb::FailureCode::Internal, "creating the weights folder"))?;
        }
        let sha = weights::save(t.net, &prov, &t.out)
            .map_err(fail(pb::FailureCode::Internal, "saving the trained weights"))?;
        tracing::info!(path = %t.out.display(), "trained weights kept at this site");
        Ok(pb::ArmResult {
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
    fn evaluate(
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

fn load_split(site: &Site, split: Split) -> Result<Dataset, pb::FailureCode> {
    site.manifest.load_split(split).map_err(|e| {
        tracing::error!(error = %e, ?split, "the split failed validation");
        pb::FailureCode::DataInvalid
    })
}

/// Base weights that fit this site's organ map: the net, its manifest and sha256.
fn load_base(bytes: &[u8], site: &Site) -> Result<(Net, WeightsManifest, String), pb::FailureCode> {
    let (net, manifest, sha) = weights::from_bytes(bytes, &site.device)
        .map_err(fail(pb::FailureCode::ModelMismatch, "loading the base weights"))?;
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
    let mut runner = Runner { progress, stop, span: (0.05, 1.0) };
    let result = match kind {
        pb::TaskKind::TransferTarget => run_arms(site, task, &spec, base, &mut runner),
        pb::TaskKind::Unspecified => Err(pb::FailureCode::Internal.into()),
        _ => run_single(site, task, kind, &spec, base, &mut runner),
    };
    runner.span = (0.0, 1.0);
    runner.phase("done", 1.0);
    match result {
        Ok(r) => Outcome::Result(r),
        Err(Ended::Failure(code)) => Outcome::Failure(code),
        Err(Ended::Refusal(code, detail)) => Outcome::Refusal(code, detail),
    }
}

/// Evaluate, finetune, train and transfer-source: one model, trained or not, then scored (a
/// finetune task scores its base model first).
fn run_single(
    site: &Site,
    task: &pb::Task,
    kind: pb::TaskKind,
    spec: &pb::TaskSpec,
    base: Option<&Path>,
    runner: &mut Runner<'_>,
) -> Result<pb::TaskResult, Ended> {
    let organs = &site.manifest.organs;
    let mut opts = train_options(spec);
    let (net, parent) = match (kind, base) {
        (pb::TaskKind::Train | pb::TaskKind::TransferSource, _) => {
            let name = if spec.config.is_empty() { "small" } else { spec.config.as_str() };
            let config = ModelConfig::preset(name)
                .map_err(fail(pb::FailureCode::ModelMismatch, "the task's model config"))?;
            let net = Net::new(&config, organs, opts.seed, &site.device)
                .map_err(fail(pb::FailureCode::Internal, "building the model"))?;
            (net, None)
        }
        (_, Some(path)) => {
            let bytes = std::fs::read(path)
                .map_err(fail(pb::FailureCode::Internal, "reading the base weights"))?;
            let (net, _, sha) = load_base(&bytes, site)?;
            (net, Some(sha))
        }
        (_, None) => return Err(pb::FailureCode::Internal.into()),
    };
    let k = match kind {
        pb::TaskKind::Finetune => spec.trainable_layers as usize,
        _ => net.num_layers(),
    };
    if kind != pb::TaskKind::Evaluate {
        if k == 0 || k > net.num_layers() {
            return Err(pb::FailureCode::ModelMismatch.into());
        }
        opts.cache_device_budget = check_gpu_memory(site, net.config(), k, opts.batch_size)
            .map_err(|(c, d)| Ended::Refusal(c, d))?;
    }
    runner.phase("load", 0.0);
    let test = load_split(site, Split::Test)?;
    // A finetune task scores the base model on the same cases first, so the study lead sees
    // whether fine-tuning helped (paired by case).
    let mut arms = Vec::new();
    if kind == pb::TaskKind::Finetune {
        let mut base = pb::ArmResult {
            spec: Some(pb::ArmSpec { kind: pb::ArmKind::Base as i32, ..Default::default() }),
            ..Default::default()
        };
        runner.evaluate(&net, &test, &mut base)?;
        arms.push(base);
    }
    let arm_kind = match kind {
        pb::TaskKind::Evaluate => pb::ArmKind::Base,
        pb::TaskKind::Finetune => pb::ArmKind::Finetune,
        _ => pb::ArmKind::Scratch,
    };
    let mut arm = pb::ArmResult::default();
    if kind != pb::TaskKind::Evaluate {
        let train = load_split(site, Split::Train)?;
        let slices = SliceSet::from_dataset(&train, &net)
            .map_err(fail(pb::FailureCode::Internal, "preparing training slices"))?;
        arm = runner.train(Training {
            net: &net,
            k,
            slices: &slices,
            opts,
            parent,
            out: weights_path(site, &task.task_id, None),
        })?;
        arm.train_cases = train.cases.len() as u32;
    }
    arm.spec = Some(pb::ArmSpec {
        kind: arm_kind as i32,
        trainable_layers: if kind == pb::TaskKind::Finetune { k as u32 } else { 0 },
        ..Default::default()
    });
    runner.evaluate(&net, &test, &mut arm)?;
    arms.push(arm);
    Ok(pb::TaskResult { device: site.device_info.kind.into(), arms })
}

/// A transfer target: every arm of the spec against the base model (Model_S), in order.
fn run_arms(
    site: &Site,
    task: &pb::Task,
    spec: &pb::TaskSpec,
    base: Option<&Path>,
    runner: &mut Runner<'_>,
) -> Result<pb::TaskResult, Ended> {
    let organs = &site.manifest.organs;
    let path = base.ok_or(pb::FailureCode::Internal)?;
    let bytes =
        std::fs::read(path).map_err(fail(pb::FailureCode::Internal, "reading the base weights"))?;
    let (base_net, base_manifest, base_sha) = load_base(&bytes, site)?;
    // Every trained arm within the GPU memory cap before any work; the largest sets the
    // cache budget.
    let mut cache_budget: Option<u64> = None;
    for a in &spec.arms {
        let k = match pb::ArmKind::try_from(a.kind) {
            Ok(pb::ArmKind::Scratch) => base_net.num_layers(),
            Ok(pb::ArmKind::Finetune) => (a.trainable_layers as usize).min(base_net.num_layers()),
            _ => continue,
        };
        let batch = train_options(spec).batch_size;
        if let Some(b) = check_gpu_memory(site, &base_manifest.config, k, batch)
            .map_err(|(c, d)| Ended::Refusal(c, d))?
        {
            cache_budget = Some(cache_budget.map_or(b, |c| c.min(b)));
        }
    }
    runner.phase("load", 0.0);
    let test = load_split(site, Split::Test)?;
    let train = if spec.arms.iter().any(|a| a.kind != pb::ArmKind::Base as i32) {
        load_split(site, Split::Train)?
    } else {
        Dataset { organs: organs.clone(), cases: Vec::new() }
    };
    // Slices per training-set size (the cases-sweep trains on the first n cases).
    let mut slice_sets: Vec<(usize, SliceSet)> = Vec::new();
    let mut arms = Vec::with_capacity(spec.arms.len());
    let total = spec.arms.len().max(1) as f64;
    for (i, arm_spec) in spec.arms.iter().enumerate() {
        let _span = tracing::info_span!("arm", index = i).entered();
        runner.span = (0.05 + 0.95 * i as f64 / total, 0.05 + 0.95 * (i + 1) as f64 / total);
        let arm_kind = pb::ArmKind::try_from(arm_spec.kind).unwrap_or(pb::ArmKind::Unspecified);
        let mut opts = train_options(spec);
        opts.cache_device_budget = cache_budget;
        if arm_spec.epochs > 0 {
            opts.epochs = arm_spec.epochs as usize;
        }
        if arm_spec.learning_rate > 0.0 {
            opts.learning_rate = arm_spec.learning_rate;
        }
        let n = match arm_spec.train_cases as usize {
            0 => train.cases.len(),
            n => n.min(train.cases.len()),
        };
        let (net, k, parent) = match arm_kind {
            pb::ArmKind::Base => (None, 0, None),
            pb::ArmKind::Scratch => {
                let net = Net::new(&base_manifest.config, organs, opts.seed, &site.device)
                    .map_err(fail(pb::FailureCode::Internal, "building the model"))?;
                let k = net.num_layers();
                (Some(net), k, None)
            }
            pb::ArmKind::Finetune => {
                let (net, _, _) = load_base(&bytes, site)?;
                let k = arm_spec.trainable_layers as usize;
                if k == 0 || k > net.num_layers() {
                    return Err(pb::FailureCode::ModelMismatch.into());
                }
                (Some(net), k, Some(base_sha.clone()))
            }
            pb::ArmKind::Unspecified => return Err(pb::FailureCode::Internal.into()),
        };
        let mut result = match &net {
            None => pb::ArmResult::default(),
            Some(net) => {
                if !slice_sets.iter().any(|(m, _)| *m == n) {
                    let subset =
                        Dataset { organs: organs.clone(), cases: train.cases[..n].to_vec() };
                    let set = SliceSet::from_dataset(&subset, net)
                        .map_err(fail(pb::FailureCode::Internal, "preparing training slices"))?;
                    slice_sets.push((n, set));
                }
                let slices = &slice_sets.iter().find(|(m, _)| *m == n).expect("just built").1;
                let mut r = runner.train(Training {
                    net,
                    k,
                    slices,
                    opts,
                    parent,
                    out: weights_path(site, &task.task_id, Some(i)),
                })?;
                r.train_cases = n as u32;
                r
            }
        };
        runner.evaluate(net.as_ref().unwrap_or(&base_net), &test, &mut result)?;
        result.spec = Some(*arm_spec);
        tracing::info!(
            arm = arm_kind.as_str_name(),
            k,
            train_cases = n,
            seconds = result.train_seconds,
            "arm done"
        );
        arms.push(result);
    }
    Ok(pb::TaskResult { device: site.device_info.kind.into(), arms })
}
