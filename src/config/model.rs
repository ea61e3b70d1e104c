//! `[model]`: the network's shape, activation, initialisation and dropout.
//!
//! The section's struct, its defaults, its checks and the keys only a CNN
//! takes sit together here. The limits on layer sizes are here too, written
//! once: the config refuses a layer too large before anything is drawn, and
//! `model::architecture` refuses the same layer (with its true input width,
//! known once the data is read) through [`oversized_layer`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::check;
use super::data::{DataConfig, DataKind};
use crate::error::UserError;

/// Units in any one layer: features, classes, hidden and teacher widths, channels.
pub(super) const MAX_WIDTH: usize = 1_000_000;
/// Weights in any one layer (fan_in × fan_out).
pub(crate) const MAX_LAYER_WEIGHTS: usize = 1 << 30;
/// A convolution's kernel side.
const MAX_KERNEL: usize = 64;

/// The first layer between consecutive `widths`, as `[fan_in, fan_out]`,
/// with more than [`MAX_LAYER_WEIGHTS`] weights.
pub(crate) fn oversized_layer(widths: &[usize]) -> Option<[usize; 2]> {
    widths
        .windows(2)
        .find(|w| w[0].saturating_mul(w[1]) > MAX_LAYER_WEIGHTS)
        .map(|w| [w[0], w[1]])
}

/// Every layer between consecutive `widths` fits in memory.
pub(super) fn layer_fits(widths: &[usize]) -> bool {
    oversized_layer(widths).is_none()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub kind: ModelKind,
    /// For `cnn`: the convolutions, `[[out_channels, kernel], …]`, each
    /// followed by BatchNorm (optional), the activation and pooling.
    pub conv: Vec<[usize; 2]>,
    /// For `cnn`: BatchNorm after every convolution.
    pub batch_norm: bool,
    /// For `cnn`: 2×2 pooling (stride 2) after every convolution's activation.
    pub pool: Pool,
    /// For `cnn`: `same` pads by kernel/2 (odd kernels keep the image size), `valid` does not pad.
    pub padding: Padding,
    /// Hidden layer widths (of the head, for `cnn`); `[]` is softmax regression.
    pub hidden: Vec<usize>,
    pub activation: Activation,
    /// Weight initialisation scheme.
    pub init: InitScheme,
    /// The scheme's std, bound, value or gain (see `InitScheme`).
    pub init_scale: f64,
    /// The value every bias starts at.
    pub bias_init: f64,
    /// A safetensors file with every parameter under its name (`fc1.weight`, ...), used instead of drawing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// Dropout probability after each hidden activation while training, 0 ≤ p < 1; 0 is off.
    pub dropout: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Fully connected layers `fc1 … fcL`.
    Mlp,
    /// Convolutions `conv1 …` (with `bn1 …`) on 2-D images, then the MLP head.
    Cnn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pool {
    Max,
    Avg,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    Same,
    Valid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    /// Negative slope 0.01, as PyTorch's default.
    LeakyRelu,
    Tanh,
    Sigmoid,
    /// The exact (erf) GELU.
    Gelu,
    /// Klambauer et al. 2017, with their α and λ.
    Selu,
    Identity,
}

/// Weight initialisation. `scale` is `model.init_scale`; fan_in and fan_out are
/// the layer's input and output widths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitScheme {
    /// N(0, scale²).
    Normal,
    /// U[−scale, scale].
    Uniform,
    /// U[±scale/√fan_in]: Glorot and Bengio's "standard" init, PyTorch's default at scale 1.
    UniformFanIn,
    /// N(0, scale² · 2/(fan_in + fan_out)).
    XavierNormal,
    /// U[±scale · √(6/(fan_in + fan_out))].
    XavierUniform,
    /// N(0, scale² · 2/fan_in).
    HeNormal,
    /// U[±scale · √(6/fan_in)].
    HeUniform,
    /// N(0, scale² / fan_in).
    LecunNormal,
    /// A random (semi-)orthogonal matrix times scale (Saxe et al. 2014).
    Orthogonal,
    /// Every weight equal to scale.
    Constant,
    /// Every weight zero.
    Zeros,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::Mlp,
            conv: Vec::new(),
            batch_norm: false,
            pool: Pool::Max,
            padding: Padding::Same,
            hidden: vec![128, 128],
            activation: Activation::Relu,
            init: InitScheme::HeNormal,
            init_scale: 1.0,
            bias_init: 0.0,
            init_from: None,
            dropout: 0.0,
        }
    }
}

