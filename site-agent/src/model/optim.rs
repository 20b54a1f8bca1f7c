//! AdamW with decoupled weight decay, the update of every parameter tensor done in one pass.
//!
//! Same arithmetic as `candle_nn::AdamW` (tested against it), which spends about thirteen
//! tensor ops (each an allocation and a trip through candle's thread pool) per parameter per
//! step: with a few dozen small tensors that was a visible share of a training step. Here the
//! moments are plain vectors and each parameter is updated in place by an [`InplaceOp2`].
//! On other devices or dtypes it is `candle_nn::AdamW`.

use std::sync::Mutex;

use candle_core::{
    CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, Var, backprop::GradStore,
};
use candle_nn::Optimizer;
pub use candle_nn::ParamsAdamW;
use rayon::prelude::*;

/// One parameter and its first and second moments.
#[derive(Debug)]
struct Slot {
    var: Var,
    m: Mutex<Vec<f32>>,
    v: Mutex<Vec<f32>>,
}

/// The AdamW optimizer over a set of variables.
#[derive(Debug)]
pub struct AdamW {
    params: ParamsAdamW,
    step_t: i32,
    slots: Vec<Slot>,
    /// Used where the fused update does not apply (another device or dtype).
    fallback: Option<candle_nn::AdamW>,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let fused = vars.iter().all(|v| v.device().is_cpu() && v.dtype() == DType::F32);
        if !fused {
            let fallback = candle_nn::AdamW::new(vars, params.clone())?;
            return Ok(Self { params, step_t: 0, slots: Vec::new(), fallback: Some(fallback) });
        }
        let slots = vars
            .into_iter()
            .map(|var| {
                let n = var.elem_count();
                Slot { var, m: Mutex::new(vec![0.0; n]), v: Mutex::new(vec![0.0; n]) }
            })
            .collect();
        Ok(Self { params, step_t: 0, slots, fallback: None })
    }

    pub fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
        if let Some(f) = &mut self.fallback {
            f.set_learning_rate(lr);
        }
    }

    /// Backpropagates `loss` and applies one update.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// One update from the gradients in `grads`; variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        if let Some(f) = &mut self.fallback {
            return f.step(grads);
        }
        self.step_t += 1;
        let p = &self.params;
        let update = Update {
            lr: p.lr as f32,
            decay: (1.0 - p.lr * p.weight_decay) as f32,
            beta1: p.beta1 as f32,
            beta2: p.beta2 as f32,
            scale_m: (1.0 / (1.0 - p.beta1.powi(self.step_t))) as f32,
            scale_v: (1.0 / (1.0 - p.beta2.powi(self.step_t))) as f32,
            eps: p.eps as f32,
        };
        self.slots.par_iter().try_for_each(|slot| {
            let Some(g) = grads.get(slot.var.as_tensor()) else { return Ok(()) };
            let op = Step { update, m: &slot.m, v: &slot.v };
            slot.var.as_tensor().inplace_op2(&g.contiguous()?, &op)
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Update {
    lr: f32,
    decay: f32,
    beta1: f32,
    beta2: f32,
    scale_m: f32,
    scale_v: f32,
    eps: f32,
}

/// The in-place update of one parameter from its gradient.
#[derive(Debug)]
struct Step<'a> {
    update: Update,
    m: &'a Mutex<Vec<f32>>,
    v: &'a Mutex<Vec<f32>>,
}

fn lock<'a>(m: &'a Mutex<Vec<f32>>) -> Result<std::sync::MutexGuard<'a, Vec<f32>>> {
    m.lock().map_err(|_| candle_core::Error::msg("AdamW: poisoned moment buffer"))
}

impl InplaceOp2 for Step<'_> {
    fn name(&self) -> &'static str {
        "fedtune-adamw-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (Some((p0, p1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("AdamW: parameter and gradient must be contiguous");
        };
        let CpuStorage::F32(param) = s1 else { candle_core::bail!("AdamW: parameter is not f32") };
        let param = &mut param[p0..p1];
        let grad = &s2.as_slice::<f32>()?[g0..g1];
        let (mut m, mut v) = (lock(self.m)?, lock(self.v)?);
        if grad.len() != param.len() || m.len() != param.len() {
            candle_core::bail!(
                "AdamW: gradient of {} values for {} parameters",
                grad.len(),
                param.len()
            );
        }
        let u = self.update;
        for (((p, &g), m), v) in param.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()) {
            *m = u.beta1 * *m + (1.0 - u.beta1) * g;
            *v = u.beta2 * *v + (1.0 - u.beta2) * g * g;
            let step = (*m * u.scale_m) / ((*v * u.scale_v).sqrt() + u.eps);
            *p = *p * u.decay - u.lr * step;
        }
        Ok(())
    }
}
