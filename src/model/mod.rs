//! The model: an MLP, or a CNN (convolutions, then an MLP head), with named
//! parameters in layer order.

pub mod activation;
pub mod backward;
pub mod fused;
pub mod init;
pub mod layers;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng as _;

use crate::config::{Activation, ModelConfig, ModelKind, Padding, oversized_layer};
use crate::error::UserError;
use crate::rng::{self, Rng, Stream};
pub use layers::{BatchNorm, Conv, Dense};

/// A trainable tensor and its contract name (`fc1.weight`, ...).
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
}

impl Param {
    pub fn tensor(&self) -> &Tensor {
        self.var.as_tensor()
    }
}

/// A convolution block: convolution, BatchNorm (optional), activation, pooling.
#[derive(Debug, Clone)]
struct ConvBlock {
    conv: Conv,
    norm: Option<BatchNorm>,
}

/// The network: `conv1 … convK` (CNN only), each followed by `bnK`
/// (optional), the activation and pooling; then `fc1 … fcL` with the
/// activation (and dropout while training) after each hidden layer, logits
/// out. Weights are `[out, in]` and `[out, in, k, k]`.
#[derive(Debug, Clone)]
pub struct Model {
    /// Every trainable tensor in layer order (`conv1.weight, conv1.bias, bn1.weight, …, fc1.weight, …`).
    params: Vec<Param>,
    /// BatchNorm's running statistics: checkpointed, never trained.
    buffers: Vec<Param>,
    convs: Vec<ConvBlock>,
    dense: Vec<Dense>,
    /// `[channels, height, width]` of a CNN's input; `None` for an MLP.
    image: Option<[usize; 3]>,
    pool: crate::config::Pool,
    activation: Activation,
    dropout: f32,
    description: String,
    multiply_adds: usize,
    step_flops: usize,
}

/// What a tensor is, which decides how it is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    /// A weight matrix or kernel with its fans.
    Weight {
        fan_in: usize,
        fan_out: usize,
    },
    Bias,
    NormScale,
    NormShift,
    RunningMean,
    RunningVar,
}

#[derive(Debug, Clone)]
struct Spec {
    name: String,
    shape: Vec<usize>,
    role: Role,
}

impl Spec {
    fn new(name: String, shape: Vec<usize>, role: Role) -> Self {
        Self { name, shape, role }
    }

    fn is_buffer(&self) -> bool {
        matches!(self.role, Role::RunningMean | Role::RunningVar)
    }
}

/// What [`architecture`] works out from the config and the data's shape.
struct Architecture {
    /// Every tensor in order.
    specs: Vec<Spec>,
    image: Option<[usize; 3]>,
    description: String,
    /// Multiply-adds of one sample's forward pass through the weighted layers.
    multiply_adds: usize,
    /// See [`Model::step_flops`].
    step_flops: usize,
}