/// The `[model]` keys that only convolutional models use.
pub(super) const MODEL_KEYS: &[(&str, &[ModelKind])] = &[
    ("conv", &[ModelKind::Cnn]),
    ("batch_norm", &[ModelKind::Cnn]),
    ("pool", &[ModelKind::Cnn]),
    ("padding", &[ModelKind::Cnn]),
];

/// The message for a layer past [`MAX_LAYER_WEIGHTS`], under `model.hidden`.
fn too_large() -> String {
    format!("a layer of more than {MAX_LAYER_WEIGHTS} weights would not fit in memory")
}

impl ModelConfig {
    /// The network's shape: widths, the hidden layers' sizes, a CNN's
    /// convolutions, and the init scale.
    pub(super) fn validate_shape(&self) -> Result<(), UserError> {
        let m = self;
        check(
            m.hidden.iter().all(|&w| (1..=MAX_WIDTH).contains(&w)),
            "model.hidden",
            &format!("every width must be between 1 and {MAX_WIDTH}"),
        )?;
        check(layer_fits(&m.hidden), "model.hidden", &too_large())?;
        match m.kind {
            // The CNN-only keys given explicitly with an MLP are refused by
            // `check_applicable`; their defaults go unused.
            ModelKind::Mlp => {}
            ModelKind::Cnn => {
                check(
                    !m.conv.is_empty(),
                    "model.conv",
                    "a cnn needs at least one convolution, e.g. [[16, 5], [32, 5]] ([channels, kernel] each)",
                )?;
                check(
                    m.conv.iter().all(|&[channels, kernel]| {
                        (1..=MAX_WIDTH).contains(&channels) && (1..=MAX_KERNEL).contains(&kernel)
                    }),
                    "model.conv",
                    &format!(
                        "every [channels, kernel] needs 1 ≤ channels ≤ {MAX_WIDTH} and 1 ≤ kernel ≤ {MAX_KERNEL}"
                    ),
                )?;
                check(
                    m.padding == Padding::Valid
                        || m.conv.iter().all(|&[_, kernel]| kernel % 2 == 1),
                    "model.conv",
                    "padding = \"same\" needs odd kernels (or set model.padding = \"valid\")",
                )?;
            }
        }
        check(
            (m.init_scale as f32).is_finite(),
            "model.init_scale",
            "must be finite in f32",
        )
    }

    /// The layers from the data's inputs through the hidden widths to its
    /// classes (an IDX file's width is checked once the file is read).
    pub(super) fn validate_sizes(&self, data: &DataConfig) -> Result<(), UserError> {
        let widths: Vec<usize> = std::iter::once(data.inputs())
            .chain(self.hidden.iter().copied())
            .chain(std::iter::once(data.classes))
            .collect();
        check(
            data.kind == DataKind::Idx || layer_fits(&widths),
            "model.hidden",
            &too_large(),
        )
    }

    /// The values the parameters start at and dropout.
    pub(super) fn validate_values(&self) -> Result<(), UserError> {
        check(
            (self.bias_init as f32).is_finite(),
            "model.bias_init",
            "must be finite in f32",
        )?;
        check(
            (0.0..1.0).contains(&self.dropout),
            "model.dropout",
            "must be in [0, 1)",
        )
    }
}
