//! The network: parameters per layer and the forward pass over a layer range.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};

use super::layers::{BatchNorm, Conv, Init, constant, tracked};
use super::{ModelError, ModelResult};
use shared::architecture::{LayerKind, LayerSpec, ModelConfig};
use shared::organs::OrganMap;

/// The activations that cross a layer boundary: the running feature map, the block input kept
/// for a residual shortcut (between a block's two layers), and the encoder skips still to be
/// consumed by the decoder. A frozen prefix's output is exactly this, which is what the
/// frozen-prefix cache stores.
#[derive(Clone, Debug)]
pub struct State {
    pub x: Tensor,
    pub residual: Option<Tensor>,
    pub skips: Vec<Tensor>,
}

impl State {
    pub fn new(x: Tensor) -> Self {
        Self { x, residual: None, skips: Vec::new() }
    }

    /// The tensors of this state in a fixed order: x, the residual if any, then the skips.
    pub fn parts(&self) -> Vec<Tensor> {
        let mut v = vec![self.x.clone()];
        v.extend(self.residual.iter().cloned());
        v.extend(self.skips.iter().cloned());
        v
    }

    /// Inverse of [`State::parts`].
    pub fn from_parts(mut parts: Vec<Tensor>, has_residual: bool) -> Self {
        let skips = parts.split_off(if has_residual { 2 } else { 1 });
        let residual = has_residual.then(|| parts.pop().expect("residual part"));
        let x = parts.pop().expect("x part");
        Self { x, residual, skips }
    }

    pub fn detach(&self) -> Self {
        Self {
            x: self.x.detach(),
            residual: self.residual.as_ref().map(Tensor::detach),
            skips: self.skips.iter().map(Tensor::detach).collect(),
        }
    }
}

#[derive(Debug)]
struct Layer {
    spec: LayerSpec,
    conv: Conv,
    bn: Option<BatchNorm>,
    proj: Option<(Conv, BatchNorm)>,
    bias: Option<Var>,
}

fn push_bn<'a>(prefix: &str, bn: &'a BatchNorm, v: &mut Vec<(String, &'a Var, bool)>) {
    v.push((format!("{prefix}bn.weight"), &bn.weight, true));
    v.push((format!("{prefix}bn.bias"), &bn.bias, true));
    v.push((format!("{prefix}bn.running_mean"), &bn.running_mean, false));
    v.push((format!("{prefix}bn.running_var"), &bn.running_var, false));
}

impl Layer {
    fn new(spec: LayerSpec, init: &mut Init, dev: &Device) -> ModelResult<Self> {
        let conv = |init: &mut Init, cout, cin, k, stride, gain| -> ModelResult<Conv> {
            Ok(Conv { weight: init.kaiming(&[cout, cin, k, k], gain, dev)?, stride })
        };
        let (conv, bn, proj, bias) = match spec.kind {
            LayerKind::Stem { cin, cout } => {
                (conv(init, cout, cin, 3, 1, 1.0)?, Some(cout), None, None)
            }
            LayerKind::BlockIn { cin, cout, stride, .. } => {
                (conv(init, cout, cin, 3, stride, 1.0)?, Some(cout), None, None)
            }
            LayerKind::BlockOut { cin, cout, stride } => {
                let proj = if cin != cout || stride != 1 {
                    Some((conv(init, cout, cin, 1, stride, 1.0)?, BatchNorm::new(cout, dev)?))
                } else {
                    None
                };
                // A smaller start for the residual branch keeps deep stacks stable.
                (conv(init, cout, cout, 3, 1, 0.5)?, Some(cout), proj, None)
            }
            LayerKind::Fuse { cin, cskip, cout } => {
                (conv(init, cout, cin + cskip, 3, 1, 1.0)?, Some(cout), None, None)
            }
            LayerKind::Head { cin, classes } => (
                conv(init, classes, cin, 1, 1, 0.5)?,
                None,
                None,
                Some(constant(classes, 0.0, dev)?),
            ),
        };
        let bn = bn.map(|c| BatchNorm::new(c, dev)).transpose()?;
        Ok(Self { spec, conv, bn, proj, bias })
    }

    /// Named tensors of this layer: (suffix, var, is a trainable parameter).
    fn tensors(&self) -> Vec<(String, &Var, bool)> {
        let mut v = vec![("conv.weight".to_owned(), &self.conv.weight, true)];
        if let Some(b) = &self.bn {
            push_bn("", b, &mut v);
        }
        if let Some((c, b)) = &self.proj {
            v.push(("proj.conv.weight".to_owned(), &c.weight, true));
            push_bn("proj.", b, &mut v);
        }
        if let Some(b) = &self.bias {
            v.push(("conv.bias".to_owned(), b, true));
        }
        v
    }

