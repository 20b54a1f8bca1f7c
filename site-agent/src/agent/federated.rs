//! The federated tasks: one site's local step of FedAvg over the trainable tail, and scoring
//! every model of a study on this site's test split (cross-eval).
//!
//! Only tails travel: a step starts from the base model (downloaded once, cached by sha256)
//! with the round's global tail applied, trains the last k layers, and writes just those
//! layers' tensors for upload. With FedBN the site keeps its own batch-norm statistics: the
//! tail it trained last in a round is kept under `fed/<round>.tail.safetensors`, and its
//! statistics go back over each later global tail (and over Model_FT when it is scored here).

use std::path::PathBuf;

use proto::pb;

use super::policy::check_gpu_memory;
use super::runner::{
    Ended, ModelFiles, Runner, Training, fail, load_base, load_split, model_bytes, safe_id,
    tail_path, train_options, weights_path, write_atomic,
};
use super::site::Site;
use crate::data::Split;
use crate::model::Net;
use crate::train::SliceSet;
use crate::weights::{self, TailPart};

/// Where this site keeps the tail it trained last in federated round `round_id` (FedBN reads
/// its statistics back).
pub fn local_tail_path(site: &Site, round_id: &str) -> PathBuf {
    site.storage.join("fed").join(format!("{round_id}.tail.safetensors"))
}

/// Applies this site's own batch-norm statistics from round `round_id` over `net`, where it
/// took part; returns whether it did.
fn apply_local_statistics(site: &Site, net: &Net, base_sha: &str, round_id: &str) -> bool {
    if !safe_id(round_id) {
        return false;
    }
    let Ok(bytes) = std::fs::read(local_tail_path(site, round_id)) else { return false };
    match weights::apply_tail(net, &bytes, base_sha, TailPart::Statistics) {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "this site's kept tail does not fit; the averaged statistics are used");
            false
        }
    }
}

/// One local step of FedAvg: the model received (Model_S, then base + global tail) scored on
/// the test split, then the last k layers trained for the local epochs (FedProx term where
/// asked), and only the tail written for upload.
pub(super) fn run_fedavg(
    site: &Site,
    task: &pb::Task,
    spec: &pb::TaskSpec,
    models: &ModelFiles,
    runner: &mut Runner<'_>,
) -> Result<pb::TaskResult, Ended> {
    let fed = spec.fed.unwrap_or_default();
    let base_ref = task.base.as_ref().ok_or(pb::FailureCode::Internal)?;
    let sha = base_ref.sha256.to_ascii_lowercase();
    let bytes = model_bytes(models, &sha)?;
    let (net, manifest, base_sha) = load_base(&bytes, site, Some(&sha))?;
    let k = spec.trainable_layers as usize;
    if k == 0 || k > net.num_layers() {
        return Err(pb::FailureCode::ModelMismatch.into());
    }
    let mut opts = train_options(spec);
    opts.prox_mu = fed.prox_mu;
    opts.cache_device_budget = check_gpu_memory(site, &manifest.config, k, opts.batch_size)
        .map_err(|(c, d)| Ended::Refusal(c, d))?;
    let label = match &task.tail {
        Some(tail) => {
            let tail_bytes = model_bytes(models, &tail.sha256.to_ascii_lowercase())?;
            weights::apply_tail(&net, &tail_bytes, &base_sha, TailPart::All)
                .map_err(fail(pb::FailureCode::ModelMismatch, "applying the global tail"))?;
            if fed.keep_local_bn && apply_local_statistics(site, &net, &base_sha, &task.round_id) {
                tracing::info!("FedBN: this site's own batch-norm statistics over the global tail");
            }
            format!("Model_FT step {}", fed.step.saturating_sub(1))
        }
        None => "Model_S".to_owned(),
    };
    runner.phase("load", 0.0);
    let test = load_split(site, Split::Test)?;
    let mut received = pb::ArmResult {
        spec: Some(pb::ArmSpec { kind: pb::ArmKind::Base as i32, ..Default::default() }),
        model: label,
        ..Default::default()
    };
    runner.evaluate(&net, &test, &mut received)?;
    let train = load_split(site, Split::Train)?;
    let slices = SliceSet::from_dataset(&train, &net)
        .map_err(fail(pb::FailureCode::Internal, "preparing training slices"))?;
    let tail_out = tail_path(site, &task.task_id, 1);
    let mut trained = runner.train(Training {
        net: &net,
        k,
        slices: &slices,
        opts,
        parent: Some(base_sha),
        out: weights_path(site, &task.task_id, Some(1)),
        tail_out: Some(tail_out.clone()),
    })?;
    // Kept for FedBN's later steps and for scoring Model_FT here with this site's statistics.
    let kept = local_tail_path(site, &task.round_id);
    std::fs::read(&tail_out)
        .and_then(|b| write_atomic(&kept, &b))
        .map_err(fail(pb::FailureCode::Internal, "keeping this site's tail"))?;
    trained.spec = Some(pb::ArmSpec {
        kind: pb::ArmKind::Finetune as i32,
        trainable_layers: k as u32,
        epochs: spec.epochs,
        ..Default::default()
    });
    trained.train_cases = train.cases.len() as u32;
    trained.model = format!("local step {}", fed.step);
    Ok(pb::TaskResult { device: site.device_info.kind.into(), arms: vec![received, trained] })
}

