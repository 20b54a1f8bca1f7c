//! Inference-only convolution with batch norm folded in: `relu(conv(x, w * scale) + shift
//! [+ residual])` in one pass over the output, each tile finished while it is in cache.
//!
//! What frozen layers and evaluation run on the CPU: no autograd graph, no separate batch-norm
//! and add-ReLU passes over the activation (each a read and a write of the whole feature map).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::conv::{Conv2d, convolve_then};
use super::winograd;
use super::{contiguous, dims4};

/// The folded convolution: weights scaled per output channel, then `+ shift`, `+ residual`
/// when given, and ReLU when `relu`.
#[derive(Debug)]
struct FusedConv {
    conv: Conv2d,
    scale: Vec<f32>,
    shift: Vec<f32>,
    relu: bool,
}

impl FusedConv {
    fn run(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, co) = self.conv.geometry(xl, wl)?;
        let pass = if winograd::wins(&g, co) { "winograd" } else { "fused" };
        let _span = super::profile::span(|| Conv2d::key(pass, &g, co));
        if self.scale.len() != co || self.shift.len() != co {
            candle_core::bail!("fused conv: {co} output channels, {} scales", self.scale.len());
        }
        let x = contiguous(xs, xl, "fused conv input")?;
        let (p, l) = (g.patch(), g.cols_len());
        let out = [g.batch, co, g.out_h(), g.out_w()];
        let res = match residual {
            Some((rs, rl)) if dims4(rl, "fused conv residual")? == out => {
                Some(contiguous(rs, rl, "fused conv residual")?)
            }
            Some((_, rl)) => {
                candle_core::bail!("fused conv: residual {:?}, output {out:?}", rl.dims())
            }
            None => None,
        };
        let w = contiguous(ws, wl, "fused conv weight")?;
        let folded: Vec<f32> = w
            .chunks_exact(p)
            .zip(&self.scale)
            .flat_map(|(row, &s)| row.iter().map(move |v| v * s))
            .collect();
        let y = convolve_then(&g, &folded, co, x, |b, y, pixels| {
            let rb = res.map(|r| &r[b * co * l..][..co * l]);
            for c in 0..co {
                let (at, shift) = (c * l, self.shift[c]);
                let span = at + pixels.start..at + pixels.end;
                let yc = &mut y[span.clone()];
                match rb {
                    Some(r) => {
                        for (v, r) in yc.iter_mut().zip(&r[span]) {
                            *v += shift + r;
                        }
                    }
                    None => yc.iter_mut().for_each(|v| *v += shift),
                }
                if self.relu {
                    yc.iter_mut().for_each(|v| *v = v.max(0.0));
                }
            }
        });
        Ok((CpuStorage::F32(y), Shape::from(out.to_vec())))
    }
}

impl CustomOp2 for FusedConv {
    fn name(&self) -> &'static str {
        "fedtune-fused-conv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(xs, xl, ws, wl, None)
    }
}

impl CustomOp3 for FusedConv {
    fn name(&self) -> &'static str {
        "fedtune-fused-conv-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(xs, xl, ws, wl, Some((rs, rl)))
    }
}

/// Inference-only `relu?(conv2d(x, w) * scale[c] + shift[c] (+ residual))` for batch norm with
/// running statistics folded into the convolution, on contiguous f32 CPU tensors; `None`
/// elsewhere (the caller runs the separate ops). The result carries no gradient.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_folded(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    pad: usize,
    scale: &Tensor,
    shift: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !f32_cpu(x) || !f32_cpu(w) || !residual.is_none_or(f32_cpu) {
        return Ok(None);
    }
    let op = FusedConv {
        conv: Conv2d::new(stride, pad),
        scale: scale.to_vec1::<f32>()?,
        shift: shift.to_vec1::<f32>()?,
        relu,
    };
    let (x, w) = (x.detach().contiguous()?, w.detach().contiguous()?);
    Ok(Some(match residual {
        Some(r) => x.apply_op3_no_bwd(&w, &r.detach().contiguous()?, &op)?,
        None => x.apply_op2_no_bwd(&w, &op)?,
    }))
}
