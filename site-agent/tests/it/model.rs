//! The model: layer counts, the frozen prefix, and weights files.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use shared::organs::OrganMap;
use site_agent::data::phantom;
use site_agent::model::{ModelConfig, Net};
use site_agent::weights::{self, ManifestError, Provenance, WeightsError};

#[test]
fn layer_counts_follow_the_documented_rule() {
    let count = |name: &str| ModelConfig::preset(name).expect("preset").num_layers();
    assert_eq!(count("resnet103"), 103);
    assert_eq!(count("tiny"), 14);
    assert_eq!(count("small"), 22);
    assert_eq!(ModelConfig::preset("small").expect("preset").default_trainable_layers(), 3);
    let r = ModelConfig::preset("resnet103").expect("preset");
    assert_eq!(r.default_trainable_layers(), 10);
    assert_eq!(ModelConfig::preset("tiny").expect("preset").default_trainable_layers(), 2);
    let names: Vec<String> = r.layers(10).into_iter().map(|l| l.name).collect();
    assert_eq!(names.first().map(String::as_str), Some("stem"));
    assert_eq!(names.last().map(String::as_str), Some("head"));
    assert!(ModelConfig::preset("huge").is_err());
}

fn tiny_net(seed: u64) -> Net {
    let cfg = ModelConfig::preset("tiny").expect("preset");
    Net::new(&cfg, &phantom::organ_map(), seed, &Device::Cpu).expect("net")
}

fn input(n: usize) -> Tensor {
    let c = ModelConfig::preset("tiny").expect("preset").slice_spec().channels();
    let data: Vec<f32> =
        (0..n * c * 32 * 32).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    Tensor::from_vec(data, (n, c, 32, 32), &Device::Cpu).expect("tensor")
}

#[test]
fn same_seed_same_weights() {
    let (a, b, c) = (tiny_net(3), tiny_net(3), tiny_net(4));
    let bytes = |n: &Net| weights::to_bytes(n, &Provenance::default()).expect("bytes");
    assert_eq!(bytes(&a), bytes(&b));
    assert_ne!(bytes(&a), bytes(&c));
}

/// A duplicate holds the same weights, and changing it leaves the original as it was (each
/// arm of a task trains its own copy of the base decoded once).
#[test]
fn a_duplicate_is_equal_and_independent() {
    let (a, other) = (tiny_net(3), tiny_net(4));
    let bytes = |n: &Net| weights::to_bytes(n, &Provenance::default()).expect("bytes");
    let copy = a.duplicate().expect("duplicate");
    assert_eq!(bytes(&copy), bytes(&a));
    for ((_, to), (_, from)) in copy.named_vars().iter().zip(other.named_vars()) {
        to.set(from.as_tensor()).expect("set");
    }
    assert_eq!(bytes(&copy), bytes(&other));
    assert_eq!(bytes(&a), bytes(&tiny_net(3)), "the original is unchanged");
}

#[test]
fn weights_round_trip_with_identical_outputs_and_manifest() {
    let net = tiny_net(1);
    let prov = Provenance {
        parent_sha256: Some("ab".repeat(32)),
        trainable_layers: Some(2),
        epochs: 3,
        seed: 9,
        site: Some("target".into()),
        train_slices: 12,
        federated: None,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.safetensors");
    let sha = weights::save(&net, &prov, &path).expect("save");
    let (back, manifest, sha2) = weights::load(&path, &Device::Cpu).expect("load");
    assert_eq!(sha, sha2);
    assert_eq!(manifest.provenance, prov);
    assert_eq!(manifest.layers, net.layer_names());
    let x = input(3);
    let (y1, y2) = (net.infer(&x).expect("infer"), back.infer(&x).expect("infer"));
    let diff = (y1 - y2).expect("sub").abs().expect("abs").max_all().expect("max");
    assert_eq!(diff.to_scalar::<f32>().expect("scalar"), 0.0);
}

#[test]
fn mismatched_weights_are_refused_by_name() {
    let net = tiny_net(1);
    let bytes = weights::to_bytes(&net, &Provenance::default()).expect("bytes");
    let (_, manifest, _) = weights::from_bytes(&bytes, &Device::Cpu).expect("loads");
    // Another organ map.
    let other = OrganMap::new(BTreeMap::from([(1, "brainstem".to_owned())])).expect("map");
    let e = weights::check_compatible(&manifest, &other, None).expect_err("organ map differs");
    assert!(
        matches!(e, WeightsError::Manifest(ManifestError::Incompatible { what: "organ map", .. })),
        "{e}"
    );
    // Another config.
    let small = ModelConfig::preset("small").expect("preset");
    let e = weights::check_compatible(&manifest, &phantom::organ_map(), Some(&small))
        .expect_err("config differs");
    assert!(e.to_string().contains("model config"), "{e}");
    // Tensors that do not fit the architecture.
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).expect("tensors");
    let e = Net::from_tensors(&small, &phantom::organ_map(), tensors, &Device::Cpu)
        .expect_err("shapes differ")
        .to_string();
    assert!(e.contains("shape") || e.contains("missing"), "{e}");
    // A plain safetensors file without a manifest.
    let plain = safetensors::serialize(
        [("x", Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).expect("t"))],
        None,
    )
    .expect("bytes");
    let e = weights::from_bytes(&plain, &Device::Cpu).expect_err("no manifest").to_string();
    assert!(e.contains("__metadata__"), "{e}");
}

