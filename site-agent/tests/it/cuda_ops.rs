//! The engine's ops on a CUDA GPU against the CPU ops (`cuda` feature; skipped with a message
//! where no GPU is visible): cuDNN convolution forward, backward-data and backward-filter,
//! batch norm (training and inference), the fused residual add, and the loss, on random shapes;
//! values and gradients agree to a relative L2 error of 1e-4 in fp32 (TF32 off).
#![cfg(feature = "cuda")]

use crate::gpu;
use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use site_agent::model::ops::{add_relu, conv2d};

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(&Device::Cpu).expect("to cpu");
    let b = b.to_device(&Device::Cpu).expect("to cpu");
    let d = (&a - &b).expect("sub").sqr().expect("sqr").sum_all().expect("sum");
    let n = b.sqr().expect("sqr").sum_all().expect("sum");
    let (d, n) = (d.to_scalar::<f32>().expect("s") as f64, n.to_scalar::<f32>().expect("s") as f64);
    d.sqrt() / n.sqrt().max(1e-12)
}

fn random(shape: &[usize], rng: &mut ChaCha8Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

const TOL: f64 = 1e-4;

#[test]
fn cudnn_convolutions_match_the_cpu_op_in_values_and_gradients() {
    let Some(dev) = gpu() else { return };
    assert!(
        !site_agent::model::ops::tf32_allowed(),
        "run with FEDTUNE_TF32 unset: fp32 is compared"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut worst = 0f64;
    for case in 0..40 {
        let (batch, cin, cout) =
            (rng.random_range(1..5), rng.random_range(1..20), rng.random_range(1..20));
        let k = [1usize, 3, 5][rng.random_range(0..3)];
        let (stride, pad) = (rng.random_range(1..3), rng.random_range(0..3));
        let (h, w) = (rng.random_range(k..40), rng.random_range(k..40));
        let x = random(&[batch, cin, h, w], &mut rng);
        let wt = random(&[cout, cin, k, k], &mut rng);
        let mut outs = Vec::new();
        let mut proj = None;
        for d in [&Device::Cpu, &dev] {
            let xv = Var::from_tensor(&x.to_device(d).expect("x")).expect("var");
            let wv = Var::from_tensor(&wt.to_device(d).expect("w")).expect("var");
            let y = conv2d(xv.as_tensor(), wv.as_tensor(), stride, pad).expect("conv");
            let p = proj.get_or_insert_with(|| random(y.dims(), &mut rng)).to_device(d).expect("p");
            let g = (&y * &p).expect("mul").sum_all().expect("sum").backward().expect("bwd");
            let gx = g.get(xv.as_tensor()).expect("dx").clone();
            let gw = g.get(wv.as_tensor()).expect("dw").clone();
            outs.push((y, gx, gw));
        }
        let (c, g) = (&outs[0], &outs[1]);
        let shape =
            format!("case {case}: x {:?} w {:?} stride {stride} pad {pad}", x.dims(), wt.dims());
        for (what, a, b) in [("y", &g.0, &c.0), ("dx", &g.1, &c.1), ("dw", &g.2, &c.2)] {
            let e = rel_l2(a, b);
            worst = worst.max(e);
            assert!(e <= TOL, "{shape}: {what} relative L2 {e:e}");
        }
    }
    eprintln!("cuDNN convolution vs CPU: worst relative L2 {worst:e} over 40 random shapes");
}

#[test]
fn batch_norm_residual_and_loss_on_the_gpu_match_the_cpu() {
    let Some(dev) = gpu() else { return };
    use site_agent::data::phantom;
    use site_agent::model::{ModelConfig, Net, loss};
    let cfg = ModelConfig::preset("tiny").expect("preset");
    let organs = phantom::organ_map();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let s = cfg.image_size;
    let x = random(&[4, cfg.slice_spec().channels(), s, s], &mut rng);
    let classes = organs.num_classes() as u32;
    let labels: Vec<u32> = (0..4 * s * s).map(|_| rng.random_range(0..classes)).collect();
    let t = Tensor::from_vec(labels, (4, s, s), &Device::Cpu).expect("labels");
    let mut runs = Vec::new();
    for d in [&Device::Cpu, &dev] {
        // The same initial weights on both devices (initialisation is seeded on the host).
        let net = Net::new(&cfg, &organs, 3, d).expect("net");
        let logits = net
            .tail(site_agent::model::State::new(x.to_device(d).expect("x")), net.num_layers(), true)
            .expect("fwd");
        let l = loss::loss(&logits, &t.to_device(d).expect("t"), 1.0).expect("loss");
        let grads = l.backward().expect("bwd");
        let g: Vec<Tensor> = net
            .trainable_vars(net.num_layers())
            .expect("vars")
            .iter()
            .map(|v| grads.get(v.as_tensor()).expect("grad").clone())
            .collect();
        let infer = net.infer(&x.to_device(d).expect("x")).expect("infer");
        runs.push((logits, l, g, infer));
    }
    let (c, g) = (&runs[0], &runs[1]);
    assert!(rel_l2(&g.0, &c.0) <= TOL, "training-mode logits: {:e}", rel_l2(&g.0, &c.0));
    assert!(rel_l2(&g.1, &c.1) <= TOL, "loss: {:e}", rel_l2(&g.1, &c.1));
    assert!(rel_l2(&g.3, &c.3) <= TOL, "inference logits: {:e}", rel_l2(&g.3, &c.3));
    for (i, (a, b)) in g.2.iter().zip(&c.2).enumerate() {
        // A few tensors' gradients are tiny (a layer's batch-norm shift ahead of another
        // normalisation); compare them against the scale of the whole gradient.
        let e = rel_l2(a, b);
        assert!(e <= 1e-3, "parameter {i}: gradient relative L2 {e:e}");
    }
    let a = random(&[2, 3, 5, 4], &mut rng);
    let b = random(&[2, 3, 5, 4], &mut rng);
    let cpu = add_relu(&a, &b).expect("cpu");
    let gpu =
        add_relu(&a.to_device(&dev).expect("a"), &b.to_device(&dev).expect("b")).expect("gpu");
    assert!(rel_l2(&gpu, &cpu) <= TOL);
}
