//! `relu(a + b)` at the end of a residual block, fused on the CPU.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous;

/// `relu(a + b)` for the end of a residual block: one pass forward, one backward (the same
/// masked gradient for both arguments).
#[derive(Debug)]
struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "fedtune-add-relu"
    }

    fn cpu_fwd(
        &self,
        a_s: &CpuStorage,
        al: &Layout,
        b_s: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if al.shape() != bl.shape() {
            candle_core::bail!("add_relu: shapes {:?} and {:?} differ", al.dims(), bl.dims());
        }
        let _span = super::profile::span(|| format!("add-relu fwd {}", super::plane(al)));
        let a = contiguous(a_s, al, "add_relu")?;
        let b = contiguous(b_s, bl, "add_relu")?;
        let mut y = vec![0f32; a.len()];
        y.par_chunks_mut(1 << 14).zip(a.par_chunks(1 << 14).zip(b.par_chunks(1 << 14))).for_each(
            |(y, (a, b))| {
                for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
                    *y = (a + b).max(0.0);
                }
            },
        );
        Ok((CpuStorage::F32(y), al.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !a.track_op() && !b.track_op() {
            return Ok((None, None));
        }
        let g = grad.contiguous()?.apply_op2_no_bwd(&res.contiguous()?, &ReluMask)?;
        Ok((a.track_op().then(|| g.clone()), b.track_op().then_some(g)))
    }
}

/// `grad` where `y > 0`, else 0: the backward of a ReLU from its output.
#[derive(Debug)]
struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "fedtune-relu-mask"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = super::profile::span(|| format!("relu-mask {}", super::plane(gl)));
        let g = contiguous(gs, gl, "relu mask")?;
        let y = contiguous(ys, yl, "relu mask")?;
        if g.len() != y.len() {
            candle_core::bail!("relu mask: shapes {:?} and {:?} differ", gl.dims(), yl.dims());
        }
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(1 << 14).zip(g.par_chunks(1 << 14).zip(y.par_chunks(1 << 14))).for_each(
            |(o, (g, y))| {
                for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                    *o = if y > 0.0 { g } else { 0.0 };
                }
            },
        );
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// `relu(a + b)`, fused on contiguous f32 CPU tensors, candle ops elsewhere.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !a.device().is_cpu() || a.dtype() != candle_core::DType::F32 || a.shape() != b.shape() {
        return (a + b)?.relu();
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}
