//! Times the CPU convolution's three training passes and the folded inference convolution at
//! the 3x3 stride-1 shapes of `resnet103` at 256x256 (batch 4), in GFLOP/s of the direct
//! convolution's arithmetic (whatever algorithm ran: Winograd does less of it), and training
//! batch norm in GB/s of activation, from the op profile:
//! `cargo run --release -p site-agent --example conv_shapes [-- BATCH [REPEAT]]`
//! (`FEDTUNE_WINOGRAD=0` for im2col + GEMM everywhere). What `bench/RESULTS.md`'s per-shape
//! figures come from.

use candle_core::{Device, Tensor, Var};
use site_agent::model::ops::{batch_norm_train, conv2d, conv2d_folded, profile};

fn main() -> candle_core::Result<()> {
    let mut args = std::env::args().skip(1);
    let batch: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let repeat: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let dev = Device::Cpu;
    // (input channels, output channels, size): the 3x3 stride-1 layers of resnet103.
    let shapes = [(32, 32, 256), (96, 32, 256), (64, 64, 128), (128, 128, 64), (256, 256, 32)];
    println!("batch {batch}, best of {repeat}, {} threads", rayon::current_num_threads());
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>10}",
        "shape", "fwd", "bwd-data", "bwd-filter", "inference"
    );
    for (ci, co, s) in shapes {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, ci, s, s), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (co, ci, 3, 3), &dev)?)?;
        let proj = Tensor::randn(0f32, 1.0, (batch, co, s, s), &dev)?;
        let flops = 2.0 * (batch * co * ci * 9 * s * s) as f64;
        let scale = Tensor::ones(co, candle_core::DType::F32, &dev)?;
        let shift = Tensor::zeros(co, candle_core::DType::F32, &dev)?;
        let mut best = [f64::MAX; 4];
        for i in 0..=repeat {
            profile::enable(i > 0);
            let y = conv2d(x.as_tensor(), w.as_tensor(), 1, 1)?;
            let _ = (y * &proj)?.sum_all()?.backward()?;
            // The folded inference convolution (Winograd where it applies), with ReLU.
            let _ = conv2d_folded(x.as_tensor(), w.as_tensor(), 1, 1, &scale, &shift, None, true)?;
            profile::enable(false);
            for op in profile::take() {
                let pass = ["fwd ", "bwd-data ", "bwd-filter ", "fused ", "winograd "]
                    .iter()
                    .position(|p| op.op.starts_with(&format!("conv {p}")));
                if let Some(p) = pass {
                    best[p.min(3)] = best[p.min(3)].min(op.seconds);
                }
            }
        }
        // Direct-convolution FLOPs per second, whatever algorithm ran.
        let g = |t: f64| format!("{:.0} GF/s", flops / t / 1e9);
        let name = format!("{ci}->{co} 3x3 @{s}x{s}");
        let [f, d, wg, inf] = best.map(g);
        println!("{name:<28} {f:>10} {d:>10} {wg:>10} {inf:>10}");
    }
    // Training-mode batch norm + ReLU at each width: memory-bound, so GB/s of activation read.
    println!("{:<28} {:>10} {:>10}", "batch norm + ReLU", "fwd", "bwd");
    for (c, s) in [(32, 256), (64, 128), (128, 64), (256, 32)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, c, s, s), &dev)?)?;
        let gamma = Var::from_tensor(&Tensor::ones(c, candle_core::DType::F32, &dev)?)?;
        let beta = Var::from_tensor(&Tensor::zeros(c, candle_core::DType::F32, &dev)?)?;
        let proj = Tensor::randn(0f32, 1.0, (batch, c, s, s), &dev)?;
        let bytes = (batch * c * s * s * 4) as f64;
        let mut best = [f64::MAX; 2];
        for i in 0..=repeat {
            profile::enable(i > 0);
            let out =
                batch_norm_train(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), 1e-5, true)?
                    .expect("cpu f32");
            let _ = (out.y * &proj)?.sum_all()?.backward()?;
            profile::enable(false);
            for op in profile::take() {
                let pass =
                    ["batchnorm fwd", "batchnorm bwd"].iter().position(|p| op.op.starts_with(p));
                if let Some(p) = pass {
                    best[p] = best[p].min(op.seconds);
                }
            }
        }
        let g = |t: f64| format!("{:.1} GB/s", bytes / t / 1e9);
        println!("{:<28} {:>10} {:>10}", format!("{c}@{s}x{s}"), g(best[0]), g(best[1]));
    }
    Ok(())
}
