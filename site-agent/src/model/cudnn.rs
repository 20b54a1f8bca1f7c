//! The engine's convolution on CUDA (`cuda` feature): forward, backward-data and
//! backward-filter through cuDNN, for the [`super::ops`] conv op's `cuda_fwd`.
//!
//! candle 0.11 runs a convolution's forward through cuDNN but its backward through a naive
//! transposed-convolution kernel (input gradient) and an im2col convolution with an HxW kernel
//! (weight gradient): five to seven times slower than PyTorch on an H100 (`../shared/gpu`).
//! Here all three passes are cuDNN calls through cudarc's bindings. Per thread and device there
//! is one cuDNN handle on candle's stream; per convolution shape and pass the algorithm is
//! chosen once (cuDNN's heuristics) and its workspace size kept, and one workspace buffer per
//! device grows to the largest size asked for, so a training step allocates only its outputs.
//!
//! fp32 arithmetic by default (`CUDNN_FMA_MATH`: no TF32 tensor cores), so that CPU and GPU
//! agree to fp32 rounding; `FEDTUNE_TF32=1` lets cuDNN use TF32 (PyTorch's `allow_tf32`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use candle_core::cuda_backend::cudarc::cudnn::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, FilterDescriptor,
    TensorDescriptor, sys,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::{CudaStorage, Layout, Result, Shape};

/// A convolution: `[batch, ci, h, w]` input, `[co, ci, k, k]` weight, square stride and padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct ConvShape {
    pub(super) batch: usize,
    pub(super) ci: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) co: usize,
    pub(super) k: usize,
    pub(super) stride: usize,
    pub(super) pad: usize,
}

impl ConvShape {
    fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    fn x_dims(&self) -> [i32; 4] {
        [self.batch, self.ci, self.h, self.w].map(|v| v as i32)
    }
    fn w_dims(&self) -> [i32; 4] {
        [self.co, self.ci, self.k, self.k].map(|v| v as i32)
    }
    fn y_dims(&self) -> [i32; 4] {
        [self.batch, self.co, self.out_h(), self.out_w()].map(|v| v as i32)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pass {
    Forward,
    BackwardData,
    BackwardFilter,
}

#[derive(Clone, Copy, Debug)]
enum Algo {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    BackwardData(sys::cudnnConvolutionBwdDataAlgo_t),
    BackwardFilter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

/// What one thread keeps per device.
struct PerDevice {
    cudnn: Arc<Cudnn>,
    /// The chosen algorithm and its workspace bytes, per pass and shape.
    plans: HashMap<(Pass, ConvShape), (Algo, usize)>,
    workspace: Option<CudaSlice<u8>>,
}

thread_local! {
    // cuDNN handles are neither Send nor Sync: one per thread and device (as candle does).
    static STATE: RefCell<HashMap<DeviceId, PerDevice>> = RefCell::new(HashMap::new());
}

/// Whether TF32 tensor cores may be used (`FEDTUNE_TF32=1`), read once.
pub(super) fn tf32_allowed() -> bool {
    static TF32: OnceLock<bool> = OnceLock::new();
    *TF32.get_or_init(|| std::env::var("FEDTUNE_TF32").is_ok_and(|v| v == "1"))
}

fn math_type() -> sys::cudnnMathType_t {
    if tf32_allowed() {
        sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
    } else {
        sys::cudnnMathType_t::CUDNN_FMA_MATH
    }
}

/// The descriptors of one convolution.
struct Descriptors {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<f32>,
    w: FilterDescriptor<f32>,
    y: TensorDescriptor<f32>,
}

fn descriptors(cudnn: &Arc<Cudnn>, c: &ConvShape) -> Result<Descriptors> {
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let mut conv = cudnn.create_conv2d::<f32>(
        [c.pad as i32; 2],
        [c.stride as i32; 2],
        [1, 1],
        sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
    )?;
    conv.set_math_type(math_type())?;
    Ok(Descriptors {
        conv,
        x: cudnn.create_4d_tensor::<f32>(nchw, c.x_dims())?,
        w: cudnn.create_4d_filter::<f32>(nchw, c.w_dims())?,
        y: cudnn.create_4d_tensor::<f32>(nchw, c.y_dims())?,
    })
}

/// Runs `f` with this thread's cuDNN state for `dev`.
fn with_state<R>(dev: &CudaDevice, f: impl FnOnce(&mut PerDevice) -> Result<R>) -> Result<R> {
    // cuDNN calls run in the current context of the calling thread: make it this device's.
    dev.cuda_stream().context().bind_to_thread()?;
    STATE.with(|cell| {
        let mut map = cell.borrow_mut();
        let state = match map.entry(dev.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(PerDevice {
                cudnn: Cudnn::new(dev.cuda_stream())?,
                plans: HashMap::new(),
                workspace: None,
            }),
        };
        f(state)
    })
}

impl PerDevice {
    /// The plan for `(pass, shape)`, chosen by `pick` the first time.
    fn plan(
        &mut self,
        pass: Pass,
        shape: ConvShape,
        pick: impl FnOnce() -> Result<(Algo, usize)>,
    ) -> Result<(Algo, usize)> {
        if let Some(p) = self.plans.get(&(pass, shape)) {
            return Ok(*p);
        }
        let p = pick()?;
        tracing::debug!(?pass, ?shape, algo = ?p.0, workspace = p.1, "cuDNN plan");
        self.plans.insert((pass, shape), p);
        Ok(p)
    }

    /// A workspace of at least `bytes` (`None` for zero), grown and kept for later calls.
    fn workspace(&mut self, dev: &CudaDevice, bytes: usize) -> Result<Option<&mut CudaSlice<u8>>> {
        if bytes == 0 {
            return Ok(None);
        }
        if self.workspace.as_ref().is_none_or(|w| w.len() < bytes) {
            self.workspace = None; // free the old one first
            self.workspace = Some(dev.alloc_zeros::<u8>(bytes)?);
        }
        Ok(self.workspace.as_mut())
    }
}

fn view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{what} must be contiguous for cuDNN");
    };
    Ok(s.as_cuda_slice::<f32>()?.slice(start..end))
}

/// `y = conv(x, w)`.
pub(super) fn forward(
    c: ConvShape,
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = xs.device.clone();
    let (x, w) = (view(xs, xl, "conv2d input")?, view(ws, wl, "conv2d weight")?);
    let shape = Shape::from((c.batch, c.co, c.out_h(), c.out_w()));
    let mut y = dev.alloc_zeros::<f32>(shape.elem_count())?;
    with_state(&dev, |st| {
        let d = descriptors(&st.cudnn, &c)?;
        let op = ConvForward { conv: &d.conv, x: &d.x, w: &d.w, y: &d.y };
        let (algo, bytes) = st.plan(Pass::Forward, c, || {
            let a = op.pick_algorithm()?;
            Ok((Algo::Forward(a), op.get_workspace_size(a)?))
        })?;
        let Algo::Forward(algo) = algo else { candle_core::bail!("cuDNN: plan of another pass") };
        let workspace = st.workspace(&dev, bytes)?;
        // SAFETY: `x`, `w` and `y` are contiguous f32 buffers of exactly the shapes the
        // descriptors were made from (checked by the op's geometry), on the handle's stream.
        #[allow(unsafe_code)]
        unsafe {
            op.launch(algo, workspace, (1.0, 0.0), &x, &w, &mut y)?;
        }
        Ok(())
    })?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), shape))
}

