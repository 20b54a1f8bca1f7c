//! Training and inference throughput of a model config on this machine.
//!
//! Inputs are random slices and random labels: speed does not depend on the data. Figures are
//! images per second over timed steps after warm-up steps (the best of `repeat` timed runs), and
//! the process' peak resident memory.

use std::time::Instant;

use crate::data::phantom;
use crate::model::{ModelConfig, Net};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::train::{SliceSet, TrainOptions, TrainResult, train};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub config: ModelConfig,
    pub batch: usize,
    /// Timed optimizer steps per measurement (after one warm-up epoch of the same length).
    pub steps: usize,
    /// Timed runs per figure; the figure is the fastest.
    pub repeat: usize,
    pub trainable_layers: Option<usize>,
    pub device: Device,
    /// How the device is described in the result.
    pub device_name: String,
    /// Record the time of every CPU op by shape in the timed runs ([`crate::model::ops::profile`]).
    pub profile: bool,
}

/// Where the timed runs of one figure spent their time: wall seconds in all, and per op and
/// shape (the rest is candle's own ops, the loss, the optimizer and the data).
#[derive(Clone, Debug, Serialize)]
pub struct FigureProfile {
    pub figure: String,
    pub seconds: f64,
    pub ops: Vec<crate::model::ops::profile::OpTime>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub config: String,
    pub size: usize,
    pub batch: usize,
    pub layers: usize,
    pub trainable_layers: usize,
    pub parameters: usize,
    pub threads: usize,
    /// The device, as `--device` chose it (`cpu (model)` or `cuda:N (name, memory)`).
    pub device: String,
    /// cuDNN allowed TF32 tensor cores (`FEDTUNE_TF32=1`); false is strict fp32.
    pub tf32: bool,
    pub repeat: usize,
    pub full_train_images_per_s: f64,
    pub tail_recompute_images_per_s: f64,
    pub tail_cached_images_per_s: f64,
    pub eval_slices_per_s: f64,
    pub peak_rss_mib: Option<f64>,
    /// GPU only: the most memory in use on the GPU at the end of a training step, as the
    /// driver reports it (candle's pool included, and any other process's).
    pub peak_device_mib: Option<f64>,
    /// With `profile`: per figure, the time per op and shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<FigureProfile>>,
}

fn random_slices(net: &Net, n: usize, seed: u64) -> TrainResult<SliceSet> {
    let c = net.config();
    let s = c.image_size;
    let classes = net.organs().num_classes() as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let images: Vec<f32> =
        (0..n * c.slice_spec().channels() * s * s).map(|_| rng.random_range(-1.0..1.0)).collect();
    let labels: Vec<u32> = (0..n * s * s).map(|_| rng.random_range(0..classes)).collect();
    Ok(SliceSet {
        images: Tensor::from_vec(images, (n, c.slice_spec().channels(), s, s), net.device())?,
        labels: Tensor::from_vec(labels, (n, s, s), net.device())?,
    })
}

/// Images per second of the fastest of `repeat` timed epochs, after a warm-up epoch.
fn train_rate(
    net: &Net,
    k: usize,
    data: &SliceSet,
    batch: usize,
    cache: bool,
    meter: &mut Meter,
) -> TrainResult<f64> {
    let opts = TrainOptions { epochs: 1, batch_size: batch, cache, ..Default::default() };
    let Meter { repeat, peak, profile } = meter;
    let mut watch = |_: &crate::train::TrainEvent| peak.observe(net.device());
    train(net, k, data, &opts, &mut watch)?;
    profile.start();
    let mut best = 0f64;
    let mut spent = 0f64;
    for _ in 0..(*repeat).max(1) {
        let report = train(net, k, data, &opts, &mut watch)?;
        // The cache build is a one-off cost per fine-tune, reported with the cache figure.
        let seconds = report.seconds - report.cache_seconds;
        spent += report.seconds;
        best = best.max(data.len() as f64 / seconds);
    }
    profile.finish(spent);
    Ok(best)
}

/// What every timed figure shares: how many timed runs, the GPU memory peak, the op profile.
#[derive(Debug)]
struct Meter {
    repeat: usize,
    peak: DevicePeak,
    profile: Profiler,
}

