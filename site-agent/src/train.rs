//! The training loop: AdamW on cross-entropy plus soft Dice, over axial slices held in memory.
//!
//! With `k` trainable layers out of `L`, the first `L - k` layers are frozen: their tensors are
//! not given to the optimizer, they run with running statistics and without an autograd graph,
//! and their output is detached. When a prefix is frozen and augmentation is off, that output
//! is the same every epoch, so it is computed once per slice (the frozen-prefix cache) and the
//! tail trains on it.

use std::time::Instant;

use crate::data::{Dataset, label_slices, slice_stack};
use crate::model::optim::{AdamW, ParamsAdamW};
use crate::model::{Net, State, loss};
use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Training hyperparameters; saved beside the weights they produce.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate; it decays along a cosine to 5% of this by the last step.
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Weight of the soft Dice term next to cross-entropy.
    pub dice_weight: f64,
    pub seed: u64,
    /// Random intensity scale and shift per batch; turns the frozen-prefix cache off.
    pub augment: bool,
    /// Use the frozen-prefix cache when it applies (a frozen prefix and no augmentation).
    pub cache: bool,
    /// Most bytes the frozen-prefix cache may hold on the training device; beyond it the cache
    /// is kept in host memory and each batch is copied over. `None`: on a GPU, half of its
    /// free memory when the cache is built (a CPU's cache is in host memory either way).
    /// A property of the machine, not of the training: not saved with the options.
    #[serde(skip)]
    pub cache_device_budget: Option<u64>,
    /// FedProx: `prox_mu / 2 * ||w - w0||^2` over the trained tensors, `w0` their values when
    /// training starts (the federated round's global model), is added to the loss. 0: off.
    #[serde(skip_serializing_if = "is_zero")]
    pub prox_mu: f64,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 8,
            learning_rate: 1e-2,
            weight_decay: 1e-4,
            dice_weight: 1.0,
            seed: 17,
            augment: false,
            cache: true,
            cache_device_budget: None,
            prox_mu: 0.0,
        }
    }
}

/// Training errors.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("invalid training options: {0}")]
    Options(String),
    #[error("the loss became {0} at epoch {1}; lower the learning rate")]
    Diverged(f64, usize),
    #[error("training stopped on request")]
    Stopped,
}

pub type TrainResult<T> = Result<T, TrainError>;

/// Axial slices of a dataset, resized and windowed for a model, on its device.
#[derive(Debug)]
pub struct SliceSet {
    /// `[n, channels, size, size]` f32 (see `SliceSpec::channels`).
    pub images: Tensor,
    /// `[n, size, size]` u32 class indices.
    pub labels: Tensor,
}

impl SliceSet {
    /// Slices every case of `data` for `net`'s input spec and organ map.
    pub fn from_dataset(data: &Dataset, net: &Net) -> TrainResult<Self> {
        let spec = net.config().slice_spec();
        let lut = data.organs.class_lut();
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        let mut n = 0;
        for case in &data.cases {
            images.extend(slice_stack(&case.image, &spec));
            labels.extend(label_slices(&case.labels, &spec, &lut));
            n += case.image.dims[2];
        }
        let s = spec.size;
        Ok(Self {
            images: Tensor::from_vec(images, (n, spec.channels(), s, s), net.device())?,
            labels: Tensor::from_vec(labels, (n, s, s), net.device())?,
        })
    }

    pub fn len(&self) -> usize {
        self.images.dim(0).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the loop reports as it goes.
#[derive(Clone, Debug)]
pub enum TrainEvent {
    /// The frozen-prefix cache is being built (`done` of `total` slices).
    Caching { done: usize, total: usize },
    /// One optimizer step finished.
    Step { epoch: usize, step: usize, steps_per_epoch: usize, loss: f64 },
    /// An epoch finished with its mean loss.
    Epoch { epoch: usize, mean_loss: f64 },
}

/// What a training run did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainReport {
    pub epoch_losses: Vec<f64>,
    pub seconds: f64,
    pub cache_seconds: f64,
    pub used_cache: bool,
    /// The cache was beyond the device budget and lived in host memory.
    #[serde(default)]
    pub cache_in_host_memory: bool,
    pub trainable_layers: usize,
    pub slices: usize,
    pub steps: usize,
}

impl TrainReport {
    /// The provenance of the weights this run produced from `parent` (`None`: from scratch)
    /// in a model of `layers` layers.
    pub fn provenance(
        &self,
        parent: Option<String>,
        layers: usize,
        opts: &TrainOptions,
    ) -> crate::weights::Provenance {
        let k = self.trainable_layers;
        crate::weights::Provenance {
            parent_sha256: parent,
            trainable_layers: (k < layers).then_some(k),
            epochs: opts.epochs,
            seed: opts.seed,
            site: None,
            train_slices: self.slices,
            federated: None,
        }
    }
}

fn cosine_lr(peak: f64, step: usize, total: usize) -> f64 {
    let floor = 0.05 * peak;
    let t = step as f64 / total.max(1) as f64;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

/// Batches for one epoch: a seeded shuffle, with a last batch of one slice merged into the
/// previous one (batch statistics need two samples).
fn epoch_batches(n: usize, batch: usize, seed: u64, epoch: usize) -> Vec<Vec<u32>> {
    let mut idx: Vec<u32> = (0..n as u32).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9)));
    let mut batches: Vec<Vec<u32>> = idx.chunks(batch).map(<[u32]>::to_vec).collect();
    if batches.len() > 1 && batches.last().is_some_and(|b| b.len() < 2) {
        let last = batches.pop().expect("non-empty");
        batches.last_mut().expect("non-empty").extend(last);
    }
    batches
}