/// `dx` from `(dy, w)`.
pub(super) fn backward_data(
    c: ConvShape,
    gs: &CudaStorage,
    gl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = gs.device.clone();
    let (dy, w) = (view(gs, gl, "conv2d output gradient")?, view(ws, wl, "conv2d weight")?);
    let shape = Shape::from((c.batch, c.ci, c.h, c.w));
    let mut dx = dev.alloc_zeros::<f32>(shape.elem_count())?;
    with_state(&dev, |st| {
        let d = descriptors(&st.cudnn, &c)?;
        let op = ConvBackwardData { conv: &d.conv, dx: &d.x, w: &d.w, dy: &d.y };
        let (algo, bytes) = st.plan(Pass::BackwardData, c, || {
            let a = op.pick_algorithm()?;
            Ok((Algo::BackwardData(a), op.get_workspace_size(a)?))
        })?;
        let Algo::BackwardData(algo) = algo else {
            candle_core::bail!("cuDNN: plan of another pass")
        };
        let workspace = st.workspace(&dev, bytes)?;
        // SAFETY: as in `forward`: buffers match the descriptors, one stream.
        #[allow(unsafe_code)]
        unsafe {
            op.launch(algo, workspace, (1.0, 0.0), &mut dx, &w, &dy)?;
        }
        Ok(())
    })?;
    Ok((CudaStorage::wrap_cuda_slice(dx, dev), shape))
}

/// `dw` from `(x, dy)`.
pub(super) fn backward_filter(
    c: ConvShape,
    xs: &CudaStorage,
    xl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = xs.device.clone();
    let (x, dy) = (view(xs, xl, "conv2d input")?, view(gs, gl, "conv2d output gradient")?);
    let shape = Shape::from((c.co, c.ci, c.k, c.k));
    let mut dw = dev.alloc_zeros::<f32>(shape.elem_count())?;
    with_state(&dev, |st| {
        let d = descriptors(&st.cudnn, &c)?;
        let op = ConvBackwardFilter { conv: &d.conv, x: &d.x, dw: &d.w, dy: &d.y };
        let (algo, bytes) = st.plan(Pass::BackwardFilter, c, || {
            let a = op.pick_algorithm()?;
            Ok((Algo::BackwardFilter(a), op.get_workspace_size(a)?))
        })?;
        let Algo::BackwardFilter(algo) = algo else {
            candle_core::bail!("cuDNN: plan of another pass")
        };
        let workspace = st.workspace(&dev, bytes)?;
        // SAFETY: as in `forward`: buffers match the descriptors, one stream.
        #[allow(unsafe_code)]
        unsafe {
            op.launch(algo, workspace, (1.0, 0.0), &x, &mut dw, &dy)?;
        }
        Ok(())
    })?;
    Ok((CudaStorage::wrap_cuda_slice(dw, dev), shape))
}
