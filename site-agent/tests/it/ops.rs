//! The CPU training ops against candle's reference implementations: forward values and
//! gradients agree to a relative L2 error of 1e-5 on random shapes.

use candle_core::{Device, Tensor, Var};
use proptest::prelude::*;
use site_agent::model::ops::{
    batch_norm_train, channel_affine, conv2d, conv2d_folded, upsample_cat,
};

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b)
        .expect("sub")
        .sqr()
        .expect("sqr")
        .sum_all()
        .expect("sum")
        .to_scalar::<f32>()
        .expect("s");
    let n = b.sqr().expect("sqr").sum_all().expect("sum").to_scalar::<f32>().expect("s");
    (d as f64).sqrt() / (n as f64).sqrt().max(1e-12)
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(0x9e3779b97f4a7c15).wrapping_add(1);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn conv2d_matches_candle(
        batch in 1usize..4, cin in 1usize..6, cout in 1usize..6,
        h in 1usize..12, w in 1usize..12, k in prop::sample::select(vec![1usize, 3, 5]),
        stride in 1usize..3, pad in 0usize..3, seed in any::<u64>(),
    ) {
        prop_assume!(h + 2 * pad >= k && w + 2 * pad >= k);
        let x = Var::from_tensor(&random(&[batch, cin, h, w], seed)).expect("var");
        let wt = Var::from_tensor(&random(&[cout, cin, k, k], seed ^ 1)).expect("var");
        let ours = conv2d(x.as_tensor(), wt.as_tensor(), stride, pad).expect("ours");
        let theirs = x.as_tensor().conv2d(wt.as_tensor(), pad, stride, 1, 1).expect("candle");
        prop_assert_eq!(ours.dims(), theirs.dims());
        prop_assert!(rel_l2(&ours, &theirs) <= 1e-5);
        // Gradients through a random projection of the output. Convolution is linear in each
        // argument, so <grad_x, x> = <grad_w, w> = <conv(x, w), proj> holds exactly for every
        // shape (the adjoint test).
        let proj = random(ours.dims(), seed ^ 2);
        let value = (&ours * &proj).expect("mul").sum_all().expect("sum");
        let g1 = value.backward().expect("bwd");
        let v = value.to_scalar::<f32>().expect("scalar") as f64;
        for var in [&x, &wt] {
            let g = g1.get(var.as_tensor()).expect("grad");
            let dot = (g * var.as_tensor()).expect("mul").sum_all().expect("sum").to_scalar::<f32>().expect("s") as f64;
            prop_assert!((dot - v).abs() <= 1e-4 * v.abs().max(1.0), "adjoint {dot} vs {v}");
        }
        // candle's own backward mis-shapes the input gradient when the stride does not divide
        // the padded extent, so it is the reference only where it is defined.
        if (h + 2 * pad - k) % stride == 0 && (w + 2 * pad - k) % stride == 0 {
            let g2 = (theirs * &proj).expect("mul").sum_all().expect("sum").backward().expect("bwd");
            for var in [&x, &wt] {
                let (a, b) = (g1.get(var.as_tensor()).expect("grad"), g2.get(var.as_tensor()).expect("grad"));
                prop_assert!(rel_l2(a, b) <= 1e-5, "gradient rel L2 {}", rel_l2(a, b));
            }
        }
    }

    #[test]
    fn fused_batch_norm_matches_tensor_ops(
        batch in 2usize..5, c in 1usize..6, h in 1usize..9, w in 1usize..9, seed in any::<u64>(),
        relu in any::<bool>(),
    ) {
        let x = Var::from_tensor(&random(&[batch, c, h, w], seed)).expect("var");
        let g = Var::from_tensor(&(random(&[c], seed ^ 3) + 1.5).expect("add")).expect("var");
        let b = Var::from_tensor(&random(&[c], seed ^ 4)).expect("var");
        let out = batch_norm_train(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5, relu)
            .expect("op")
            .expect("applies on cpu f32");
        let (ours, mean, var) = (out.y, out.mean, out.var);
        // Reference: plain tensor ops.
        let xt = x.as_tensor();
        let m = xt.mean_keepdim(0).unwrap().mean_keepdim(2).unwrap().mean_keepdim(3).unwrap();
        let xc = xt.broadcast_sub(&m).unwrap();
        let v = xc.sqr().unwrap().mean_keepdim(0).unwrap().mean_keepdim(2).unwrap().mean_keepdim(3).unwrap();
        let theirs = xc
            .broadcast_div(&(v.clone() + 1e-5).unwrap().sqrt().unwrap()).unwrap()
            .broadcast_mul(&g.as_tensor().reshape((1, c, 1, 1)).unwrap()).unwrap()
            .broadcast_add(&b.as_tensor().reshape((1, c, 1, 1)).unwrap()).unwrap();
        let theirs = if relu { theirs.relu().unwrap() } else { theirs };
        prop_assert!(rel_l2(&ours, &theirs) <= 1e-5);
        let mt = Tensor::new(mean, &Device::Cpu).unwrap();
        // Means of O(1) data can be near zero: compare them at the data's scale (the f32
        // reference's own summation error is ~1e-7 per term).
        let mean_err = (&mt - m.flatten_all().unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        prop_assert!(mean_err <= 1e-5, "mean error {mean_err}");
        let vt = Tensor::new(var, &Device::Cpu).unwrap();
        prop_assert!(rel_l2(&vt, &v.flatten_all().unwrap()) <= 1e-5);
        let proj = random(ours.dims(), seed ^ 5);
        let g1 = (ours * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        for t in [&x, &g, &b] {
            let (a, r) = (g1.get(t.as_tensor()).expect("grad"), g2.get(t.as_tensor()).expect("grad"));
            // With few samples per channel the input gradient nearly vanishes, so the bound
            // is relative with a small absolute floor.
            let norm = r.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
            let floor = 1e-5 * (r.elem_count() as f64).sqrt();
            prop_assert!(rel_l2(a, r) * norm.max(1e-12) <= 1e-4 * norm + floor, "gradient rel L2 {}", rel_l2(a, r));
        }
    }
}

/// Kernels wider than the input, where some taps read only padding (found by the property test:
/// the column offset of such a tap underflowed).
/// At the sizes where the CPU convolution switches to Winograd F(2x2, 3x3) (3x3, stride 1,
/// from 32 channels at 64x64; the shapes above are all below that), the forward pass, both
/// gradients and the folded inference convolution still match candle's direct convolution.
/// Odd sizes clip the last row and column of 2x2 output blocks.
#[test]
fn winograd_sized_convolutions_match_candle() {
    for (batch, ci, co, h, w) in [(1, 32, 40, 64, 64), (2, 64, 32, 33, 35)] {
        let x = Var::from_tensor(&random(&[batch, ci, h, w], 7)).expect("var");
        let wt = Var::from_tensor(&random(&[co, ci, 3, 3], 8)).expect("var");
        let ours = conv2d(x.as_tensor(), wt.as_tensor(), 1, 1).expect("ours");
        let theirs = x.as_tensor().conv2d(wt.as_tensor(), 1, 1, 1, 1).expect("candle");
        assert!(rel_l2(&ours, &theirs) <= 1e-5, "forward {}", rel_l2(&ours, &theirs));
        let proj = random(ours.dims(), 9);
        let g1 = (&ours * &proj).expect("mul").sum_all().expect("sum").backward().expect("bwd");
        let g2 = (&theirs * &proj).expect("mul").sum_all().expect("sum").backward().expect("bwd");
        for var in [&x, &wt] {
            let (a, b) =
                (g1.get(var.as_tensor()).expect("grad"), g2.get(var.as_tensor()).expect("grad"));
            assert!(rel_l2(a, b) <= 1e-5, "gradient rel L2 {}", rel_l2(a, b));
        }
        // Folded: relu(conv * scale + shift + residual).
        let scale = random(&[co], 10).affine(0.5, 1.0).expect("scale");
        let shift = random(&[co], 11);
        let res = random(ours.dims(), 12);
        let folded =
            conv2d_folded(x.as_tensor(), wt.as_tensor(), 1, 1, &scale, &shift, Some(&res), true)
                .expect("folded")
                .expect("cpu f32");
        let per_channel = |t: &Tensor| t.reshape((1, co, 1, 1)).expect("reshape");
        let reference = theirs
            .broadcast_mul(&per_channel(&scale))
            .and_then(|t| t.broadcast_add(&per_channel(&shift)))
            .and_then(|t| t + &res)
            .and_then(|t| t.relu())
            .expect("reference");
        assert!(rel_l2(&folded, &reference) <= 1e-5, "folded {}", rel_l2(&folded, &reference));
    }
}

#[test]
fn conv2d_with_taps_that_only_read_padding() {
    for (h, w, k, stride, pad) in
        [(1, 1, 5, 1, 2), (2, 1, 5, 1, 2), (1, 3, 5, 2, 2), (3, 3, 5, 1, 2), (2, 2, 3, 2, 1)]
    {
        let x = Var::from_tensor(&random(&[2, 2, h, w], 3)).expect("var");
        let wt = Var::from_tensor(&random(&[3, 2, k, k], 4)).expect("var");
        let ours = conv2d(x.as_tensor(), wt.as_tensor(), stride, pad).expect("ours");
        let theirs = x.as_tensor().conv2d(wt.as_tensor(), pad, stride, 1, 1).expect("candle");
        assert_eq!(ours.dims(), theirs.dims());
        assert!(rel_l2(&ours, &theirs) <= 1e-5, "{h}x{w} k{k} s{stride} p{pad}");
        let g = ours.sum_all().expect("sum").backward().expect("backward");
        assert_eq!(g.get(x.as_tensor()).expect("grad").dims(), x.dims());
    }
}

#[test]
fn channel_affine_matches_tensor_ops() {
    for relu in [false, true] {
        let x = random(&[3, 4, 5, 6], 8);
        let (scale, shift) = (random(&[4], 9), random(&[4], 10));
        let ours =
            channel_affine(&x, &scale, &shift, relu).expect("op").expect("applies on cpu f32");
        let theirs = x
            .broadcast_mul(&scale.reshape((1, 4, 1, 1)).expect("reshape"))
            .expect("mul")
            .broadcast_add(&shift.reshape((1, 4, 1, 1)).expect("reshape"))
            .expect("add");
        let theirs = if relu { theirs.relu().expect("relu") } else { theirs };
        assert!(rel_l2(&ours, &theirs) <= 1e-6);
    }
}

/// A detached input or a frozen (detached) weight gets no gradient, and the other argument's
/// gradient is unchanged by that.
#[test]
fn conv2d_gradients_only_for_tracked_arguments() {
    let x = Var::from_tensor(&random(&[3, 2, 7, 6], 11)).expect("var");
    let wt = Var::from_tensor(&random(&[4, 2, 3, 3], 12)).expect("var");
    let proj = random(&[3, 4, 7, 6], 13);
    let loss = |x: &Tensor, w: &Tensor| {
        (conv2d(x, w, 1, 1).expect("conv") * &proj).expect("mul").sum_all().expect("sum")
    };
    let both = loss(x.as_tensor(), wt.as_tensor()).backward().expect("bwd");
    let only_w = loss(&x.as_detached_tensor(), wt.as_tensor()).backward().expect("bwd");
    let only_x = loss(x.as_tensor(), &wt.as_detached_tensor()).backward().expect("bwd");
    assert!(only_w.get(x.as_tensor()).is_none());
    assert!(only_x.get(wt.as_tensor()).is_none());
    let same = |a: Option<&Tensor>, b: Option<&Tensor>| rel_l2(a.expect("grad"), b.expect("grad"));
    assert_eq!(same(only_w.get(wt.as_tensor()), both.get(wt.as_tensor())), 0.0);
    assert_eq!(same(only_x.get(x.as_tensor()), both.get(x.as_tensor())), 0.0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// The fused loss op gives the value and logits gradient of the tensor-op reference.
    #[test]
    fn fused_loss_matches_reference(
        batch in 1usize..4, classes in 1usize..6, h in 1usize..9, w in 1usize..9,
        dice_weight in prop::sample::select(vec![0.0f64, 1.0, 0.5]), seed in any::<u64>(),
    ) {
        use site_agent::model::loss::{loss, loss_reference};
        let z = Var::from_tensor(&(random(&[batch, classes, h, w], seed) * 4.0).expect("scale")).expect("var");
        let labels: Vec<u32> = (0..batch * h * w)
            .map(|i| ((seed >> (i % 40)) as usize + i * 7) as u32 % classes as u32)
            .collect();
        let t = Tensor::from_vec(labels, (batch, h, w), &Device::Cpu).expect("targets");
        let ours = loss(z.as_tensor(), &t, dice_weight).expect("fused");
        let theirs = loss_reference(z.as_tensor(), &t, dice_weight).expect("reference");
        let (a, b) = (ours.to_scalar::<f32>().expect("s"), theirs.to_scalar::<f32>().expect("s"));
        prop_assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "loss {a} vs {b}");
        let ga = (ours * 3.0).expect("scale").backward().expect("bwd");
        let gb = (theirs * 3.0).expect("scale").backward().expect("bwd");
        let (ga, gb) = (ga.get(z.as_tensor()).expect("grad"), gb.get(z.as_tensor()).expect("grad"));
        prop_assert!(rel_l2(ga, gb) <= 1e-5, "gradient rel L2 {}", rel_l2(ga, gb));
    }
}

/// The Dice term averages over the foreground classes present in the targets only: a batch of
/// background alone costs its cross-entropy and nothing more, and a class absent from the batch
/// adds no term that would push its probability towards zero.
#[test]
fn dice_counts_only_the_classes_present() {
    use site_agent::model::loss::{loss, loss_reference};
    let z = Var::from_tensor(&random(&[2, 4, 3, 3], 41)).expect("var");
    let background = Tensor::zeros((2, 3, 3), candle_core::DType::U32, &Device::Cpu).expect("t");
    for f in [loss, loss_reference] {
        let ce = f(z.as_tensor(), &background, 0.0).expect("ce").to_scalar::<f32>().expect("s");
        let both = f(z.as_tensor(), &background, 1.0).expect("l").to_scalar::<f32>().expect("s");
        assert_eq!(ce, both, "no foreground class present: the loss is the cross-entropy");
    }
    // Classes 1 and 2 present, class 3 absent: the Dice term is the mean of two ratios.
    let labels: Vec<u32> = (0..18).map(|i| [0, 1, 2][i % 3]).collect();
    let t = Tensor::from_vec(labels.clone(), (2, 3, 3), &Device::Cpu).expect("targets");
    let p = candle_nn::ops::softmax(z.as_tensor(), 1)
        .expect("softmax")
        .reshape((2, 4, 9))
        .expect("reshape")
        .to_vec3::<f32>()
        .expect("probabilities");
    let dice = |c: usize| {
        let (mut inter, mut sum_p, mut sum_t) = (0f64, 0f64, 0f64);
        for (b, image) in p.iter().enumerate() {
            for i in 0..9 {
                let pv = image[c][i] as f64;
                let tv = if labels[b * 9 + i] as usize == c { 1.0 } else { 0.0 };
                inter += pv * tv;
                sum_p += pv;
                sum_t += tv;
            }
        }
        (2.0 * inter + 1.0) / (sum_p + sum_t + 1.0)
    };
    let expected_dice = 1.0 - (dice(1) + dice(2)) / 2.0;
    for f in [loss, loss_reference] {
        let ce = f(z.as_tensor(), &t, 0.0).expect("ce").to_scalar::<f32>().expect("s") as f64;
        let all = f(z.as_tensor(), &t, 1.0).expect("l").to_scalar::<f32>().expect("s") as f64;
        assert!(
            ((all - ce) - expected_dice).abs() <= 1e-5,
            "Dice term {} vs {expected_dice} over the two present classes",
            all - ce
        );
    }
}

#[test]
fn fused_loss_refuses_labels_outside_the_classes() {
    let z = random(&[1, 3, 2, 2], 5);
    let t = Tensor::from_vec(vec![0u32, 1, 2, 3], (1, 2, 2), &Device::Cpu).expect("targets");
    let err = site_agent::model::loss::loss(&z, &t, 1.0).expect_err("label 3 of 3 classes");
    assert!(err.to_string().contains("label 3 is outside"), "{err}");
}

#[test]
fn add_relu_matches_tensor_ops() {
    let a = Var::from_tensor(&random(&[2, 3, 5, 4], 21)).expect("var");
    let b = Var::from_tensor(&random(&[2, 3, 5, 4], 22)).expect("var");
    let proj = random(&[2, 3, 5, 4], 23);
    let ours = site_agent::model::ops::add_relu(a.as_tensor(), b.as_tensor()).expect("ours");
    let theirs = (a.as_tensor() + b.as_tensor()).expect("add").relu().expect("relu");
    assert_eq!(rel_l2(&ours, &theirs), 0.0);
    let g1 = (ours * &proj).expect("mul").sum_all().expect("sum").backward().expect("bwd");
    let g2 = (theirs * &proj).expect("mul").sum_all().expect("sum").backward().expect("bwd");
    for v in [&a, &b] {
        let (x, y) = (g1.get(v.as_tensor()).expect("grad"), g2.get(v.as_tensor()).expect("grad"));
        assert!(rel_l2(x, y) <= 1e-7, "gradient rel L2 {}", rel_l2(x, y));
    }
}

/// The fused AdamW takes the same steps as candle's (learning rate changes and weight decay
/// included), and leaves a variable without a gradient alone.
#[test]
fn fused_adamw_matches_candle() {
    use candle_nn::Optimizer;
    use site_agent::model::optim::{AdamW, ParamsAdamW};
    let params = ParamsAdamW { lr: 0.05, weight_decay: 0.01, ..Default::default() };
    let init = [random(&[4, 3], 31), random(&[7], 32), random(&[2], 33)];
    let ours: Vec<Var> = init.iter().map(|t| Var::from_tensor(t).expect("var")).collect();
    let theirs: Vec<Var> = init.iter().map(|t| Var::from_tensor(t).expect("var")).collect();
    let mut a = AdamW::new(ours.clone(), params.clone()).expect("ours");
    let mut b = candle_nn::AdamW::new(theirs.clone(), params).expect("candle");
    // The third variable takes no part in the loss: it gets no gradient.
    let loss = |v: &[Var]| {
        let t = random(&[4, 3], 34);
        let l1 = (v[0].as_tensor() - &t).expect("sub").sqr().expect("sqr").sum_all().expect("sum");
        let l2 = v[1].as_tensor().sqr().expect("sqr").sum_all().expect("sum");
        (l1 + (l2 * 3.0).expect("mul")).expect("add")
    };
    for step in 0..6 {
        let lr = 0.05 / (1.0 + step as f64);
        a.set_learning_rate(lr);
        b.set_learning_rate(lr);
        a.backward_step(&loss(&ours)).expect("step");
        b.backward_step(&loss(&theirs)).expect("step");
    }
    for (x, y) in ours.iter().zip(&theirs) {
        assert!(
            rel_l2(x.as_tensor(), y.as_tensor()) <= 1e-5,
            "{}",
            rel_l2(x.as_tensor(), y.as_tensor())
        );
    }
    assert_eq!(rel_l2(ours[2].as_tensor(), &init[2]), 0.0);
    assert!(rel_l2(ours[0].as_tensor(), &init[0]) > 0.01, "the parameters moved");
}

/// A fuse layer's input as one op: values equal candle's upsample + cat at every size (candle's
/// nearest rule, non-integer factors too); gradients equal candle's where candle has a
/// backward (integer factors), and pass the adjoint test everywhere.
#[test]
fn upsample_cat_matches_candle_in_values_and_gradients() {
    for (b, cx, cs, hx, wx, h, w) in [
        (2, 3, 2, 4, 5, 8, 10),
        (1, 2, 3, 3, 3, 9, 9),
        (2, 1, 1, 3, 4, 5, 7),
        (1, 2, 2, 4, 4, 4, 4),
    ] {
        let x = Var::from_tensor(&random(&[b, cx, hx, wx], 11)).expect("var");
        let skip = Var::from_tensor(&random(&[b, cs, h, w], 12)).expect("var");
        let ours = upsample_cat(x.as_tensor(), skip.as_tensor()).expect("ours");
        let up = x.as_tensor().upsample_nearest2d(h, w).expect("upsample");
        let theirs = Tensor::cat(&[&up, skip.as_tensor()], 1).expect("cat");
        assert_eq!(ours.dims(), theirs.dims());
        assert_eq!(
            rel_l2(&ours, &theirs),
            0.0,
            "copies are exact: {b}x{cx}+{cs} {hx}x{wx}->{h}x{w}"
        );
        let proj = random(ours.dims(), 13);
        let value = (&ours * &proj).expect("mul").sum_all().expect("sum");
        let g1 = value.backward().expect("backward");
        // Linear in (x, skip): <dx, x> + <dskip, skip> = <out, proj>.
        let v = value.to_scalar::<f32>().expect("s") as f64;
        let dot = |var: &Var| {
            let g = g1.get(var.as_tensor()).expect("grad");
            assert_eq!(g.dims(), var.dims());
            (g * var.as_tensor())
                .expect("mul")
                .sum_all()
                .expect("sum")
                .to_scalar::<f32>()
                .expect("s") as f64
        };
        let total = dot(&x) + dot(&skip);
        assert!((total - v).abs() <= 1e-4 * v.abs().max(1.0), "adjoint {total} vs {v}");
        if h % hx == 0 && w % wx == 0 && h / hx == w / wx {
            let g2 =
                (theirs * &proj).expect("mul").sum_all().expect("sum").backward().expect("bwd");
            for var in [&x, &skip] {
                let (a, r) = (
                    g1.get(var.as_tensor()).expect("grad"),
                    g2.get(var.as_tensor()).expect("grad"),
                );
                assert!(rel_l2(a, r) <= 1e-6, "gradient rel L2 {}", rel_l2(a, r));
            }
        }
    }
}
