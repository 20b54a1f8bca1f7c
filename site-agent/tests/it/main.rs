//! Engine tests: metrics against medpy and scipy, NIfTI against real files, manifests, the model
//! and its weights, the CPU training ops against candle's own, hostile input to the readers;
//! and on tiny phantoms: the frozen prefix stays frozen, the cache changes nothing but speed,
//! runs are reproducible, and fine-tuning helps at a new center.

mod cuda;
mod cuda_ops;
mod dicom;
mod dicom_export;
mod hostile;
mod manifest;
mod metrics;
mod model;
mod nifti;
mod ops;
mod orientation;

use std::path::PathBuf;

use candle_core::Device;
use site_agent::data::{Dataset, Manifest, Split, phantom};
use site_agent::evaluate::{dice_of, evaluate};
use site_agent::model::{ModelConfig, Net};
use site_agent::train::{SliceSet, TrainOptions, train};
use site_agent::weights::{self, Provenance};

/// `../shared/testdata` beside the repository, or `None` (tests then skip with a message).
pub(crate) fn testdata(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata").join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipped: {} is absent (the shared test data sits beside the repository)",
            p.display()
        );
        None
    }
}

fn center(
    c: phantom::Center,
    cases: usize,
    test: usize,
    seed: u64,
) -> (tempfile::TempDir, Manifest) {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = phantom::write_center(c, cases, test, seed, dir.path()).expect("phantoms");
    (dir, m)
}

fn tiny(seed: u64) -> Net {
    let cfg = ModelConfig::preset("tiny").expect("preset");
    Net::new(&cfg, &phantom::organ_map(), seed, &Device::Cpu).expect("net")
}

fn clone_net(net: &Net) -> Net {
    let bytes = weights::to_bytes(net, &Provenance::default()).expect("bytes");
    weights::from_bytes(&bytes, &Device::Cpu).expect("load").0
}

fn tensors(net: &Net) -> Vec<(String, Vec<f32>)> {
    net.named_vars()
        .into_iter()
        .map(|(n, v)| {
            (n, v.as_tensor().flatten_all().expect("flat").to_vec1::<f32>().expect("vec"))
        })
        .collect()
}

fn quick(epochs: usize) -> TrainOptions {
    TrainOptions { epochs, batch_size: 8, ..Default::default() }
}

#[test]
fn fine_tuning_k_layers_changes_only_the_last_k() {
    let (_d, m) = center(phantom::Center::TargetB, 2, 1, 3);
    let data = m.load_split(Split::Train).expect("data");
    let net = tiny(5);
    let slices = SliceSet::from_dataset(&data, &net).expect("slices");
    let before = tensors(&net);
    let k = 3;
    for cache in [true, false] {
        let net = clone_net(&net);
        train(&net, k, &slices, &TrainOptions { cache, ..quick(1) }, &mut |_| {}).expect("train");
        let first_trainable = net.num_layers() - k;
        let tail: Vec<String> =
            (first_trainable..net.num_layers()).flat_map(|i| net.layer_tensor_names(i)).collect();
        for ((name, old), (_, new)) in before.iter().zip(tensors(&net)) {
            if tail.contains(name) {
                assert_ne!(
                    old, &new,
                    "{name} is in the last {k} layers and must train (cache {cache})"
                );
            } else {
                assert_eq!(
                    old, &new,
                    "{name} is frozen and must stay bit-identical (cache {cache})"
                );
            }
        }
    }
}

#[test]
fn cached_and_uncached_fine_tuning_follow_the_same_losses() {
    let (_d, m) = center(phantom::Center::TargetA, 2, 1, 4);
    let data = m.load_split(Split::Train).expect("data");
    let base = tiny(6);
    let slices = SliceSet::from_dataset(&data, &base).expect("slices");
    let run = |cache: bool| {
        let net = clone_net(&base);
        let r = train(&net, 4, &slices, &TrainOptions { cache, ..quick(3) }, &mut |_| {})
            .expect("train");
        assert_eq!(r.used_cache, cache);
        r.epoch_losses
    };
    let (cached, direct) = (run(true), run(false));
    // The prefix runs in other batch sizes with the cache, so GEMM blocking may differ in the
    // last bits; 1e-4 relative is far below any real divergence.
    for (a, b) in cached.iter().zip(&direct) {
        assert!((a - b).abs() <= 1e-4 * b.abs(), "epoch losses {cached:?} vs {direct:?}");
    }
}

