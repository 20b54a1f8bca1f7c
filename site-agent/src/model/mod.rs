//! The segmentation model: a 2D residual encoder-decoder over axial CT slices, built as an
//! explicit ordered list of named layers so that "train the last k layers" is exact.
//!
//! - [`ModelConfig`]: the architecture (presets `tiny`, `small`, `resnet103`).
//! - [`Net`]: the parameters and the forward pass, whole or split at a layer boundary.
//! - [`loss`]: cross-entropy plus soft Dice.
//!
//! How layers are counted: a convolution with its batch norm (and ReLU) is one layer; in a
//! residual block the two 3x3 convolutions are two layers, and the 1x1 projection on the
//! shortcut (when channels or stride change) belongs to the block's second layer, as in the
//! ResNet papers' depth counts. A decoder level adds one fusion layer (nearest 2x upsampling,
//! concatenation with the encoder's skip, 3x3 conv), then its residual blocks. The stem is the
//! first layer and the 1x1 classifier the last. Hence
//! `layers = 1 + 2 * sum(encoder_blocks) + sum(1 + 2 * decoder_blocks) + 1`; for `resnet103`
//! that is 1 + 2 * 43 + (3 + 2 * 6) + 1 = 103.

#[cfg(feature = "cuda")]
mod cudnn;
mod layers;
pub mod loss;
mod net;
pub mod ops;
pub mod optim;

pub use net::{Net, State};
pub use shared::architecture::{ConfigError, LayerKind, LayerSpec, ModelConfig};

/// Model errors: wrong configurations, mismatched weights and numeric failures.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "trainable_layers = {k} but the model has {layers} layers; choose 1 to {layers} (or 0 to freeze everything)"
    )]
    TrainableLayers { k: usize, layers: usize },
    #[error("weights do not fit this model: {0}")]
    Mismatch(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type ModelResult<T> = Result<T, ModelError>;