#[test]
fn the_frozen_prefix_has_no_graph_and_the_tail_has_only_k_layers_of_parameters() {
    let net = tiny_net(2);
    let k = 3;
    let vars = net.trainable_vars(k).expect("vars");
    let tail_names: Vec<String> =
        (net.num_layers() - k..net.num_layers()).flat_map(|i| net.layer_tensor_names(i)).collect();
    let trainable: usize = tail_names.iter().filter(|n| !n.contains("running")).count();
    assert_eq!(vars.len(), trainable);
    let x = input(4);
    let state = net.prefix(&x, k).expect("prefix");
    let logits = net.tail(state, k, true).expect("tail");
    let grads = logits.sum_all().expect("sum").backward().expect("backward");
    let named = net.named_vars();
    for (i, (name, var)) in named.iter().enumerate() {
        let in_tail = tail_names.contains(name);
        let has_grad = grads.get(var.as_tensor()).is_some();
        if name.contains("running") {
            assert!(!has_grad, "{name} is a statistic, never a gradient target");
        } else {
            assert_eq!(
                has_grad, in_tail,
                "tensor {i} {name}: gradient only inside the last {k} layers"
            );
        }
    }
    assert!(net.trainable_vars(net.num_layers() + 1).is_err());
}

/// The position channels follow the adjacent slices: x across the columns, y down the rows,
/// the slice's height constant over the slice; every value a pixel centre in [-1, 1].
#[test]
fn position_channels_hold_x_y_and_height() {
    use site_agent::data::{Volume, slice_stack};
    let cfg = ModelConfig::preset("small").expect("preset");
    let spec = cfg.slice_spec();
    assert!(spec.position);
    assert_eq!(spec.channels(), spec.in_channels + 3);
    let (s, nz) = (spec.size, 5);
    let image = Volume::filled([20, 24, nz], [1.0, 1.0, 2.0], 0f32);
    let stack = slice_stack(&image, &spec);
    assert_eq!(stack.len(), nz * spec.channels() * s * s);
    let at =
        |z: usize, c: usize, y: usize, x: usize| stack[((z * spec.channels() + c) * s + y) * s + x];
    let unit = |i: usize, n: usize| (i as f32 + 0.5) / n as f32 * 2.0 - 1.0;
    let c0 = spec.in_channels;
    for z in 0..nz {
        for (y, x) in [(0, 0), (3, s - 1), (s - 1, 7)] {
            assert_eq!(at(z, c0, y, x), unit(x, s), "x channel at z={z} y={y} x={x}");
            assert_eq!(at(z, c0 + 1, y, x), unit(y, s), "y channel");
            assert_eq!(at(z, c0 + 2, y, x), unit(z, nz), "height channel");
        }
    }
    // Mirroring the image left-right leaves the slices' x channel as it was: position is the
    // one input that tells the left eye from the right one.
    assert!(at(0, c0, 0, 0) < 0.0 && at(0, c0, 0, s - 1) > 0.0);
}