    fn forward(&self, s: State, train: bool, track: bool) -> ModelResult<State> {
        if !train
            && !track
            && let Some(s) = self.forward_folded(&s)?
        {
            return Ok(s);
        }
        let norm = self.bn.as_ref();
        let bn =
            |x: &Tensor| norm.expect("conv layers have a norm").forward(x, train, track, false);
        let bn_relu =
            |x: &Tensor| norm.expect("conv layers have a norm").forward(x, train, track, true);
        let State { x, residual, mut skips } = s;
        Ok(match self.spec.kind {
            LayerKind::Stem { .. } => {
                State { x: bn_relu(&self.conv.forward(&x, track)?)?, residual, skips }
            }
            LayerKind::BlockIn { push_skip, .. } => {
                if push_skip {
                    skips.push(x.clone());
                }
                let y = bn_relu(&self.conv.forward(&x, track)?)?;
                State { x: y, residual: Some(x), skips }
            }
            LayerKind::BlockOut { .. } => {
                let input = residual.ok_or_else(|| {
                    ModelError::Mismatch(format!("layer {} has no block input", self.spec.name))
                })?;
                let shortcut = match &self.proj {
                    Some((conv, norm)) => {
                        norm.forward(&conv.forward(&input, track)?, train, track, false)?
                    }
                    None => input,
                };
                let y = super::ops::add_relu(&bn(&self.conv.forward(&x, track)?)?, &shortcut)?;
                State { x: y, residual: None, skips }
            }
            LayerKind::Fuse { .. } => {
                let skip = skips.pop().ok_or_else(|| {
                    ModelError::Mismatch(format!("layer {} has no skip to fuse", self.spec.name))
                })?;
                let cat = super::ops::upsample_cat(&x, &skip)?;
                State { x: bn_relu(&self.conv.forward(&cat, track)?)?, residual, skips }
            }
            LayerKind::Head { classes, .. } => {
                let b = tracked(self.bias.as_ref().expect("head has a bias"), track);
                let y =
                    self.conv.forward(&x, track)?.broadcast_add(&b.reshape((1, classes, 1, 1))?)?;
                State { x: y, residual, skips }
            }
        })
    }
}

impl Layer {
    /// Inference with batch norm folded into each convolution ([`super::ops::conv2d_folded`]):
    /// one pass per convolution, none for batch norm, ReLU or the residual sum. `None` where the
    /// fused op does not run (then the caller runs the separate ops on the state, untouched).
    fn forward_folded(&self, s: &State) -> ModelResult<Option<State>> {
        let fold = |bn: &BatchNorm| bn.folded(false);
        // This layer's own convolution with its batch norm folded in, then ReLU.
        let own = |input: &Tensor, shortcut: Option<&Tensor>| {
            let (sc, sh) = fold(self.bn.as_ref().expect("conv layers have a norm"))?;
            self.conv.forward_folded(input, (&sc, &sh), shortcut, true)
        };
        let State { x, residual, skips } = s;
        let (residual, mut skips) = (residual.clone(), skips.clone());
        let y = match self.spec.kind {
            LayerKind::Stem { .. } | LayerKind::BlockIn { .. } => {
                let Some(y) = own(x, None)? else { return Ok(None) };
                if let LayerKind::BlockIn { push_skip, .. } = self.spec.kind {
                    if push_skip {
                        skips.push(x.clone());
                    }
                    return Ok(Some(State { x: y, residual: Some(x.clone()), skips }));
                }
                y
            }
            LayerKind::BlockOut { .. } => {
                let Some(input) = residual else { return Ok(None) };
                let shortcut = match &self.proj {
                    Some((conv, norm)) => {
                        let (sc, sh) = fold(norm)?;
                        match conv.forward_folded(&input, (&sc, &sh), None, false)? {
                            Some(t) => t,
                            None => return Ok(None),
                        }
                    }
                    None => input,
                };
                let Some(y) = own(x, Some(&shortcut))? else { return Ok(None) };
                return Ok(Some(State { x: y, residual: None, skips }));
            }
            LayerKind::Fuse { .. } => {
                let Some(skip) = skips.pop() else { return Ok(None) };
                let Some(y) = own(&super::ops::upsample_cat(x, &skip)?, None)? else {
                    return Ok(None);
                };
                y
            }
            LayerKind::Head { classes, .. } => {
                let bias = self.bias.as_ref().expect("head has a bias").as_detached_tensor();
                let ones = Tensor::ones(classes, bias.dtype(), bias.device())?;
                let Some(y) = self.conv.forward_folded(x, (&ones, &bias), None, false)? else {
                    return Ok(None);
                };
                y
            }
        };
        Ok(Some(State { x: y, residual, skips }))
    }
}

/// The segmentation network.
#[derive(Debug)]
pub struct Net {
    config: ModelConfig,
    organs: OrganMap,
    layers: Vec<Layer>,
    device: Device,
}

