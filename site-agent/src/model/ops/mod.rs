//! Training ops: convolution through im2col + GEMM or Winograd (cuDNN on CUDA), and a fused
//! batch norm (+ ReLU) on the CPU.
//!
//! candle 0.11's CPU convolution backward runs a direct `conv_transpose2d` loop for the input
//! gradient and a convolution with an HxW kernel for the weight gradient, about ten times slower
//! than PyTorch. Here a convolution is one `CustomOp2` whose passes work image by image,
//! in parallel over the batch, with the `gemm` crate (candle's own GEMM) for the products:
//!
//! - forward: `y[b] = W[co, ci*k*k] @ cols[b]`, `cols[b] = im2col(x[b])`;
//! - backward-data: `dcols[b] = W^T @ dy[b]`, then `dx[b] = col2im(dcols[b])`;
//! - backward-filter: `dW = sum_b dy[b] @ cols[b]^T`, recomputing `cols[b]`.
//!
//! The im2col columns of one image live in a per-thread scratch buffer that is reused from call
//! to call, so a training step neither keeps a `ci*k*k`-times copy of every activation alive
//! until the backward pass nor has the allocator hand back and re-fault tens of megabytes of
//! fresh pages per layer (the largest cost in the profile before this). Gradients are computed
//! only for the arguments that need them: frozen weights and detached inputs get none.
//!
//! Written here (not taken from a crate) because candle exposes no faster CPU path and these
//! loops are where training time goes; see ARCHITECTURE.md.
//!
//! - [`conv`]: the convolution (im2col + GEMM on the CPU, cuDNN on CUDA) and its two backward
//!   passes; [`gemm`] holds the GEMM call and the per-thread scratch buffers it uses.
//! - [`norm`]: training-mode batch norm (+ ReLU) with a fused backward, and the inference-only
//!   per-channel affine.
//! - [`fused`]: inference convolution with batch norm folded in, bias, residual and ReLU in
//!   the same pass.
//! - [`residual`]: `relu(a + b)` at the end of a residual block.
//! - [`upcat`]: a fuse layer's input, nearest upsampling and concatenation with its backward.
//! - [`winograd`]: Winograd F(2x2, 3x3) for the 3x3 stride-1 convolutions where it beats
//!   im2col + GEMM (forward, both gradients, folded inference).
//! - [`profile`]: opt-in time per op and shape (`site-agent bench --profile`).

use candle_core::{CpuStorage, Layout, Result};

mod conv;
mod fused;
mod gemm;
mod norm;
pub mod profile;
mod residual;
mod tiles;
mod upcat;
mod winograd;

pub use conv::{conv2d, tf32_allowed};
pub use fused::conv2d_folded;
pub use norm::{BnOutput, BnStats, batch_norm_train, channel_affine};
pub use residual::add_relu;
pub use upcat::upsample_cat;

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// `[b, c, h, w]` as `c@hxw` for profile keys.
fn plane(layout: &Layout) -> String {
    match layout.dims() {
        &[_, c, h, w] => format!("{c}@{h}x{w}"),
        d => format!("{d:?}"),
    }
}

fn dims4(layout: &Layout, what: &str) -> Result<[usize; 4]> {
    match layout.dims() {
        &[a, b, c, d] => Ok([a, b, c, d]),
        d => candle_core::bail!("{what}: expected a 4-D tensor, got {d:?}"),
    }
}