/// The model of `config` for samples of `sample_shape`. Sizes that do not
/// work out (an image that a valid convolution or pooling shrinks to
/// nothing, a CNN on vector data, a layer too large for memory) are config
/// errors.
fn architecture(
    config: &ModelConfig,
    sample_shape: &[usize],
    classes: usize,
) -> Result<Architecture, UserError> {
    let mut specs = Vec::new();
    let mut multiply_adds = 0;
    let mut first_layer = None;
    let (image, features, description) = match config.kind {
        ModelKind::Mlp => (
            None,
            sample_shape.iter().product::<usize>(),
            String::from("MLP"),
        ),
        ModelKind::Cnn => {
            let &[height, width] = sample_shape else {
                return Err(UserError::key(
                    "model.kind",
                    format!(
                        "a cnn needs 2-D images (data.kind = \"idx\" or \"mnist-like\"); these samples have shape {sample_shape:?}"
                    ),
                ));
            };
            let (mut channels, mut h, mut w) = (1, height, width);
            let mut layers = Vec::new();
            for (i, &[out, kernel]) in config.conv.iter().enumerate() {
                let convolved =
                    |side: usize| (side + 2 * padding(config, kernel) + 1).saturating_sub(kernel);
                let side = |side: usize| config.pool.side(convolved(side));
                if side(h) == 0 || side(w) == 0 {
                    return Err(UserError::key(
                        "model.conv",
                        format!(
                            "conv{} leaves nothing of its {h}×{w} input (kernel {kernel}, padding {:?}, pooling {:?})",
                            i + 1,
                            config.padding,
                            config.pool
                        ),
                    ));
                }
                let fans = Role::Weight {
                    fan_in: channels * kernel * kernel,
                    fan_out: out * kernel * kernel,
                };
                let n = i + 1;
                specs.push(Spec::new(
                    format!("conv{n}.weight"),
                    vec![out, channels, kernel, kernel],
                    fans,
                ));
                specs.push(Spec::new(format!("conv{n}.bias"), vec![out], Role::Bias));
                if config.batch_norm {
                    specs.push(Spec::new(
                        format!("bn{n}.weight"),
                        vec![out],
                        Role::NormScale,
                    ));
                    specs.push(Spec::new(format!("bn{n}.bias"), vec![out], Role::NormShift));
                    specs.push(Spec::new(
                        format!("bn{n}.running_mean"),
                        vec![out],
                        Role::RunningMean,
                    ));
                    specs.push(Spec::new(
                        format!("bn{n}.running_var"),
                        vec![out],
                        Role::RunningVar,
                    ));
                }
                let layer = out * channels * kernel * kernel * convolved(h) * convolved(w);
                first_layer.get_or_insert(layer);
                multiply_adds += layer;
                (channels, h, w) = (out, side(h), side(w));
                layers.push(format!("{out}k{kernel}"));
            }
            let description = format!(
                "CNN 1×{height}×{width} → conv [{}]{}, {} pooling → {channels}×{h}×{w}, head",
                layers.join(", "),
                if config.batch_norm {
                    " + BatchNorm"
                } else {
                    ""
                },
                format!("{:?}", config.pool).to_lowercase()
            );
            (Some([1, height, width]), channels * h * w, description)
        }
    };
    let widths: Vec<usize> = std::iter::once(features)
        .chain(config.hidden.iter().copied())
        .chain(std::iter::once(classes))
        .collect();
    if let Some([fan_in, fan_out]) = oversized_layer(&widths) {
        return Err(UserError::key(
            "model.hidden",
            format!("a {fan_out}×{fan_in} layer would not fit in memory"),
        ));
    }
    for (i, w) in widths.windows(2).enumerate() {
        let (fan_in, fan_out) = (w[0], w[1]);
        first_layer.get_or_insert(fan_in * fan_out);
        multiply_adds += fan_in * fan_out;
        specs.push(Spec::new(
            format!("fc{}.weight", i + 1),
            vec![fan_out, fan_in],
            Role::Weight { fan_in, fan_out },
        ));
        specs.push(Spec::new(
            format!("fc{}.bias", i + 1),
            vec![fan_out],
            Role::Bias,
        ));
    }
    Ok(Architecture {
        specs,
        image,
        description: format!("{description} {widths:?}"),
        multiply_adds,
        step_flops: 2 * (3 * multiply_adds - first_layer.unwrap_or(0)),
    })
}

/// Zero padding on each side: `same` keeps an odd kernel's image size.
fn padding(config: &ModelConfig, kernel: usize) -> usize {
    match config.padding {
        Padding::Same => kernel / 2,
        Padding::Valid => 0,
    }
}