/// A frozen-prefix cache beyond the device budget is kept in host memory and batches are
/// copied over: the losses are those of the cache on the device. (On the CPU both are host
/// memory; a budget of 0 bytes takes the spilling path all the same.)
#[test]
fn a_cache_beyond_the_device_budget_spills_to_host_memory_and_trains_the_same() {
    let (_d, m) = center(phantom::Center::TargetA, 2, 1, 8);
    let data = m.load_split(Split::Train).expect("data");
    let base = tiny(9);
    let slices = SliceSet::from_dataset(&data, &base).expect("slices");
    let run = |budget: Option<u64>| {
        let net = clone_net(&base);
        let opts = TrainOptions { cache_device_budget: budget, ..quick(2) };
        let r = train(&net, 3, &slices, &opts, &mut |_| {}).expect("train");
        assert!(r.used_cache);
        (r.cache_in_host_memory, r.epoch_losses, tensors(&net))
    };
    let (spilled, on_device, small_enough) = (run(Some(0)), run(None), run(Some(u64::MAX)));
    assert!(spilled.0, "a 0-byte budget keeps the cache in host memory");
    assert!(!on_device.0 && !small_enough.0, "within the budget the cache stays on the device");
    assert_eq!(spilled.1, on_device.1, "the same batches give the same losses");
    assert!(spilled.2 == on_device.2, "and the same weights");
}

#[test]
fn training_is_reproducible_with_a_seed() {
    let (_d, m) = center(phantom::Center::Source, 2, 1, 5);
    let data = m.load_split(Split::Train).expect("data");
    let run = || {
        let net = tiny(7);
        let slices = SliceSet::from_dataset(&data, &net).expect("slices");
        let r = train(&net, net.num_layers(), &slices, &quick(1), &mut |_| {}).expect("train");
        (weights::to_bytes(&net, &Provenance::default()).expect("bytes"), r.epoch_losses)
    };
    let (a, b) = (run(), run());
    assert_eq!(a.1, b.1);
    assert!(a.0 == b.0, "same seed, same data: identical weights");
}

fn mean_dice(net: &Net, test: &Dataset) -> f64 {
    let cases = evaluate(net, test).expect("evaluate");
    let per_organ: Vec<f64> = test
        .organs
        .labels()
        .iter()
        .map(|&l| {
            let d = dice_of(&cases, l);
            d.iter().sum::<f64>() / d.len() as f64
        })
        .collect();
    per_organ.iter().sum::<f64>() / per_organ.len() as f64
}

#[test]
fn fine_tuned_model_beats_the_source_model_at_the_target() {
    let (_s, source) = center(phantom::Center::Source, 5, 1, 11);
    let (_t, target) = center(phantom::Center::TargetA, 6, 3, 12);
    let src = source.load_split(Split::Train).expect("source");
    let tgt_train = target.load_split(Split::Train).expect("target train");
    let tgt_test = target.load_split(Split::Test).expect("target test");
    let opts = TrainOptions { epochs: 6, batch_size: 8, learning_rate: 1e-2, ..Default::default() };
    let model_s = tiny(1);
    let slices = SliceSet::from_dataset(&src, &model_s).expect("slices");
    train(&model_s, model_s.num_layers(), &slices, &opts, &mut |_| {}).expect("train S");
    let model_st = clone_net(&model_s);
    let k = model_st.config().default_trainable_layers();
    let slices = SliceSet::from_dataset(&tgt_train, &model_st).expect("slices");
    train(&model_st, k, &slices, &opts, &mut |_| {}).expect("fine-tune ST");
    let (s, st) = (mean_dice(&model_s, &tgt_test), mean_dice(&model_st, &tgt_test));
    eprintln!("mean Dice over organs at the target: Model_S {s:.3}, Model_ST {st:.3}");
    assert!(st > s, "Model_ST mean Dice {st:.3} must beat Model_S {s:.3} on the target");
}

/// Every subcommand says what it does and every argument has help text.
#[test]
fn every_command_and_argument_is_explained() {
    use clap::CommandFactory;
    let problems = shared::cli::undocumented(&site_agent::commands::Cli::command());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The first CUDA GPU, or `None` with a message (the CUDA tests then skip).
#[cfg(feature = "cuda")]
pub(crate) fn gpu() -> Option<candle_core::Device> {
    match site_agent::device::DeviceChoice::Cuda(0).select() {
        Ok(s) => Some(s.device),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}