/// The net of one cross-eval model: base + tail from the downloads (each base decoded once
/// per task, kept in `bases`), or this site's own copy of a model it did not share.
fn eval_net(
    site: &Site,
    m: &pb::EvalModel,
    models: &ModelFiles,
    bases: &mut std::collections::HashMap<String, Net>,
) -> Result<Net, pb::FailureCode> {
    if !m.shared {
        if !safe_id(&m.local_task_id) {
            tracing::error!(model = %m.label, "the model's local task id is not a safe file name");
            return Err(pb::FailureCode::Internal);
        }
        let path = weights_path(site, &m.local_task_id, Some(m.local_arm as usize));
        let bytes = std::fs::read(&path)
            .map_err(fail(pb::FailureCode::ModelMismatch, "reading this site's own model"))?;
        let (net, _, sha) = load_base(&bytes, site, None)?;
        if sha != m.weights_sha256 {
            tracing::error!(model = %m.label, path = %path.display(), "this site's copy of the model is not the one it reported");
            return Err(pb::FailureCode::ModelMismatch);
        }
        return Ok(net);
    }
    let base = m.base.as_ref().ok_or(pb::FailureCode::Internal)?;
    let base_sha = base.sha256.to_ascii_lowercase();
    if !bases.contains_key(&base_sha) {
        let bytes = model_bytes(models, &base_sha)?;
        let (net, _, _) = load_base(&bytes, site, Some(&base_sha))?;
        bases.insert(base_sha.clone(), net);
    }
    let net = bases[&base_sha]
        .duplicate()
        .map_err(fail(pb::FailureCode::Internal, "copying a base model"))?;
    if let Some(tail) = &m.tail {
        let tail_bytes = model_bytes(models, &tail.sha256.to_ascii_lowercase())?;
        weights::apply_tail(&net, &tail_bytes, &base_sha, TailPart::All)
            .map_err(fail(pb::FailureCode::ModelMismatch, "applying a model's tail"))?;
        if !m.local_bn_round.is_empty() {
            apply_local_statistics(site, &net, &base_sha, &m.local_bn_round);
        }
    }
    Ok(net)
}

/// Scores every model of the task on the test split: one arm each, labelled.
pub(super) fn run_cross_eval(
    site: &Site,
    spec: &pb::TaskSpec,
    models: &ModelFiles,
    runner: &mut Runner<'_>,
) -> Result<pb::TaskResult, Ended> {
    runner.phase("load", 0.0);
    let test = load_split(site, Split::Test)?;
    let total = spec.models.len().max(1) as f64;
    let mut arms = Vec::with_capacity(spec.models.len());
    let mut bases = std::collections::HashMap::new();
    for (i, m) in spec.models.iter().enumerate() {
        runner.span = (0.05 + 0.95 * i as f64 / total, 0.05 + 0.95 * (i + 1) as f64 / total);
        let net = eval_net(site, m, models, &mut bases)?;
        let mut arm = pb::ArmResult {
            spec: Some(pb::ArmSpec { kind: pb::ArmKind::Base as i32, ..Default::default() }),
            model: m.label.clone(),
            ..Default::default()
        };
        runner.evaluate(&net, &test, &mut arm)?;
        tracing::info!(model = %m.label, "model scored");
        arms.push(arm);
    }
    Ok(pb::TaskResult { device: site.device_info.kind.into(), arms })
}