impl Model {
    /// A new model for samples of `sample_shape` (`[features]`, or `[h, w]`
    /// images): parameters drawn from the seed's `Init` stream, or read from
    /// `model.init_from`.
    pub fn new(
        config: &ModelConfig,
        sample_shape: &[usize],
        classes: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self, anyhow::Error> {
        let Architecture {
            specs,
            image,
            description,
            multiply_adds,
            step_flops,
        } = architecture(config, sample_shape, classes)?;
        let values = match &config.init_from {
            Some(path) => read_init_file(path, &specs, device)?,
            None => draw(&specs, config, &mut rng::stream(seed, Stream::Init), device)?,
        };
        let mut params = Vec::new();
        let mut buffers = Vec::new();
        for (spec, value) in specs.iter().zip(values) {
            let param = Param {
                name: spec.name.clone(),
                var: Var::from_tensor(&value)?,
            };
            if spec.is_buffer() {
                buffers.push(param);
            } else {
                params.push(param);
            }
        }
        let by_name: HashMap<&str, &Var> = params
            .iter()
            .chain(&buffers)
            .map(|p| (p.name.as_str(), &p.var))
            .collect();
        let var = |name: String| by_name[name.as_str()].clone();
        let conv_layers = if image.is_some() {
            config.conv.as_slice()
        } else {
            &[]
        };
        let convs = conv_layers
            .iter()
            .enumerate()
            .map(|(i, &[_, kernel])| {
                let n = i + 1;
                ConvBlock {
                    conv: Conv {
                        name: format!("conv{n}"),
                        weight: var(format!("conv{n}.weight")),
                        bias: var(format!("conv{n}.bias")),
                        padding: padding(config, kernel),
                    },
                    norm: config.batch_norm.then(|| BatchNorm {
                        name: format!("bn{n}"),
                        weight: var(format!("bn{n}.weight")),
                        bias: var(format!("bn{n}.bias")),
                        running_mean: var(format!("bn{n}.running_mean")),
                        running_var: var(format!("bn{n}.running_var")),
                    }),
                }
            })
            .collect();
        let dense = (1..)
            .map_while(|n| {
                by_name
                    .contains_key(format!("fc{n}.weight").as_str())
                    .then(|| Dense {
                        name: format!("fc{n}"),
                        weight: var(format!("fc{n}.weight")),
                        bias: var(format!("fc{n}.bias")),
                    })
            })
            .collect();
        Ok(Self {
            params,
            buffers,
            convs,
            dense,
            image,
            pool: config.pool,
            activation: config.activation,
            dropout: config.dropout as f32,
            description,
            multiply_adds,
            step_flops,
        })
    }

    /// The model of a run's config for its loaded data, from the run's seed.
    pub fn for_data(
        config: &crate::config::Config,
        data: &crate::data::Splits,
        device: &Device,
    ) -> Result<Self, anyhow::Error> {
        Self::new(
            &config.model,
            &data.train.sample_shape,
            data.classes,
            config.seed,
            device,
        )
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// BatchNorm's running statistics (empty without BatchNorm).
    pub fn buffers(&self) -> &[Param] {
        &self.buffers
    }

    /// The number of weighted layers (convolutions and dense layers).
    pub fn layers(&self) -> usize {
        self.convs.len() + self.dense.len()
    }

    /// Every weighted layer's name and weight, in order (`conv1`, …, `fc1`, …).
    pub fn layer_weights(&self) -> Vec<(&str, &Tensor)> {
        let convs = self
            .convs
            .iter()
            .map(|b| (b.conv.name.as_str(), b.conv.weight.as_tensor()));
        let dense = self
            .dense
            .iter()
            .map(|d| (d.name.as_str(), d.weight.as_tensor()));
        convs.chain(dense).collect()
    }

    /// The dense layers' weights, for the Jacobian of the hidden stack.
    pub fn dense_weights(&self) -> Vec<&Tensor> {
        self.dense.iter().map(|d| d.weight.as_tensor()).collect()
    }

    pub fn is_convolutional(&self) -> bool {
        !self.convs.is_empty()
    }

    /// Multiply-adds of one sample's forward pass through the weighted layers
    /// (a dense layer's weights once, a kernel's once per output position).
    pub fn multiply_adds(&self) -> usize {
        self.multiply_adds
    }

    /// FLOPs of one sample's training step through the weighted layers, 2
    /// per multiply-add, counted per layer from its shapes: the forward
    /// product, ∂W, and δ of the layer's input for every layer but the first,
    /// whose input is the data and whose δ no path computes.
    pub fn step_flops(&self) -> usize {
        self.step_flops
    }

    /// One line for the console: kind, shapes, widths.
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// Logits for a batch `[n, features]`. Pass a generator to train (dropout
    /// active, masks drawn from it; BatchNorm on batch statistics, updating its
    /// running ones); `None` evaluates.
    pub fn forward(
        &self,
        x: &Tensor,
        dropout_rng: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        Ok(self.forward_traced(x, dropout_rng, false)?.0)
    }

    /// [`Model::forward`], keeping what happens inside (see [`ForwardTrace`]). With
    /// `probes`, a zero-valued probe variable is added to every
    /// pre-activation so that candle's backward pass keeps ∂L/∂z_i (it drops
    /// the gradients of intermediate tensors, but keeps those of variables;
    /// adding 0 changes no value).
    pub fn forward_traced(
        &self,
        x: &Tensor,
        mut dropout_rng: Option<&mut Rng>,
        probes: bool,
    ) -> candle_core::Result<(Tensor, ForwardTrace)> {
        let training = dropout_rng.is_some();
        let mut trace = ForwardTrace::default();
        let mut h = x.clone();
        if let Some([c, height, width]) = self.image {
            h = h
                .reshape((x.dim(0)?, c, height, width))?
                .permute((0, 2, 3, 1))?;
            for block in &self.convs {
                let mut z = block.conv.forward(&h)?;
                if let Some(norm) = &block.norm {
                    z = norm.forward(&z, training)?;
                }
                let z = trace.observe(&block.conv.name, z, probes)?;
                let a = self.activation.forward(&z)?;
                trace.acts.push(a.clone());
                h = self.pool.forward(&a)?;
            }
            // The head sees PyTorch's (channel, row, column) order.
            h = h.permute((0, 3, 1, 2))?.flatten_from(1)?;
        }
        for (i, layer) in self.dense.iter().enumerate() {
            trace.inputs.push(h.clone());
            let z = trace.observe(&layer.name, layer.forward(&h)?, probes)?;
            if i + 1 == self.dense.len() {
                return Ok((z, trace));
            }
            h = self.activation.forward(&z)?;
            trace.acts.push(h.clone());
            let mask = match dropout_rng.as_deref_mut().filter(|_| self.dropout > 0.0) {
                Some(rng) => Some(dropout_mask(h.dims(), self.dropout, rng, x.device())?),
                None => None,
            };
            if let Some(mask) = &mask {
                h = (h * mask)?;
            }
            trace.masks.push(mask);
        }
        unreachable!("a model has at least its output layer")
    }

    /// The dense layers (`fc1 …`), in order.
    pub fn dense(&self) -> &[Dense] {
        &self.dense
    }

    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// The probability of dropping a hidden unit while training.
    pub fn dropout_rate(&self) -> f32 {
        self.dropout
    }

    /// Every parameter and buffer by name, for checkpoints.
    pub fn named_tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .chain(&self.buffers)
            .map(|p| (p.name.clone(), p.tensor().clone()))
            .collect()
    }
}

/// What [`Model::forward_traced`] keeps, per weighted layer (conv1 …, fc1 …)
/// unless said otherwise.
#[derive(Debug, Clone, Default)]
pub struct ForwardTrace {
    pub layers: Vec<String>,
    /// z_i, the activation's input (after BatchNorm): `[n, units]`, or
    /// `[n, h, w, channels]` for a convolution.
    pub preacts: Vec<Tensor>,
    /// The zero probe variables, when asked for: `grads.get(probes[i])` is
    /// ∂L/∂z_i after candle's backward pass.
    pub probes: Vec<Var>,
    /// h_i = φ(z_i) of every layer but the last (before pooling or dropout).
    pub acts: Vec<Tensor>,
    /// Per dense layer, its input (after the previous layer's dropout).
    pub inputs: Vec<Tensor>,
    /// Per hidden dense layer, the dropout mask applied to its output.
    pub masks: Vec<Option<Tensor>>,
    /// ∂L/∂z_i, once a backward pass has filled it in.
    pub preact_grads: Vec<Tensor>,
}

impl ForwardTrace {
    /// Records the layer and its pre-activation, with a probe added if asked.
    fn observe(&mut self, layer: &str, z: Tensor, probe: bool) -> candle_core::Result<Tensor> {
        let z = if probe {
            let probe = Var::zeros(z.dims(), z.dtype(), z.device())?;
            let z = (z + probe.as_tensor())?;
            self.probes.push(probe);
            z
        } else {
            z
        };
        self.layers.push(layer.to_string());
        self.preacts.push(z.clone());
        Ok(z)
    }

