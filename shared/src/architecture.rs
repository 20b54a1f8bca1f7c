//! The architecture as data: a model's configuration, the presets, the layer list it defines,
//! and how volumes become its inputs ([`SliceSpec`], [`Window`]). Both sides read it: the
//! coordinator checks a task's preset and a pushed model's manifest against it; the site agent
//! builds the network from it.

use serde::{Deserialize, Serialize};

/// Why a configuration cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("model config \"{name}\": {reason}")]
    Invalid { name: String, reason: String },
    #[error("unknown model config \"{0}\"; use tiny, small or resnet103")]
    UnknownPreset(String),
}

pub type ConfigResult<T> = Result<T, ConfigError>;

/// A Hounsfield-unit window mapped to [-1, 1].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub lo: f32,
    pub hi: f32,
}

impl Window {
    pub fn apply(&self, hu: f32) -> f32 {
        (hu.clamp(self.lo, self.hi) - self.lo) / (self.hi - self.lo) * 2.0 - 1.0
    }
}

/// How volumes become model inputs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SliceSpec {
    /// Square in-plane size the model sees.
    pub size: usize,
    /// 1 (the slice alone) or an odd count of adjacent slices centred on it (edges repeat).
    pub in_channels: usize,
    pub window: Window,
    /// Three position channels (x, y, height) after the slices; see
    /// [`ModelConfig::position_channels`].
    pub position: bool,
    /// In-plane pixel spacing the model sees (mm); `None`: stretch each slice to `size`.
    pub pixel_mm: Option<f32>,
}

impl SliceSpec {
    /// Input channels per slice: the adjacent slices, plus three when `position` is on.
    pub fn channels(&self) -> usize {
        self.in_channels + if self.position { 3 } else { 0 }
    }
}

/// The architecture; stored in every weights file's manifest so weights are self-describing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Preset name or a free label.
    pub name: String,
    /// Adjacent axial slices fed as channels (1 or an odd number).
    pub in_channels: usize,
    /// Square in-plane input size.
    pub image_size: usize,
    /// Channels per encoder level (level 0 at full resolution).
    pub widths: Vec<usize>,
    /// Residual blocks per encoder level.
    pub encoder_blocks: Vec<usize>,
    /// Residual blocks per decoder level, deepest first (one fewer level than the encoder).
    pub decoder_blocks: Vec<usize>,
    /// The HU window that maps CT to the network's input range.
    pub window: Window,
    /// Three more input channels holding each pixel's position: x and y across the field of
    /// view and the slice's height in the scanned range, each in [-1, 1]. Organs that differ
    /// only by side (left and right eye) or by height (brainstem and cord) look the same to a
    /// convolution; with these channels the network can tell them apart. Absent in weights
    /// files written before the field existed, which load with it off.
    #[serde(default)]
    pub position_channels: bool,
    /// In-plane pixel spacing of the model's input (mm): slices are resampled to it, so the
    /// model sees a field of view of `image_size x pixel_mm` mm whatever a case's own matrix
    /// and spacing. Absent in weights files written before the field existed, which stretch
    /// every slice to `image_size` pixels as they were trained to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_mm: Option<f32>,
}

/// What one layer computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// 3x3 conv, BN, ReLU.
    Stem { cin: usize, cout: usize },
    /// First conv of a residual block (stride 2 when it opens a level); keeps the block input
    /// for the shortcut, and pushes it as a skip when `push_skip`.
    BlockIn { cin: usize, cout: usize, stride: usize, push_skip: bool },
    /// Second conv of a residual block, BN, add the shortcut (projected by a 1x1 conv + BN from
    /// `cin` at `stride` when shapes change), ReLU.
    BlockOut { cin: usize, cout: usize, stride: usize },
    /// Nearest 2x upsampling, concatenation with the popped skip, 3x3 conv, BN, ReLU.
    Fuse { cin: usize, cskip: usize, cout: usize },
    /// 1x1 conv with bias to the class logits.
    Head { cin: usize, classes: usize },
}

/// A named layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerSpec {
    pub name: String,
    pub kind: LayerKind,
}