impl Net {
    /// A freshly initialised network; the same seed gives the same weights on every machine.
    pub fn new(
        config: &ModelConfig,
        organs: &OrganMap,
        seed: u64,
        device: &Device,
    ) -> ModelResult<Self> {
        config.validate()?;
        let mut init = Init::new(seed);
        let layers = config
            .layers(organs.num_classes())
            .into_iter()
            .map(|spec| Layer::new(spec, &mut init, device))
            .collect::<ModelResult<_>>()?;
        Ok(Self { config: config.clone(), organs: organs.clone(), layers, device: device.clone() })
    }

    /// A network whose every tensor comes from `tensors`; missing, extra or misshapen tensors
    /// are refused by name.
    pub fn from_tensors(
        config: &ModelConfig,
        organs: &OrganMap,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> ModelResult<Self> {
        let net = Self::new(config, organs, 0, device)?;
        for (name, var) in net.named_vars() {
            let t = tensors.remove(&name).ok_or_else(|| {
                ModelError::Mismatch(format!("tensor \"{name}\" is missing from the weights"))
            })?;
            if t.dims() != var.dims() {
                return Err(ModelError::Mismatch(format!(
                    "tensor \"{name}\" has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(candle_core::DType::F32)?.to_device(device)?)?;
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(ModelError::Mismatch(format!(
                "the weights hold tensor \"{extra}\" (and {} more) that this model does not have",
                tensors.len() - 1
            )));
        }
        Ok(net)
    }

    /// An independent copy of this network's weights (training one leaves the other as it
    /// was): how a task trains several arms from one base model decoded once.
    pub fn duplicate(&self) -> ModelResult<Self> {
        let copy = Self::new(&self.config, &self.organs, 0, &self.device)?;
        for ((_, to), (_, from)) in copy.named_vars().iter().zip(self.named_vars()) {
            to.set(from.as_tensor())?;
        }
        Ok(copy)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn organs(&self) -> &OrganMap {
        &self.organs
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn layer_names(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.spec.name.clone()).collect()
    }

    /// Every tensor by its full name (`<layer>.<tensor>`), in layer order.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .flat_map(|l| {
                l.tensors()
                    .into_iter()
                    .map(|(suffix, v, _)| (format!("{}.{suffix}", l.spec.name), v.clone()))
            })
            .collect()
    }

    /// Names of the tensors that belong to layer `i`.
    pub fn layer_tensor_names(&self, i: usize) -> Vec<String> {
        let l = &self.layers[i];
        l.tensors().into_iter().map(|(s, _, _)| format!("{}.{s}", l.spec.name)).collect()
    }

    /// Index of the first trainable layer when the last `k` layers are trained.
    pub fn split_index(&self, k: usize) -> ModelResult<usize> {
        if k > self.layers.len() {
            return Err(ModelError::TrainableLayers { k, layers: self.layers.len() });
        }
        Ok(self.layers.len() - k)
    }

    /// The trainable parameters (not running statistics) of the last `k` layers: what the
    /// optimizer gets.
    pub fn trainable_vars(&self, k: usize) -> ModelResult<Vec<Var>> {
        let start = self.split_index(k)?;
        Ok(self.layers[start..]
            .iter()
            .flat_map(|l| l.tensors().into_iter().filter(|t| t.2).map(|t| t.1.clone()))
            .collect())
    }

    /// Runs layers `range` on `state`. `train` selects batch statistics (and updates running
    /// ones); `track` records the autograd graph.
    pub fn forward_range(
        &self,
        mut state: State,
        range: std::ops::Range<usize>,
        train: bool,
        track: bool,
    ) -> ModelResult<State> {
        for layer in &self.layers[range] {
            state = layer.forward(state, train, track)?;
        }
        Ok(state)
    }

    /// The frozen prefix for `k` trainable layers: running statistics, no graph, detached.
    pub fn prefix(&self, x: &Tensor, k: usize) -> ModelResult<State> {
        let split = self.split_index(k)?;
        Ok(self.forward_range(State::new(x.clone()), 0..split, false, false)?.detach())
    }

    /// The trainable tail for `k` trainable layers, from a prefix state.
    pub fn tail(&self, state: State, k: usize, train: bool) -> ModelResult<Tensor> {
        let split = self.split_index(k)?;
        Ok(self.forward_range(state, split..self.layers.len(), train, train)?.x)
    }

    /// Inference: class logits `[batch, classes, size, size]` with running statistics.
    pub fn infer(&self, x: &Tensor) -> ModelResult<Tensor> {
        Ok(self.forward_range(State::new(x.clone()), 0..self.layers.len(), false, false)?.x)
    }

    /// Whether the state after the prefix for `k` trainable layers holds a residual.
    pub fn prefix_has_residual(&self, k: usize) -> ModelResult<bool> {
        let split = self.split_index(k)?;
        Ok(split > 0 && matches!(self.layers[split - 1].spec.kind, LayerKind::BlockIn { .. }))
    }
}