/// The frozen prefix of every slice: the state parts concatenated over slices.
#[derive(Debug)]
pub struct PrefixCache {
    pub parts: Vec<Tensor>,
    pub has_residual: bool,
    /// The parts are in host memory (the device budget was too small), not on the net's device.
    pub in_host_memory: bool,
}

impl PrefixCache {
    /// The prefix state of the slices `idx` (u32 indices), on `device`.
    fn batch(&self, idx: &[u32], device: &Device) -> TrainResult<State> {
        let at = if self.in_host_memory { &Device::Cpu } else { device };
        let idx = Tensor::from_slice(idx, idx.len(), at)?;
        let parts = self
            .parts
            .iter()
            .map(|p| p.index_select(&idx, 0)?.to_device(device))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(State::from_parts(parts, self.has_residual))
    }
}

/// How many bytes of the frozen-prefix cache may stay on `device` (see
/// [`TrainOptions::cache_device_budget`]).
fn device_budget(device: &Device, asked: Option<u64>) -> u64 {
    match asked {
        Some(b) => b,
        None if device.is_cpu() => u64::MAX,
        None => crate::device::free_memory_bytes(device).map_or(0, |free| free / 2),
    }
}

/// Computes the frozen prefix for every slice, in batches of `batch`. The first batch tells
/// the cache's size; when that is beyond `budget` bytes, every batch is moved to host memory
/// as it is made.
pub fn build_cache(
    net: &Net,
    k: usize,
    images: &Tensor,
    batch: usize,
    budget: Option<u64>,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> TrainResult<PrefixCache> {
    let n = images.dim(0)?;
    let budget = device_budget(net.device(), budget);
    let mut parts: Vec<Vec<Tensor>> = Vec::new();
    let mut in_host_memory = false;
    let mut start = 0;
    while start < n {
        let len = batch.min(n - start);
        let state = net.prefix(&images.narrow(0, start, len)?, k)?;
        let state_parts = state.parts();
        if start == 0 {
            let bytes: usize = state_parts.iter().map(|p| p.elem_count() * 4).sum();
            let total = (bytes / len.max(1)) as u64 * n as u64;
            in_host_memory = total > budget;
            if in_host_memory {
                tracing::info!(
                    cache_mib = total >> 20,
                    budget_mib = budget >> 20,
                    "the frozen-prefix cache is beyond the device budget: kept in host memory"
                );
            }
        }
        for (i, p) in state_parts.into_iter().enumerate() {
            if parts.len() <= i {
                parts.push(Vec::new());
            }
            parts[i].push(if in_host_memory { p.to_device(&Device::Cpu)? } else { p });
        }
        start += len;
        on_event(&TrainEvent::Caching { done: start, total: n });
    }
    let parts = parts.iter().map(|p| Tensor::cat(p, 0)).collect::<Result<Vec<_>, _>>()?;
    Ok(PrefixCache { parts, has_residual: net.prefix_has_residual(k)?, in_host_memory })
}

/// `sum ||w - w0||^2` over FedProx's (variable, anchor) pairs, as a graph on the variables.
fn proximal(anchor: &[(candle_core::Var, Tensor)]) -> TrainResult<Tensor> {
    let mut total: Option<Tensor> = None;
    for (var, w0) in anchor {
        let d = var.as_tensor().sub(w0)?.sqr()?.sum_all()?;
        total = Some(match total {
            Some(t) => (t + d)?,
            None => d,
        });
    }
    Ok(total.expect("the anchor is not empty"))
}

/// Trains the last `k` layers of `net` on `data` (all layers when `k == net.num_layers()`).
pub fn train(
    net: &Net,
    k: usize,
    data: &SliceSet,
    opts: &TrainOptions,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> TrainResult<TrainReport> {
    train_until(net, k, data, opts, on_event, &|| false)
}

/// [`train`] that stops with [`TrainError::Stopped`] after the first optimizer step at which
/// `stop()` is true (a site agent shutting down finishes its step, then releases the task).
pub fn train_until(
    net: &Net,
    k: usize,
    data: &SliceSet,
    opts: &TrainOptions,
    on_event: &mut dyn FnMut(&TrainEvent),
    stop: &dyn Fn() -> bool,
) -> TrainResult<TrainReport> {
    if opts.batch_size < 2 {
        return Err(TrainError::Options(format!(
            "batch_size = {} is below 2; batch norm needs at least two slices",
            opts.batch_size
        )));
    }
    if data.len() < 2 {
        return Err(TrainError::Options(format!(
            "{} training slices; need at least 2",
            data.len()
        )));
    }
    if !(opts.learning_rate > 0.0 && opts.learning_rate.is_finite()) {
        return Err(TrainError::Options("learning_rate must be a positive number".into()));
    }
    let _span =
        tracing::info_span!("train", k, epochs = opts.epochs, slices = data.len()).entered();
    let started = Instant::now();
    let layers = net.num_layers();
    let frozen = k < layers;
    let use_cache = frozen && opts.cache && !opts.augment;
    let vars = net.trainable_vars(k)?;
    if !(opts.prox_mu >= 0.0 && opts.prox_mu.is_finite()) {
        return Err(TrainError::Options(format!("prox_mu = {} is not >= 0", opts.prox_mu)));
    }
    // FedProx's anchor: the trained tensors as they start.
    let anchor: Vec<(candle_core::Var, Tensor)> = if opts.prox_mu > 0.0 {
        vars.iter()
            .map(|v| Ok((v.clone(), v.as_detached_tensor().copy()?)))
            .collect::<TrainResult<_>>()?
    } else {
        Vec::new()
    };
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: opts.learning_rate,
            weight_decay: opts.weight_decay,
            ..Default::default()
        },
    )?;
    let cache = if use_cache {
        let _span = tracing::info_span!("frozen_prefix_cache").entered();
        let batch = opts.batch_size.max(32);
        Some(build_cache(net, k, &data.images, batch, opts.cache_device_budget, on_event)?)
    } else {
        None
    };
    let cache_seconds = started.elapsed().as_secs_f64();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ 0xa5a5);
    let steps_per_epoch = epoch_batches(data.len(), opts.batch_size, opts.seed, 0).len();
    let total_steps = steps_per_epoch * opts.epochs;
    let mut epoch_losses = Vec::with_capacity(opts.epochs);
    let mut step_no = 0;
    for epoch in 0..opts.epochs {
        let _span = tracing::debug_span!("epoch", epoch).entered();
        let batches = epoch_batches(data.len(), opts.batch_size, opts.seed, epoch);
        let mut sum = 0.0;
        for (step, batch) in batches.iter().enumerate() {
            let idx = Tensor::from_slice(batch, batch.len(), net.device())?;
            let targets = data.labels.index_select(&idx, 0)?;
            let state = if let Some(cache) = &cache {
                cache.batch(batch, net.device())?
            } else {
                let mut x = data.images.index_select(&idx, 0)?;
                if opts.augment {
                    let scale: f64 = rng.random_range(0.9..1.1);
                    let shift: f64 = rng.random_range(-0.1..0.1);
                    x = x.affine(scale, shift)?;
                }
                if frozen { net.prefix(&x, k)? } else { State::new(x) }
            };
            opt.set_learning_rate(cosine_lr(opts.learning_rate, step_no, total_steps));
            let logits = net.tail(state, k, true)?;
            let mut l = loss::loss(&logits, &targets, opts.dice_weight)?;
            if !anchor.is_empty() {
                l = (l + proximal(&anchor)?.affine(opts.prox_mu / 2.0, 0.0)?)?;
            }
            opt.backward_step(&l)?;
            let lv = l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !lv.is_finite() {
                return Err(TrainError::Diverged(lv, epoch));
            }
            sum += lv;
            step_no += 1;
            on_event(&TrainEvent::Step { epoch, step, steps_per_epoch, loss: lv });
            if stop() {
                return Err(TrainError::Stopped);
            }
        }
        let mean_loss = sum / batches.len() as f64;
        tracing::debug!(epoch, mean_loss, "epoch done");
        on_event(&TrainEvent::Epoch { epoch, mean_loss });
        epoch_losses.push(mean_loss);
    }
    Ok(TrainReport {
        epoch_losses,
        seconds: started.elapsed().as_secs_f64(),
        cache_seconds: if use_cache { cache_seconds } else { 0.0 },
        used_cache: use_cache,
        cache_in_host_memory: cache.as_ref().is_some_and(|c| c.in_host_memory),
        trainable_layers: k,
        slices: data.len(),
        steps: total_steps,
    })
}