/// Collects [`FigureProfile`]s when profiling is on.
#[derive(Debug)]
struct Profiler {
    figures: Option<Vec<FigureProfile>>,
    next: &'static [&'static str],
}

impl Profiler {
    fn new(on: bool) -> Self {
        crate::model::ops::profile::enable(on);
        let next = &[
            "full training",
            "tail, prefix recomputed",
            "tail, frozen-prefix cache (its build included)",
        ];
        Self { figures: on.then(Vec::new), next: next.as_slice() }
    }

    /// Drops what warm-up recorded.
    fn start(&mut self) {
        let _ = crate::model::ops::profile::take();
    }

    /// Files what was recorded since `start` under the next figure's name.
    fn finish(&mut self, seconds: f64) {
        let (name, rest) = self.next.split_first().unwrap_or((&"evaluation", &[]));
        self.next = rest;
        if let Some(f) = &mut self.figures {
            let ops = crate::model::ops::profile::take();
            f.push(FigureProfile { figure: (*name).to_owned(), seconds, ops });
        }
    }
}

/// The most GPU memory seen in use (total minus free, from the driver).
#[derive(Debug, Default)]
struct DevicePeak {
    total: Option<u64>,
    most: Option<u64>,
}

impl DevicePeak {
    fn new(total: Option<u64>) -> Self {
        Self { total, most: None }
    }

    fn observe(&mut self, device: &Device) {
        if let (Some(total), Some(free)) = (self.total, crate::device::free_memory_bytes(device)) {
            let used = total.saturating_sub(free);
            self.most = Some(self.most.map_or(used, |m| m.max(used)));
        }
    }
}

/// Peak resident set size of this process, from /proc (Linux only).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub fn run(opts: &BenchOptions) -> TrainResult<BenchResult> {
    let device = &opts.device;
    let organs = phantom::organ_map();
    let net = Net::new(&opts.config, &organs, 1, device)?;
    let layers = net.num_layers();
    let k = opts.trainable_layers.unwrap_or_else(|| opts.config.default_trainable_layers());
    let n = opts.batch * opts.steps.max(1);
    let data = random_slices(&net, n, 7)?;
    let total = (!device.is_cpu()).then(|| crate::device::total_memory_bytes(device)).flatten();
    let peak = DevicePeak::new(total);
    let profile = Profiler::new(opts.profile);
    let mut m = Meter { repeat: opts.repeat, peak, profile };
    let full = train_rate(&net, layers, &data, opts.batch, false, &mut m)?;
    let tail = train_rate(&net, k, &data, opts.batch, false, &mut m)?;
    let cached = train_rate(&net, k, &data, opts.batch, true, &mut m)?;
    let Meter { peak, profile: mut prof, .. } = m;
    let _ = net.infer(&data.images.narrow(0, 0, opts.batch)?)?;
    prof.start();
    let mut eval = 0f64;
    let eval_start = Instant::now();
    for _ in 0..opts.repeat.max(1) {
        let t = Instant::now();
        let mut start = 0;
        while start < n {
            let len = opts.batch.min(n - start);
            let _ = net.infer(&data.images.narrow(0, start, len)?)?;
            start += len;
        }
        device.synchronize()?;
        eval = eval.max(n as f64 / t.elapsed().as_secs_f64());
    }
    prof.finish(eval_start.elapsed().as_secs_f64());
    crate::model::ops::profile::enable(false);
    // Trainable tensors only: batch-norm running statistics are buffers, not parameters.
    let parameters = net.trainable_vars(layers)?.iter().map(|v| v.elem_count()).sum();
    Ok(BenchResult {
        config: opts.config.name.clone(),
        size: opts.config.image_size,
        batch: opts.batch,
        layers,
        trainable_layers: k,
        parameters,
        threads: rayon::current_num_threads(),
        device: opts.device_name.clone(),
        tf32: crate::model::ops::tf32_allowed() && !device.is_cpu(),
        repeat: opts.repeat.max(1),
        full_train_images_per_s: full,
        tail_recompute_images_per_s: tail,
        tail_cached_images_per_s: cached,
        eval_slices_per_s: eval,
        peak_rss_mib: peak_rss_mib(),
        peak_device_mib: peak.most.map(|b| b as f64 / (1u64 << 20) as f64),
        profile: prof.figures,
    })
}