    /// Fills in `preact_grads` from the probes' gradients after candle's backward pass.
    pub fn read_probes(&mut self, grads: &candle_core::backprop::GradStore) {
        self.preact_grads = self
            .probes
            .iter()
            .filter_map(|probe| grads.get(probe.as_tensor()).cloned())
            .collect();
    }
}

/// Inverted dropout: zero with probability `p`, scale survivors by 1/(1−p), so
/// nothing changes at evaluation time.
fn dropout_mask(
    dims: &[usize],
    p: f32,
    rng: &mut Rng,
    device: &Device,
) -> candle_core::Result<Tensor> {
    Tensor::from_vec(dropout_values(dims.iter().product(), p, rng), dims, device)
}

/// The values of a dropout mask of `n` elements, in row-major order.
fn dropout_values(n: usize, p: f32, rng: &mut Rng) -> Vec<f32> {
    let keep = 1.0 / (1.0 - p);
    (0..n)
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
        .collect()
}

/// Draws every tensor: weights from the init scheme with their fans (a
/// kernel `[out, in, k, k]` is drawn as the matrix `[out, in·k·k]`, as
/// PyTorch does), biases at `model.bias_init`, BatchNorm at γ = 1, β = 0,
/// running statistics at mean 0, variance 1.
fn draw(
    specs: &[Spec],
    config: &ModelConfig,
    rng: &mut Rng,
    device: &Device,
) -> candle_core::Result<Vec<Tensor>> {
    specs
        .iter()
        .map(|spec| {
            let shape = spec.shape.as_slice();
            match spec.role {
                Role::Weight { fan_in, fan_out } => {
                    let law = init::Law::of(config.init, config.init_scale, fan_out, fan_in);
                    let rows = shape[0];
                    let cols = shape[1..].iter().product();
                    Tensor::from_vec(law.draw(rows, cols, rng), shape, device)
                }
                Role::Bias => Tensor::full(config.bias_init as f32, shape, device),
                Role::NormScale | Role::RunningVar => Tensor::ones(shape, DType::F32, device),
                Role::NormShift | Role::RunningMean => Tensor::zeros(shape, DType::F32, device),
            }
        })
        .collect()
}

/// Reads every parameter from a safetensors file; names and shapes must
/// match. BatchNorm's running statistics are taken from the file when there,
/// else start at mean 0, variance 1.
fn read_init_file(path: &Path, specs: &[Spec], device: &Device) -> Result<Vec<Tensor>, UserError> {
    let err = |message: String| UserError::data(path, message);
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| err(format!("not a readable safetensors file: {e}")))?;
    let values = specs
        .iter()
        .map(|spec| {
            let (name, shape) = (&spec.name, &spec.shape);
            let Some(tensor) = tensors.remove(name) else {
                return match spec.role {
                    Role::RunningMean => Tensor::zeros(shape.as_slice(), DType::F32, device),
                    Role::RunningVar => Tensor::ones(shape.as_slice(), DType::F32, device),
                    _ => return Err(err(format!("has no tensor `{name}`"))),
                }
                .map_err(|e| err(format!("`{name}`: {e}")));
            };
            if tensor.dims() != shape.as_slice() {
                return Err(err(format!(
                    "`{name}` has shape {:?}, the model needs {shape:?}",
                    tensor.dims()
                )));
            }
            if !tensor.dtype().is_float() {
                return Err(err(format!(
                    "`{name}` holds {:?} values; parameters are floating point (f16, bf16, f32 or f64, read as f32)",
                    tensor.dtype()
                )));
            }
            let tensor = tensor
                .to_dtype(DType::F32)
                .map_err(|e| err(format!("`{name}`: {e}")))?;
            let values: Vec<f32> = tensor
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(|e| err(format!("`{name}`: {e}")))?;
            if let Some(at) = values.iter().position(|v| !v.is_finite()) {
                return Err(err(format!(
                    "`{name}` holds {} at index {at} (in f32); initial values must be finite",
                    values[at]
                )));
            }
            Ok(tensor)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(extra) = tensors.keys().min() {
        return Err(err(format!(
            "has a tensor `{extra}` that the model does not (check model.hidden and model.conv)"
        )));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::InitScheme;

    fn model(config: &ModelConfig) -> Model {
        Model::new(config, &[4], 3, 0, &Device::Cpu).unwrap()
    }

    #[test]
    fn parameters_follow_the_contract_names_and_shapes() {
        let config = ModelConfig {
            hidden: vec![5, 6],
            ..ModelConfig::default()
        };
        let m = model(&config);
        let names: Vec<_> = m
            .params()
            .iter()
            .map(|p| (p.name.as_str(), p.tensor().dims().to_vec()))
            .collect();
        assert_eq!(
            names,
            [
                ("fc1.weight", vec![5, 4]),
                ("fc1.bias", vec![5]),
                ("fc2.weight", vec![6, 5]),
                ("fc2.bias", vec![6]),
                ("fc3.weight", vec![3, 6]),
                ("fc3.bias", vec![3]),
            ]
        );
        let x = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.forward(&x, None).unwrap().dims(), &[2, 3]);
    }

    #[test]
    fn softmax_regression_has_one_layer() {
        let m = model(&ModelConfig {
            hidden: vec![],
            ..ModelConfig::default()
        });
        assert_eq!(m.layers(), 1);
    }

    #[test]
    fn dropout_only_while_training_and_unbiased() {
        let config = ModelConfig {
            hidden: vec![2000],
            activation: Activation::Identity,
            init: InitScheme::Constant,
            init_scale: 1.0,
            dropout: 0.5,
            ..ModelConfig::default()
        };
        let m = Model::new(&config, &[1], 1, 0, &Device::Cpu).unwrap();
        let x = Tensor::ones((1, 1), DType::F32, &Device::Cpu).unwrap();
        let eval = m.forward(&x, None).unwrap().to_vec2::<f32>().unwrap()[0][0];
        assert_eq!(eval, 2000.0);
        let mut rng = rng::stream(0, Stream::Dropout);
        let train = m
            .forward(&x, Some(&mut rng))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()[0][0];
        assert_ne!(train, eval);
        // Each unit contributes 0 or 2 with equal odds: the sum is 2000 ± 3·√2000·1.
        assert!((train - eval).abs() < 135.0, "{train}");
    }

    #[test]
    fn init_from_round_trips_and_rejects_mismatches() {
        let config = ModelConfig {
            hidden: vec![5],
            ..ModelConfig::default()
        };
        let m = model(&config);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("init.safetensors");
        candle_core::safetensors::save(&m.named_tensors(), &path).unwrap();
        let loaded = model(&ModelConfig {
            init_from: Some(path.clone()),
            ..config.clone()
        });
        for (a, b) in m.params().iter().zip(loaded.params()) {
            assert_eq!(
                a.tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        let wider = ModelConfig {
            hidden: vec![6],
            init_from: Some(path),
            ..config
        };
        let err = Model::new(&wider, &[4], 3, 0, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("shape"), "{err}");
    }
}

#[cfg(test)]
mod cnn_tests {
    use super::*;
    use crate::config::{InitScheme, Pool};

    fn cnn(conv: Vec<[usize; 2]>, batch_norm: bool) -> ModelConfig {
        ModelConfig {
            kind: ModelKind::Cnn,
            conv,
            batch_norm,
            hidden: vec![7],
            ..ModelConfig::default()
        }
    }

    fn shapes(tensors: &[Param]) -> Vec<(String, Vec<usize>)> {
        tensors
            .iter()
            .map(|p| (p.name.clone(), p.tensor().dims().to_vec()))
            .collect()
    }

    #[test]
    fn parameters_and_buffers_follow_the_contract_names_and_shapes() {
        let config = cnn(vec![[4, 3], [6, 5]], true);
        let m = Model::new(&config, &[12, 12], 3, 0, &Device::Cpu).unwrap();
        let named = |list: &[(&str, &[usize])]| -> Vec<(String, Vec<usize>)> {
            list.iter()
                .map(|(n, s)| (n.to_string(), s.to_vec()))
                .collect()
        };
        // 12×12 → same conv 12×12 → pool 6×6 → same conv 6×6 → pool 3×3: 6·3·3 = 54 features.
        assert_eq!(
            shapes(m.params()),
            named(&[
                ("conv1.weight", &[4, 1, 3, 3]),
                ("conv1.bias", &[4]),
                ("bn1.weight", &[4]),
                ("bn1.bias", &[4]),
                ("conv2.weight", &[6, 4, 5, 5]),
                ("conv2.bias", &[6]),
                ("bn2.weight", &[6]),
                ("bn2.bias", &[6]),
                ("fc1.weight", &[7, 54]),
                ("fc1.bias", &[7]),
                ("fc2.weight", &[3, 7]),
                ("fc2.bias", &[3]),
            ])
        );
        assert_eq!(
            shapes(m.buffers()),
            named(&[
                ("bn1.running_mean", &[4]),
                ("bn1.running_var", &[4]),
                ("bn2.running_mean", &[6]),
                ("bn2.running_var", &[6]),
            ])
        );
        assert_eq!(m.named_tensors().len(), 16);
        let x = Tensor::ones((2, 144), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.forward(&x, None).unwrap().dims(), &[2, 3]);
        let (_, trace) = m.forward_traced(&x, None, true).unwrap();
        assert_eq!(trace.layers, ["conv1", "conv2", "fc1", "fc2"]);
        assert_eq!(trace.acts[0].dims(), [2, 12, 12, 4]);
        assert_eq!(trace.preacts[1].dims(), [2, 6, 6, 6]);
    }

    #[test]
    fn valid_padding_and_pooling_shrink_the_image_and_too_much_is_a_config_error() {
        let mut config = cnn(vec![[4, 3]], false);
        config.padding = Padding::Valid;
        config.pool = Pool::Avg;
        // 12 → 10 → 5.
        let m = Model::new(&config, &[12, 12], 3, 0, &Device::Cpu).unwrap();
        assert_eq!(m.params()[2].tensor().dims(), [7, 4 * 5 * 5]);
        config.conv.push([2, 5]); // 5 → 1 → pooled to 0
        let err = Model::new(&config, &[12, 12], 3, 0, &Device::Cpu).unwrap_err();
        let err = err.downcast::<UserError>().unwrap();
        assert!(err.to_string().contains("model.conv"), "{err}");
        let err = Model::new(&cnn(vec![[4, 3]], false), &[12], 3, 0, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("model.kind"), "{err}");
    }

    /// Every scheme draws a kernel `[out, in, k, k]` with fan_in = in·k·k and
    /// fan_out = out·k·k: the sample variance of conv2's kernel (18,432
    /// values) matches the scheme's variance at those fans to 5%.
    #[test]
    fn kernels_are_drawn_with_convolution_fans() {
        let (c_in, c_out, k) = (32, 64, 3);
        for scheme in [
            InitScheme::Normal,
            InitScheme::Uniform,
            InitScheme::UniformFanIn,
            InitScheme::XavierNormal,
            InitScheme::XavierUniform,
            InitScheme::HeNormal,
            InitScheme::HeUniform,
            InitScheme::LecunNormal,
            InitScheme::Orthogonal,
            InitScheme::Constant,
            InitScheme::Zeros,
        ] {
            let mut config = cnn(vec![[c_in, k], [c_out, k]], false);
            config.init = scheme;
            config.init_scale = 0.5;
            let m = Model::new(&config, &[8, 8], 3, 0, &Device::Cpu).unwrap();
            let kernel = m.params()[2].tensor();
            assert_eq!(kernel.dims(), [c_out, c_in, k, k]);
            let w: Vec<f64> = kernel
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            let n = w.len() as f64;
            let mean_sq = w.iter().map(|v| v * v).sum::<f64>() / n;
            let (fan_in, fan_out) = ((c_in * k * k) as f64, (c_out * k * k) as f64);
            let expected = match init::Law::of(scheme, 0.5, c_out * k * k, c_in * k * k) {
                init::Law::Normal { std } => std * std,
                init::Law::Uniform { bound } => bound * bound / 3.0,
                init::Law::Constant(v) => v * v,
                // Orthonormal rows of [64, 288], times the gain: each row has norm 0.5.
                init::Law::Orthogonal { gain } => gain * gain / (c_in * k * k) as f64,
            };
            let by_hand = match scheme {
                InitScheme::HeNormal | InitScheme::HeUniform => 0.25 * 2.0 / fan_in,
                InitScheme::XavierNormal | InitScheme::XavierUniform => {
                    0.25 * 2.0 / (fan_in + fan_out)
                }
                InitScheme::LecunNormal | InitScheme::UniformFanIn => {
                    0.25 / fan_in
                        * if scheme == InitScheme::UniformFanIn {
                            1.0 / 3.0
                        } else {
                            1.0
                        }
                }
                _ => expected,
            };
            assert!(
                (expected - by_hand).abs() <= 1e-12,
                "{scheme:?}: {expected} vs {by_hand}"
            );
            assert!(
                (mean_sq - expected).abs() <= 0.05 * expected,
                "{scheme:?}: {mean_sq} vs {expected}"
            );
            if scheme == InitScheme::Orthogonal {
                let rows = kernel.flatten_from(1).unwrap();
                let gram = rows.matmul(&rows.t().unwrap()).unwrap();
                let eye = (Tensor::eye(c_out, DType::F32, &Device::Cpu).unwrap() * 0.25).unwrap();
                let off = (gram - eye).unwrap().abs().unwrap().max_all().unwrap();
                assert!(off.to_scalar::<f32>().unwrap() < 1e-5);
            }
        }
    }

    /// The bench's LeNet-style CNN on 28×28: conv1 16@5×5 'same' has 784
    /// positions × 25 × 1 × 16 multiply-adds, conv2 32@5×5 on 14×14 has
    /// 196 × 25 × 16 × 32, the head 1568·128 + 128·10; all three products
    /// but conv1's δx, 2 FLOPs each: 17.5 MFLOP per sample.
    #[test]
    fn step_flops_count_convolutions_by_output_positions() {
        let mut config = cnn(vec![[16, 5], [32, 5]], true);
        config.hidden = vec![128];
        let m = Model::new(&config, &[28, 28], 10, 0, &Device::Cpu).unwrap();
        let (conv1, conv2, head) = (784 * 25 * 16, 196 * 25 * 16 * 32, 1568 * 128 + 1280);
        assert_eq!(m.multiply_adds(), conv1 + conv2 + head);
        assert_eq!(m.step_flops(), 2 * (2 * conv1 + 3 * (conv2 + head)));
        assert_eq!(m.step_flops(), 17_519_104);
        let mlp = Model::new(&ModelConfig::default(), &[784], 10, 0, &Device::Cpu).unwrap();
        let widths: Vec<usize> = [784]
            .into_iter()
            .chain(ModelConfig::default().hidden)
            .chain([10])
            .collect();
        let layers: Vec<usize> = widths.windows(2).map(|w| w[0] * w[1]).collect();
        let all: usize = layers.iter().sum();
        assert_eq!(mlp.step_flops(), 2 * (3 * all - layers[0]));
    }

    #[test]
    fn init_from_may_carry_running_statistics() {
        let config = cnn(vec![[2, 3]], true);
        let m = Model::new(&config, &[4, 4], 3, 0, &Device::Cpu).unwrap();
        m.buffers()[1]
            .var
            .set(&Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap())
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let with = dir.path().join("with.safetensors");
        candle_core::safetensors::save(&m.named_tensors(), &with).unwrap();
        let only_params: HashMap<String, Tensor> = m
            .params()
            .iter()
            .map(|p| (p.name.clone(), p.tensor().clone()))
            .collect();
        let without = dir.path().join("without.safetensors");
        candle_core::safetensors::save(&only_params, &without).unwrap();
        let load = |path: &Path| {
            let config = ModelConfig {
                init_from: Some(path.to_path_buf()),
                ..config.clone()
            };
            let m = Model::new(&config, &[4, 4], 3, 0, &Device::Cpu).unwrap();
            m.buffers()[1].tensor().to_vec1::<f32>().unwrap()
        };
        assert_eq!(load(&with), [3.0, 4.0]);
        assert_eq!(load(&without), [1.0, 1.0]);
    }
}