const HEAD_NECK_WINDOW: Window = Window { lo: -160.0, hi: 240.0 };

impl ModelConfig {
    /// A named preset: `tiny` (tests, seconds on CPU), `small` (CPU demo), `resnet103`
    /// (the paper's depth, for GPUs).
    pub fn preset(name: &str) -> ConfigResult<Self> {
        let c =
            |in_channels, image_size, pixel_mm, widths: &[usize], enc: &[usize], dec: &[usize]| {
                Self {
                    name: name.to_owned(),
                    position_channels: true,
                    in_channels,
                    image_size,
                    pixel_mm: Some(pixel_mm),
                    widths: widths.to_vec(),
                    encoder_blocks: enc.to_vec(),
                    decoder_blocks: dec.to_vec(),
                    window: HEAD_NECK_WINDOW,
                }
            };
        let cfg = match name {
            // Fields of view: 230.4 mm (the source and target-b phantoms' scan width, which
            // target-a's 240 mm scan is cropped to at its edges of air), and 384 mm (a
            // head-and-neck CT down to the shoulders at 1.5 mm).
            "tiny" => c(1, 32, 7.2, &[8, 16, 32], &[1, 1, 1], &[1, 1]),
            "small" => c(3, 48, 4.8, &[16, 32, 64], &[1, 2, 3], &[2, 1]),
            "resnet103" => c(3, 256, 1.5, &[32, 64, 128, 256], &[3, 8, 24, 8], &[2, 2, 2]),
            other => return Err(ConfigError::UnknownPreset(other.to_owned())),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> ConfigResult<()> {
        let fail = |reason: String| Err(ConfigError::Invalid { name: self.name.clone(), reason });
        let levels = self.widths.len();
        if levels == 0 || self.widths.contains(&0) {
            return fail("widths must list at least one non-zero channel count".into());
        }
        if self.encoder_blocks.len() != levels || self.encoder_blocks.contains(&0) {
            return fail(format!("encoder_blocks needs {levels} non-zero entries, one per width"));
        }
        if self.decoder_blocks.len() + 1 != levels {
            return fail(format!(
                "decoder_blocks needs {} entries, one per decoder level",
                levels - 1
            ));
        }
        if self.in_channels.is_multiple_of(2) {
            return fail(format!("in_channels = {} must be odd (1, 3, ...)", self.in_channels));
        }
        let factor = 1usize << (levels - 1);
        if self.image_size == 0 || !self.image_size.is_multiple_of(factor) {
            return fail(format!(
                "image_size = {} must be a multiple of {factor} for {levels} levels",
                self.image_size
            ));
        }
        if self.window.hi.partial_cmp(&self.window.lo) != Some(std::cmp::Ordering::Greater) {
            return fail("window.hi must be above window.lo".into());
        }
        if let Some(p) = self.pixel_mm
            && !(p.is_finite() && (0.05..=50.0).contains(&p))
        {
            return fail(format!(
                "pixel_mm = {p} is not a plausible pixel spacing (0.05 to 50 mm)"
            ));
        }
        Ok(())
    }

    /// The ordered layer list for `classes` output classes.
    pub fn layers(&self, classes: usize) -> Vec<LayerSpec> {
        let mut out = Vec::new();
        let mut push = |name: String, kind| out.push(LayerSpec { name, kind });
        let w = &self.widths;
        push("stem".into(), LayerKind::Stem { cin: self.slice_spec().channels(), cout: w[0] });
        let mut c = w[0];
        for (level, (&width, &blocks)) in w.iter().zip(&self.encoder_blocks).enumerate() {
            for b in 0..blocks {
                let opens = level > 0 && b == 0;
                let stride = if opens { 2 } else { 1 };
                push(
                    format!("enc{level}.b{b}.conv1"),
                    LayerKind::BlockIn { cin: c, cout: width, stride, push_skip: opens },
                );
                push(
                    format!("enc{level}.b{b}.conv2"),
                    LayerKind::BlockOut { cin: c, cout: width, stride },
                );
                c = width;
            }
        }
        for (i, &blocks) in self.decoder_blocks.iter().enumerate() {
            let level = w.len() - 2 - i;
            let width = w[level];
            push(format!("dec{level}.fuse"), LayerKind::Fuse { cin: c, cskip: width, cout: width });
            c = width;
            for b in 0..blocks {
                push(
                    format!("dec{level}.b{b}.conv1"),
                    LayerKind::BlockIn { cin: c, cout: c, stride: 1, push_skip: false },
                );
                push(
                    format!("dec{level}.b{b}.conv2"),
                    LayerKind::BlockOut { cin: c, cout: c, stride: 1 },
                );
            }
        }
        push("head".into(), LayerKind::Head { cin: c, classes });
        out
    }

    /// An estimate of the device memory one training step of the last `trainable` layers
    /// takes at `batch` slices, in bytes: every weight (4 bytes), and for the trained layers
    /// their gradient and two AdamW moments (12 more); the activations a trained layer keeps
    /// for its backward pass (its input, convolution and normalised outputs, and their
    /// gradients: about four copies of its output); for the frozen prefix, which keeps no
    /// graph, the largest layer output twice (in and out) and the skips it hands on; the input
    /// slices twice; and a quarter more for cuDNN workspaces and the allocator's slack. A
    /// planning figure for `policy.max_gpu_memory_gb`, not a measurement.
    pub fn training_memory_bytes(&self, classes: usize, batch: usize, trainable: usize) -> u64 {
        let layers = self.layers(classes);
        let first_trained = layers.len().saturating_sub(trainable);
        let mut size = self.image_size;
        let (mut weights, mut trained_weights, mut activations) = (0usize, 0usize, 0usize);
        let (mut frozen_peak, mut prev_out) = (0usize, 0usize);
        for (i, l) in layers.iter().enumerate() {
            let frozen = i < first_trained;
            if let LayerKind::BlockIn { push_skip: true, .. } = l.kind
                && frozen
            {
                activations += prev_out; // the skip, kept until its decoder level
            }
            let (params, out) = match l.kind {
                LayerKind::Stem { cin, cout } => (cin * cout * 9, cout),
                LayerKind::BlockIn { cin, cout, stride, .. } => {
                    size /= stride.max(1);
                    (cin * cout * 9, cout)
                }
                LayerKind::BlockOut { cin, cout, stride } => {
                    let proj = if cin != cout || stride != 1 { cin * cout + 2 * cout } else { 0 };
                    (cout * cout * 9 + proj, cout)
                }
                LayerKind::Fuse { cin, cskip, cout } => {
                    size *= 2;
                    ((cin + cskip) * cout * 9, cout + cin + cskip)
                }
                LayerKind::Head { cin, classes } => (cin * classes + classes, classes),
            };
            let bn = if matches!(l.kind, LayerKind::Head { .. }) { 0 } else { 2 * out };
            weights += params + bn;
            let floats = out * size * size * batch;
            if frozen {
                frozen_peak = frozen_peak.max(floats);
            } else {
                trained_weights += params + bn;
                activations += 4 * floats;
            }
            prev_out = out * size * size * batch;
        }
        activations += 2 * frozen_peak;
        let input = batch * self.slice_spec().channels() * self.image_size * self.image_size;
        let floats = weights + 3 * trained_weights + activations + 2 * input;
        (floats as u64 * 4) * 5 / 4
    }

    /// Number of layers (independent of the class count).
    pub fn num_layers(&self) -> usize {
        self.layers(2).len()
    }

    /// The paper's share of retrained layers (10 of 103), rounded up, at least 1.
    pub fn default_trainable_layers(&self) -> usize {
        (self.num_layers() * 10).div_ceil(103).max(1)
    }

    /// How volumes are sliced for this model.
    pub fn slice_spec(&self) -> SliceSpec {
        SliceSpec {
            size: self.image_size,
            in_channels: self.in_channels,
            window: self.window,
            position: self.position_channels,
            pixel_mm: self.pixel_mm,
        }
    }

    /// The square field of view the model sees (mm), when it has a pixel spacing.
    pub fn field_of_view_mm(&self) -> Option<f32> {
        self.pixel_mm.map(|p| p * self.image_size as f32)
    }
}
