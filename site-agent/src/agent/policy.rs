//! The site's policy applied to a task, before any work: the kinds it runs, epochs and hours,
//! whether weights may leave, and the GPU memory a task may plan to use.

use crate::model::ModelConfig;
use proto::pb;

use super::config::Policy;
use super::site::Site;
use crate::train::TrainOptions;

/// `policy.max_gpu_memory_gb` against the estimated memory of training the last `k` layers of
/// `config` at `batch` slices (it does not apply on the CPU). Returns the frozen-prefix cache's
/// device budget: what the cap leaves beside the training itself (`None`: no cap); a refusal
/// says the estimate and the cap.
pub fn check_gpu_memory(
    site: &Site,
    config: &ModelConfig,
    k: usize,
    batch: usize,
) -> Result<Option<u64>, Refusal> {
    let Some(cap_gb) = site.policy.max_gpu_memory_gb else { return Ok(None) };
    if site.device.is_cpu() {
        return Ok(None);
    }
    let cap = (cap_gb * (1u64 << 30) as f64) as u64;
    let classes = site.manifest.organs.num_classes();
    let need = config.training_memory_bytes(classes, batch, k);
    if need > cap {
        tracing::warn!(
            need_gib = need as f64 / (1u64 << 30) as f64,
            cap_gib = cap_gb,
            config = %config.name,
            batch,
            trainable_layers = k,
            "task refused: its estimated GPU memory is beyond policy.max_gpu_memory_gb"
        );
        return Err((
            pb::RefusalCode::GpuMemory,
            format!(
                "training the last {k} layers of {} at batch {batch} needs an estimated {:.1} GiB \
                 of GPU memory; policy.max_gpu_memory_gb is {cap_gb}",
                config.name,
                need as f64 / (1u64 << 30) as f64
            ),
        ));
    }
    Ok(Some(cap - need))
}

pub use super::config::KINDS;

/// The policy's name for a task kind (`policy.allowed_tasks`).
pub fn kind_name(kind: pb::TaskKind) -> &'static str {
    match kind {
        pb::TaskKind::Evaluate => "evaluate",
        pb::TaskKind::Finetune => "finetune",
        pb::TaskKind::Train => "train",
        pb::TaskKind::TransferSource | pb::TaskKind::TransferTarget => "transfer",
        pb::TaskKind::Fedavg => "fedavg",
        pb::TaskKind::CrossEval => "cross-eval",
        pb::TaskKind::Unspecified => "unspecified",
    }
}

/// The task kind a policy name stands for (a transfer target for "transfer").
pub fn kind_of(name: &str) -> Option<pb::TaskKind> {
    Some(match name {
        "evaluate" => pb::TaskKind::Evaluate,
        "finetune" => pb::TaskKind::Finetune,
        "train" => pb::TaskKind::Train,
        "transfer" => pb::TaskKind::TransferTarget,
        "fedavg" => pb::TaskKind::Fedavg,
        "cross-eval" => pb::TaskKind::CrossEval,
        _ => return None,
    })
}

/// Rough seconds per training slice per epoch on this machine's CPU, for the `max_hours`
/// check; deliberately generous (the `small` config's measured rate is ~25 ms per slice).
const SECONDS_PER_SLICE_EPOCH: f64 = 0.05;

/// A refusal: its code and which limit, in the policy's words (sent to the coordinator with
/// the code; it names settings and the task's figures, never data).
pub type Refusal = (pb::RefusalCode, String);

/// The policy's verdict on a task, before any work: `Some(refusal)` refuses it.
pub fn check_policy(policy: &Policy, spec: &pb::TaskSpec, train_slices: usize) -> Option<Refusal> {
    let kind = pb::TaskKind::try_from(spec.kind).unwrap_or(pb::TaskKind::Unspecified);
    if !policy.allowed_tasks.iter().any(|k| k == kind_name(kind)) {
        return Some((
            pb::RefusalCode::KindNotAllowed,
            format!(
                "the task is a {} task; policy.allowed_tasks is [{}]",
                kind_name(kind),
                policy.allowed_tasks.join(", ")
            ),
        ));
    }
    if kind == pb::TaskKind::TransferSource && !policy.share_weights {
        return Some((
            pb::RefusalCode::SharingNotAllowed,
            "the task uploads the trained Model_S; policy.share_weights is false".into(),
        ));
    }
    if kind == pb::TaskKind::Fedavg && !policy.share_weights {
        return Some((
            pb::RefusalCode::SharingNotAllowed,
            "the task uploads its trained tail for federated averaging; policy.share_weights \
             is false"
                .into(),
        ));
    }
    // Epochs of every model the task trains.
    let trainings: Vec<u32> = match kind {
        pb::TaskKind::Evaluate | pb::TaskKind::CrossEval => Vec::new(),
        pb::TaskKind::TransferTarget => spec
            .arms
            .iter()
            .filter(|a| a.kind != pb::ArmKind::Base as i32)
            .map(|a| if a.epochs == 0 { effective_epochs(spec) } else { a.epochs })
            .collect(),
        _ => vec![effective_epochs(spec)],
    };
    if let Some(&e) = trainings.iter().max()
        && e > policy.max_epochs
    {
        return Some((
            pb::RefusalCode::TooManyEpochs,
            format!("the task asks {e} epochs; policy.max_epochs is {}", policy.max_epochs),
        ));
    }
    let epochs: u32 = trainings.iter().sum();
    let hours = f64::from(epochs) * train_slices as f64 * SECONDS_PER_SLICE_EPOCH / 3600.0;
    if hours > policy.max_hours {
        return Some((
            pb::RefusalCode::TooLong,
            format!(
                "the task is estimated at {hours:.1} hours ({epochs} epochs over about \
                 {train_slices} slices); policy.max_hours is {}",
                policy.max_hours
            ),
        ));
    }
    None
}

pub(super) fn effective_epochs(spec: &pb::TaskSpec) -> u32 {
    if spec.epochs == 0 { TrainOptions::default().epochs as u32 } else { spec.epochs }
}
