//! Running one task with the engine, off the async runtime: data, weights,
//! training, evaluation, and the result message (scores by case index only).

use std::path::PathBuf;

use crate::data::{Dataset, Split};
use crate::model::{ModelConfig, Net};
use proto::pb;

use super::policy::check_gpu_memory;
use super::runner::{Ended, Runner, Training, fail, load_base, load_split, train_options};
pub use super::runner::{ModelFiles, safe_id, tail_path, weights_path};
pub use super::site::{Site, SiteDataError};
use crate::train::SliceSet;

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

/// Runs a task whose models (the base, a tail, a cross-eval's models) were downloaded to
/// `models`. `progress` gets phase and training events; `stop` is polled after every
/// optimizer step.
pub fn run_task(
    site: &Site,
    task: &pb::Task,
    models: &ModelFiles,
    progress: &mut dyn FnMut(pb::Progress),
    stop: &dyn Fn() -> bool,
) -> Outcome {
    let spec = task.spec.clone().unwrap_or_default();
    let kind = pb::TaskKind::try_from(spec.kind).unwrap_or(pb::TaskKind::Unspecified);
    let mut runner = Runner { progress, stop, span: (0.05, 1.0) };
    let base = task.base.as_ref().and_then(|m| models.get(&m.sha256.to_ascii_lowercase()));
    let base = base.map(PathBuf::as_path);
    let result = if !safe_id(&task.task_id) || !safe_id(&task.round_id) {
        tracing::error!("the task's id or round id is not a safe file name; refused to run it");
        Err(pb::FailureCode::Internal.into())
    } else {
        match kind {
            pb::TaskKind::TransferTarget => run_arms(site, task, &spec, base, &mut runner),
            pb::TaskKind::Fedavg => {
                super::federated::run_fedavg(site, task, &spec, models, &mut runner)
            }
            pb::TaskKind::CrossEval => {
                super::federated::run_cross_eval(site, &spec, models, &mut runner)
            }
            pb::TaskKind::Unspecified => Err(pb::FailureCode::Internal.into()),
            _ => run_single(site, task, kind, &spec, base, &mut runner),
        }
    };
    runner.span = (0.0, 1.0);
    runner.phase("done", 1.0);
    crate::memory::release_freed_pages();
    match result {
        Ok(r) => Outcome::Result(r),
        Err(Ended::Failure(code)) => Outcome::Failure(code),
        Err(Ended::Refusal(code, detail)) => Outcome::Refusal(code, detail),
    }
}

/// The sha256 of the task's base model, checked as it was downloaded.
fn base_sha(task: &pb::Task) -> Option<String> {
    task.base.as_ref().map(|m| m.sha256.to_ascii_lowercase())
}

/// Evaluate, finetune, train and transfer-source: one model, trained or not, then scored (a
/// finetune task scores its base model first).
fn run_single(
    site: &Site,
    task: &pb::Task,
    kind: pb::TaskKind,
    spec: &pb::TaskSpec,
    base: Option<&std::path::Path>,
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
            let (net, _, sha) = load_base(&bytes, site, base_sha(task).as_deref())?;
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
            tail_out: None,
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
    base: Option<&std::path::Path>,
    runner: &mut Runner<'_>,
) -> Result<pb::TaskResult, Ended> {
    let organs = &site.manifest.organs;
    let path = base.ok_or(pb::FailureCode::Internal)?;
    let bytes =
        std::fs::read(path).map_err(fail(pb::FailureCode::Internal, "reading the base weights"))?;
    let (base_net, base_manifest, base_sha) = load_base(&bytes, site, base_sha(task).as_deref())?;
    drop(bytes);
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
                // The base decoded once per task; each arm trains its own copy.
                let net = base_net
                    .duplicate()
                    .map_err(fail(pb::FailureCode::Internal, "copying the base model"))?;
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
                // A shared Model_ST: its tail is written for upload, where the policy allows.
                let share = arm_kind == pb::ArmKind::Finetune && arm_spec.share;
                if share && !site.policy.share_weights {
                    tracing::info!(
                        arm = i,
                        "the task asks to share this arm's tail; policy.share_weights is false, \
                         so it stays at this site"
                    );
                }
                let tail_out =
                    (share && site.policy.share_weights).then(|| tail_path(site, &task.task_id, i));
                let mut r = runner.train(Training {
                    net,
                    k,
                    slices,
                    opts,
                    parent,
                    out: weights_path(site, &task.task_id, Some(i)),
                    tail_out,
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
