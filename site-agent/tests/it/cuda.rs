//! Training on a CUDA GPU (`cuda` feature; skipped with a message where no GPU is visible):
//! a `tiny` run follows the CPU's loss curve, and the frozen-prefix cache stays on the device
//! within its budget and spills to host memory beyond it, with the same losses.
#![cfg(feature = "cuda")]

use crate::gpu;
use candle_core::Device;
use site_agent::data::{Split, phantom};
use site_agent::model::{ModelConfig, Net};
use site_agent::train::{SliceSet, TrainOptions, train};

fn run(device: &Device, k: Option<usize>, budget: Option<u64>) -> (Vec<f64>, bool, bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = phantom::write_center(phantom::Center::TargetA, 3, 1, 4, dir.path()).expect("phantoms");
    let data = m.load_split(Split::Train).expect("data");
    let cfg = ModelConfig::preset("tiny").expect("preset");
    let net = Net::new(&cfg, &m.organs, 6, device).expect("net");
    let slices = SliceSet::from_dataset(&data, &net).expect("slices");
    let k = k.unwrap_or(net.num_layers());
    let opts = TrainOptions {
        epochs: 4,
        batch_size: 8,
        cache_device_budget: budget,
        ..Default::default()
    };
    let r = train(&net, k, &slices, &opts, &mut |_| {}).expect("train");
    (r.epoch_losses, r.used_cache, r.cache_in_host_memory)
}

#[test]
fn a_tiny_run_on_the_gpu_follows_the_cpu_loss_curve() {
    let Some(dev) = gpu() else { return };
    for k in [None, Some(3)] {
        let (cpu, _, _) = run(&Device::Cpu, k, None);
        let (gpu, _, _) = run(&dev, k, None);
        eprintln!("k {k:?}: CPU losses {cpu:?}\n        GPU losses {gpu:?}");
        for (a, b) in gpu.iter().zip(&cpu) {
            // fp32 sums in another order, over four epochs of updates.
            assert!((a - b).abs() <= 1e-3 * b.abs(), "k {k:?}: {gpu:?} vs {cpu:?}");
        }
    }
}

#[test]
fn the_prefix_cache_stays_on_the_gpu_within_its_budget() {
    let Some(dev) = gpu() else { return };
    let on_device = run(&dev, Some(3), None);
    assert!(on_device.1 && !on_device.2, "the default budget (half the free memory) holds it");
    let spilled = run(&dev, Some(3), Some(0));
    assert!(spilled.1 && spilled.2, "a 0-byte budget keeps it in host memory");
    for (a, b) in spilled.0.iter().zip(&on_device.0) {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "{:?} vs {:?}", spilled.0, on_device.0);
    }
}