/// Weights written before the position channels existed carry no `position_channels` key;
/// their config reads back with it off, and the stem then takes the slices alone.
#[test]
fn configs_without_position_channels_still_load() {
    let cfg = ModelConfig::preset("small").expect("preset");
    let mut json = serde_json::to_value(&cfg).expect("json");
    json.as_object_mut().expect("object").remove("position_channels");
    let old: ModelConfig = serde_json::from_value(json).expect("an older manifest parses");
    assert!(!old.position_channels);
    assert_eq!(old.slice_spec().channels(), old.in_channels);
    let net = Net::new(&old, &phantom::organ_map(), 1, &Device::Cpu).expect("net");
    let x = Tensor::zeros(
        (1, old.in_channels, old.image_size, old.image_size),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .expect("input");
    net.infer(&x).expect("an older model runs on slices alone");
}

/// A model sees millimetres, not pixels: the same anatomy scanned on a 40 x 40 grid of 2 mm
/// (80 mm across) and a 120 x 120 grid of 1 mm (120 mm across) gives the same input at 4.8 mm
/// pixels where both scans reach, and air beyond. Configs without `pixel_mm` (older
/// weights) stretch each slice to the input size, as they were trained.
#[test]
fn slices_are_resampled_to_the_models_pixel_spacing() {
    use site_agent::data::{Volume, slice_stack};
    let cfg = ModelConfig::preset("small").expect("preset");
    assert_eq!(cfg.pixel_mm, Some(4.8));
    let spec = cfg.slice_spec();
    // A smooth HU ramp in mm from the centre: the same function on both grids.
    let scan = |n: usize, mm: f32| {
        let data = (0..n * n)
            .map(|i| {
                let (x, y) =
                    ((i % n) as f32 + 0.5 - n as f32 / 2.0, (i / n) as f32 + 0.5 - n as f32 / 2.0);
                (x * mm) * 2.0 - (y * mm) * 1.5
            })
            .collect();
        Volume::new([n, n, 1], [mm, mm, 2.0], data)
    };
    let (coarse, fine) = (slice_stack(&scan(40, 2.0), &spec), slice_stack(&scan(120, 1.0), &spec));
    let s = spec.size;
    // Channel 1 is the slice itself (3 adjacent slices, edges repeated); inside the 80 mm scan.
    // Stretched to the input size instead, the two would differ everywhere but the centre.
    let plane = |v: &[f32]| v[s * s..2 * s * s].to_vec();
    let (a, b) = (plane(&coarse), plane(&fine));
    let inside = |i: usize| {
        let (x, y) = ((i % s) as f32 + 0.5 - s as f32 / 2.0, (i / s) as f32 + 0.5 - s as f32 / 2.0);
        x.abs() * 4.8 < 38.0 && y.abs() * 4.8 < 38.0
    };
    let worst = (0..s * s).filter(|&i| inside(i)).map(|i| (a[i] - b[i]).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-5, "same millimetres, same input: worst difference {worst}");
    // Outside the scans the model's 230 mm field is air.
    let air = spec.window.apply(-1024.0);
    assert_eq!((a[0], b[0], b[s * s - 1]), (air, air, air));
    // Without a pixel spacing, each slice fills the input whatever its spacing.
    let mut old = cfg.clone();
    old.pixel_mm = None;
    let stretched = plane(&slice_stack(&scan(40, 2.0), &old.slice_spec()));
    assert_ne!(stretched[0], air, "stretched: the scan's own corner");
    let mut json = serde_json::to_value(&cfg).expect("json");
    json.as_object_mut().expect("object").remove("pixel_mm");
    let parsed: ModelConfig = serde_json::from_value(json).expect("an older manifest parses");
    assert_eq!(parsed.pixel_mm, None);
}

/// The GPU memory estimate behind `policy.max_gpu_memory_gb`, worked by hand for a one-level
/// net (stem, one residual block, head) at 8x8, batch 2, 2 classes, training the head only:
/// weights 44 + 152 + 152 + 10 floats, the head's gradient and moments 3 x 10, the frozen
/// layers' largest output twice 2 x 512, the head's kept activations 4 x 256, the input twice
/// 2 x 128; 2692 floats, 10768 bytes, and a quarter more.
#[test]
fn the_training_memory_estimate_counts_weights_optimizer_and_activations() {
    let mut c = ModelConfig::preset("tiny").expect("preset");
    c.widths = vec![4];
    c.encoder_blocks = vec![1];
    c.decoder_blocks = vec![];
    c.in_channels = 1;
    c.position_channels = false;
    c.image_size = 8;
    c.validate().expect("a valid config");
    assert_eq!(c.num_layers(), 4);
    assert_eq!(c.training_memory_bytes(2, 2, 1), 13460);
    // More slices, more trained layers, a bigger model: more memory.
    let r = ModelConfig::preset("resnet103").expect("preset");
    let at = |batch, k| r.training_memory_bytes(10, batch, k);
    assert!(at(16, 10) > at(8, 10) && at(16, 103) > at(16, 10));
    let t = ModelConfig::preset("tiny").expect("preset");
    assert!(t.training_memory_bytes(10, 16, t.num_layers()) < at(16, 103));
    eprintln!(
        "estimated training memory, resnet103 at {0}x{0}, batch 16: all layers {1:.2} GiB, \
         last 10 {2:.2} GiB",
        r.image_size,
        at(16, 103) as f64 / (1u64 << 30) as f64,
        at(16, 10) as f64 / (1u64 << 30) as f64
    );
}

/// Every tensor of a net by name, as f32 values.
fn values(net: &Net) -> BTreeMap<String, Vec<f32>> {
    net.named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn a_tail_holds_the_last_layers_and_applies_over_its_base_only() {
    let (base, trained) = (tiny_net(1), tiny_net(2));
    let base_sha = weights::sha256_hex(&weights::to_bytes(&base, &Provenance::default()).unwrap());
    let tail = weights::tail_to_bytes(&trained, 2, &base_sha, &Provenance::default()).unwrap();
    let full = weights::to_bytes(&trained, &Provenance::default()).unwrap();
    assert!(tail.len() * 5 < full.len(), "a k = 2 tail of tiny is under a fifth of the model");
    let m = weights::read_manifest(&tail).unwrap();
    let last2: Vec<String> = base.layer_names()[base.num_layers() - 2..].to_vec();
    assert_eq!(m.tail_layer_names().unwrap(), last2.as_slice());

    let net = tiny_net(1);
    weights::apply_tail(&net, &tail, &base_sha, weights::TailPart::All).unwrap();
    let (got, want_tail, want_base) = (values(&net), values(&trained), values(&base));
    for (name, v) in &got {
        let expect =
            if weights::in_layers(name, &last2) { &want_tail[name] } else { &want_base[name] };
        assert_eq!(v, expect, "{name}");
    }
    // A tail of another base, or a full model where a tail is expected, changes nothing.
    let before = values(&net);
    let other = "cd".repeat(32);
    assert!(matches!(
        weights::apply_tail(&net, &tail, &other, weights::TailPart::All),
        Err(WeightsError::Manifest(ManifestError::Incompatible { .. }))
    ));
    assert!(weights::apply_tail(&net, &full, &base_sha, weights::TailPart::All).is_err());
    assert_eq!(values(&net), before);
}

/// FedBN: over a global (averaged) tail, a site's own tail gives back only its batch-norm
/// running statistics; the trained parameters stay the global ones.
#[test]
fn fedbn_keeps_a_sites_own_batch_norm_statistics() {
    let base = tiny_net(1);
    let base_sha = weights::sha256_hex(&weights::to_bytes(&base, &Provenance::default()).unwrap());
    let (global, local) = (tiny_net(2), tiny_net(3));
    // Make the local statistics differ from the global ones (fresh nets share them).
    for (name, var) in local.named_vars() {
        if weights::is_statistic(&name) {
            let t = (var.as_tensor() + 0.5).unwrap();
            var.set(&t).unwrap();
        }
    }
    let g = weights::tail_to_bytes(&global, 2, &base_sha, &Provenance::default()).unwrap();
    let l = weights::tail_to_bytes(&local, 2, &base_sha, &Provenance::default()).unwrap();
    let net = tiny_net(1);
    weights::apply_tail(&net, &g, &base_sha, weights::TailPart::All).unwrap();
    weights::apply_tail(&net, &l, &base_sha, weights::TailPart::Statistics).unwrap();
    let last2: Vec<String> = base.layer_names()[base.num_layers() - 2..].to_vec();
    let (got, gv, lv) = (values(&net), values(&global), values(&local));
    let mut stats = 0;
    for (name, v) in got.iter().filter(|(n, _)| weights::in_layers(n, &last2)) {
        if weights::is_statistic(name) {
            stats += 1;
            assert_eq!(v, &lv[name], "{name}: the site's own statistic");
        } else {
            assert_eq!(v, &gv[name], "{name}: the global parameter");
        }
    }
    assert!(stats > 0, "the tail has batch-norm statistics");
}

/// Inference folds each batch norm (running statistics) into its convolution and adds the
/// residual and ReLU in the same pass; it must give what the separate ops give (the tracked
/// forward pass, which runs them one by one).
#[test]
fn folded_inference_matches_the_separate_ops() {
    let net = tiny_net(5);
    // Running statistics and affine parameters away from their initial 0 / 1, so a wrong fold
    // (scale or shift swapped, left out, or applied twice) shows.
    for (i, (name, var)) in net.named_vars().into_iter().enumerate() {
        let (lo, hi) = match name.rsplit('.').next() {
            Some("running_var") => (0.5f32, 2.0f32),
            Some("running_mean" | "bias") => (-0.5, 0.5),
            Some("weight") if name.contains("bn.") => (0.5, 1.5),
            _ => continue,
        };
        let n = var.elem_count();
        let v: Vec<f32> =
            (0..n).map(|j| lo + (hi - lo) * (((i * 31 + j * 17) % 97) as f32 / 96.0)).collect();
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).expect("t")).expect("set");
    }
    let x = input(3);
    let folded = net.infer(&x).expect("infer");
    let state = site_agent::model::State::new(x);
    let separate = net.forward_range(state, 0..net.num_layers(), false, true).expect("forward").x;
    let diff = (&folded - &separate).expect("sub").abs().expect("abs").max_all().expect("max");
    let scale = separate.abs().expect("abs").max_all().expect("max");
    let (diff, scale) = (diff.to_scalar::<f32>().expect("s"), scale.to_scalar::<f32>().expect("s"));
    assert!(scale > 0.1, "the output is not trivial: {scale}");
    assert!(diff <= 1e-4 * scale, "folded {diff} off at scale {scale}");
}
