//! The experiment config: one TOML file, every key documented, defaults filled in.
//!
//! Loading goes text → [`toml::Table`] → `--set` overrides → typed [`Config`]
//! → [`Config::validate`]. Overrides are applied to the table, before typing,
//! so that a file value and an override are checked by the same code and a
//! bad one is reported under the same dotted key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::UserError;

/// One run, fully described. Written back as the run's `config.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Run name; the run directory is `<out>/<name>`. Defaults to the config file's stem.
    pub name: String,
    /// The one seed for everything random: data, initialisation, shuffling, dropout.
    pub seed: u64,
    /// Where tensors live.
    pub device: DeviceKind,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleConfig,
    pub train: TrainConfig,
    pub log: LogConfig,
    pub diagnostics: DiagnosticsConfig,
    pub divergence: DivergenceConfig,
    pub sweep: SweepConfig,
}

/// `larslab sweep`'s grid, when it comes from the file (the command line adds to it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SweepConfig {
    /// Dotted key to the list of values it takes, e.g. `"optimizer.lr" = [0.1, 0.5]`.
    pub grid: toml::Table,
    /// Seeds every grid point is run with (empty: the config's `seed`).
    pub seeds: Vec<u64>,
    /// Runs at a time (0: one per two cores).
    pub jobs: usize,
}

/// Measurements inside the layers (activations, back-propagated gradients, symmetry, spectra).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiagnosticsConfig {
    /// Per-layer activation, pre-activation-gradient, dead/saturated and
    /// symmetry measurements every this many steps; 0 is off.
    pub every: u64,
    /// Singular values of every weight matrix (spectral norm, condition
    /// number) every this many steps; 0 is off.
    pub spectrum_every: u64,
}

impl Default for DiagnosticsConfig {
    fn default() -> Self {
        Self {
            every: 20,
            spectrum_every: 100,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Cpu,
    Cuda,
    /// CUDA when the binary was built with it and a GPU is present, else the CPU.
    Auto,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    pub kind: DataKind,
    /// `idx`: an IDX image file (idx3 `[n, rows, cols]` or idx2 `[n, features]`), raw or gzip.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub images: Option<PathBuf>,
    /// `idx`: the matching IDX label file (idx1), raw or gzip.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<PathBuf>,
    /// `idx`: a directory holding `<prefix>-images-idx3-ubyte[.gz]` and
    /// `<prefix>-labels-idx1-ubyte[.gz]`, instead of `images` and `labels`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// `idx` with `dir`: the files' prefix (`train`, `t10k`).
    pub prefix: String,
    /// Optional test split, evaluated once at the end: an IDX image file…
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_images: Option<PathBuf>,
    /// …and its label file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_labels: Option<PathBuf>,
    /// `mnist-like`: digits drawn for a test split evaluated at the end (0: none).
    pub n_test: usize,
    /// Synthetic data: how many samples to draw (validation included).
    pub n_train: usize,
    /// Share of the samples held out for validation, 0 ≤ f < 1 (0: no validation).
    pub val_fraction: f64,
    /// Samples per step. A batch as large as the training split is full-batch gradient descent.
    pub batch_size: usize,
    /// Reshuffle the training split every epoch; `false` keeps file order.
    pub shuffle: bool,
    /// How features are scaled before training.
    pub normalize: Normalize,
    /// Synthetic data: input dimension.
    pub features: usize,
    /// Synthetic data: number of classes.
    pub classes: usize,
    /// `teacher`: hidden widths of the random tanh teacher network whose argmax is the label.
    pub teacher_hidden: Vec<usize>,
    /// `blobs`: standard deviation of each cluster around its centre (centres are drawn from N(0, I)).
    pub cluster_std: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataKind {
    /// Gaussian inputs labelled by a random teacher MLP.
    Teacher,
    /// Gaussian clusters, one per class.
    Blobs,
    /// An IDX image file and label file (MNIST and its cousins).
    Idx,
    /// Procedurally drawn handwritten digits, 28×28 u8 (built in, nothing downloaded).
    #[serde(rename = "mnist-like")]
    MnistLike,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// Leave features as they are.
    None,
    /// Divide by 255: pixel grey levels to [0, 1]. A no-op for synthetic data, which is drawn at unit scale.
    Unit,
    /// Per-feature zero mean and unit variance, estimated on the training split only.
    Standard,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    /// The global learning rate, before the schedule.
    pub lr: f64,
    /// Heavy-ball momentum, 0 ≤ m < 1; 0 is plain SGD.
    pub momentum: f64,
    /// Nesterov's variant of momentum.
    pub nesterov: bool,
    /// Weight decay β, ≥ 0: added to the gradient (sgd, lars, lamb) or decoupled (adamw).
    pub weight_decay: f64,
    /// LARS η: the trust ratio is η‖w‖ / (denominator); > 0.
    pub trust_coefficient: f64,
    /// LARS: the constant added to the trust ratio's denominator, ≥ 0.
    pub eps: f64,
    /// LARS: which gradient norm the trust ratio divides by.
    pub denominator: Denominator,
    /// LARC clip mode (lars only): the layer's step size is min(lr, λ) instead of lr·λ.
    pub clip: bool,
    /// lars, lamb, adamw: 1-D parameters (biases) get neither weight decay nor a trust ratio.
    pub exclude_1d: bool,
    /// lamb, adamw: decay of Adam's first moment, 0 ≤ β1 < 1.
    pub beta1: f64,
    /// lamb, adamw: decay of Adam's second moment, 0 ≤ β2 < 1.
    pub beta2: f64,
    /// lamb, adamw: the constant added to Adam's √v̂, > 0.
    pub adam_eps: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Denominator {
    /// η‖w‖ / (‖g‖ + β‖w‖ + eps): You, Gitman and Ginsburg 2017, Algorithm 1.
    Paper,
    /// η‖w‖ / (‖g + βw‖ + eps): optax.lars, SimCLR, Barlow Twins.
    Decayed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Stochastic gradient descent with optional momentum, Nesterov and weight decay (PyTorch's and optax's semantics).
    Sgd,
    /// Layer-wise adaptive rate scaling (You, Gitman and Ginsburg 2017), LARC with `clip`.
    Lars,
    /// LAMB (You et al. 2019), as optax.lamb.
    Lamb,
    /// Adam with decoupled weight decay (Loshchilov and Hutter 2019), as optax.adamw.
    Adamw,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    pub kind: ScheduleKind,
    /// Linear warm-up from lr/warmup_steps to lr over this many steps; 0 is none.
    pub warmup_steps: u64,
    /// `poly`: lr · (1 − progress)^power after warm-up (the LARS paper uses 2).
    pub power: f64,
    /// `step`: multiply the rate by `gamma` every `step_every` steps.
    pub step_every: u64,
    /// `step`: the decay factor, 0 < gamma ≤ 1.
    pub gamma: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    Poly,
    Cosine,
    Step,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer updates to make.
    pub steps: u64,
    /// Record training metrics every this many steps (and at the last step).
    pub log_every: u64,
    /// Evaluate on the validation split every this many steps (and at the end).
    pub eval_every: u64,
    /// Save a checkpoint every this many steps; 0: only the final one.
    pub checkpoint_every: u64,
    /// Keep the newest this many checkpoints (the final one is always kept), ≥ 1.
    pub keep_checkpoints: usize,
}

/// When a run counts as diverging, and what happens then. A rule must hold
/// for `patience` consecutive steps (non-finite values fire at once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DivergenceConfig {
    /// A non-finite loss or gradient is a divergence.
    pub non_finite: bool,
    /// The training loss exceeds this × its best smoothed value so far (and
    /// by at least `loss_min_rise`); 0 is off.
    pub loss_factor: f64,
    /// The least rise over the best smoothed loss that counts, in nats: keeps
    /// a nearly-zero training loss from firing the ratio on noise.
    pub loss_min_rise: f64,
    /// The global gradient norm exceeds this × its running median; 0 is off.
    pub grad_factor: f64,
    /// Steps a rule must hold in a row before the run counts as diverging, ≥ 1.
    pub patience: u64,
    /// Decay of the exponential moving average that smooths the training loss, 0 ≤ s < 1.
    pub smoothing: f64,
    /// Steps of gradient norms the running median is taken over, ≥ 1.
    pub grad_window: usize,
    /// The ratio rules start after this many steps (the statistics need history).
    pub min_steps: u64,
    /// `loss_explosion`: the batch loss exceeds this × max(ln(classes), the
    /// first loss), from step 0; 0 is off.
    pub explosion_factor: f64,
    /// `dead_layer`: a layer's gradient norm falls below this × its median over
    /// the first `early_steps` steps while the loss is above ln(classes)/2; 0 is off.
    pub dead_ratio: f64,
    /// `grad_runaway`: the global gradient norm exceeds this × its median over
    /// the first `early_steps` steps; 0 is off.
    pub runaway_factor: f64,
    /// The steps whose gradient norms set the early levels, ≥ 1.
    pub early_steps: u64,
    /// Steps the step-0 rules (explosion, dead layer, runaway) must hold in a row, ≥ 1.
    pub fast_patience: u64,
    /// A layer has left its recent band when its gradient norm is this many
    /// times above or below its median over the steps before, > 1.
    pub layer_band: f64,
    /// `stop` the run, `continue` (only mark it), or `rescue` it from the last healthy state.
    pub action: DivergenceAction,
    /// `rescue`: how many rescues one run may take (rungs of the ladder, or
    /// applications of `[divergence.rescue]`).
    pub max_rescues: u32,
    /// `rescue` without `[divergence.rescue]`: the fixes to try, in order.
    pub ladder: Vec<Rung>,
    /// `rescue`: keep an in-memory snapshot every this many steps, ≥ 1.
    pub snapshot_every: u64,
    /// `rescue`: how many in-memory snapshots to keep, ≥ 1.
    pub snapshots: usize,
    /// A rescue has recovered when the smoothed loss is back under the best
    /// before the divergence within this many steps (and the run ends finite).
    pub recover_within: u64,
    /// `rescue`: config overrides for the rescued run, dotted keys (`"optimizer.kind" = "lars"`) or nested tables.
    pub rescue: toml::Table,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DivergenceAction {
    Stop,
    Continue,
    Rescue,
}

/// One fix of the rescue ladder (src/rescue.rs says what each changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rung {
    SkipBatches,
    LarcClip,
    LarsPoly,
    LowerLr,
}

impl Rung {
    /// The default ladder.
    pub const LADDER: [Rung; 5] = [
        Rung::SkipBatches,
        Rung::LarcClip,
        Rung::LarsPoly,
        Rung::LowerLr,
        Rung::LowerLr,
    ];

    /// The rung's name as the config and summary.json write it.
    pub fn name(self) -> &'static str {
        match self {
            Rung::SkipBatches => "skip_batches",
            Rung::LarcClip => "larc_clip",
            Rung::LarsPoly => "lars_poly",
            Rung::LowerLr => "lower_lr",
        }
    }
}

impl Default for DivergenceConfig {
    fn default() -> Self {
        Self {
            non_finite: true,
            loss_factor: 4.0,
            loss_min_rise: 0.5,
            grad_factor: 0.0,
            patience: 10,
            smoothing: 0.9,
            grad_window: 50,
            min_steps: 20,
            explosion_factor: 2.0,
            dead_ratio: 1e-4,
            runaway_factor: 1000.0,
            early_steps: 10,
            fast_patience: 3,
            layer_band: 4.0,
            action: DivergenceAction::Stop,
            max_rescues: 5,
            ladder: Rung::LADDER.to_vec(),
            snapshot_every: 10,
            snapshots: 4,
            recover_within: 200,
            rescue: toml::Table::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Write TensorBoard event files into the run directory.
    pub tensorboard: bool,
    /// Declare the HParams experiment in the run's event file (a sweep turns
    /// this off in its runs and declares it once for the whole sweep).
    pub hparams_experiment: bool,
    /// TensorBoard histograms of every parameter and its gradient every this
    /// many steps; 0 is off.
    pub histogram_every: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            tensorboard: true,
            hparams_experiment: true,
            histogram_every: 100,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "default".into(),
            seed: 0,
            device: DeviceKind::Cpu,
            data: DataConfig::default(),
            model: ModelConfig::default(),
            optimizer: OptimizerConfig::default(),
            schedule: ScheduleConfig::default(),
            train: TrainConfig::default(),
            log: LogConfig::default(),
            diagnostics: DiagnosticsConfig::default(),
            divergence: DivergenceConfig::default(),
            sweep: SweepConfig::default(),
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            kind: DataKind::Teacher,
            images: None,
            labels: None,
            dir: None,
            prefix: "train".into(),
            test_images: None,
            test_labels: None,
            n_test: 0,
            n_train: 10_000,
            val_fraction: 0.1,
            batch_size: 128,
            shuffle: true,
            normalize: Normalize::Unit,
            features: 32,
            classes: 10,
            teacher_hidden: vec![64],
            cluster_std: 1.0,
        }
    }
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

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Sgd,
            lr: 0.05,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
            trust_coefficient: 0.001,
            eps: 0.0,
            denominator: Denominator::Paper,
            clip: false,
            exclude_1d: true,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
        }
    }
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Constant,
            warmup_steps: 0,
            power: 2.0,
            step_every: 1000,
            gamma: 0.1,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 2000,
            log_every: 20,
            eval_every: 200,
            checkpoint_every: 0,
            keep_checkpoints: 5,
        }
    }
}

/// Where config text came from, for error messages.
#[derive(Debug, Clone)]
pub enum Source<'a> {
    File(&'a Path),
    BuiltIn,
}

impl Source<'_> {
    fn describe(&self) -> String {
        match self {
            Source::File(path) => path.display().to_string(),
            Source::BuiltIn => "built-in config".into(),
        }
    }
}

impl Config {
    /// Reads a config file, applies `--set` overrides, fills defaults and validates.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Config, UserError> {
        Self::load_layers(path, overrides, true)
    }

    /// [`Config::load`] for a run's own `config.toml` (resume, rescue,
    /// compare): its keys are what the run ran with, so keys that do not
    /// apply are not refused there (a config.toml written before they were
    /// left out holds every key); the `--set` overrides are checked as ever.
    pub fn load_run(path: &Path, overrides: &[String]) -> Result<Config, UserError> {
        Self::load_layers(Some(path), overrides, false)
    }

    fn load_layers(
        path: Option<&Path>,
        overrides: &[String],
        check_file: bool,
    ) -> Result<Config, UserError> {
        let (text, source) = match path {
            Some(path) => (read_config_text(path)?, Source::File(path)),
            None => (DEFAULT_EXPERIMENT.to_string(), Source::BuiltIn),
        };
        let mut table = parse_table(&text, &source)?;
        if !table.contains_key("name") {
            let name = match path {
                Some(path) => path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "run".into()),
                None => "default".into(),
            };
            table.insert("name".into(), toml::Value::String(name));
        }
        let file_layer = table.clone();
        let mut set_layer = toml::Table::new();
        for assignment in overrides {
            apply_override(&mut table, assignment)?;
            apply_override(&mut set_layer, assignment)?;
        }
        let mut config = from_table(table)?;
        config.validate()?;
        // Keys the file set for the file's own kinds stay quiet when `--set`
        // switches the kind; keys `--set` gives must apply to the final kinds.
        let file_kinds = (
            kind_in(&file_layer, "optimizer").unwrap_or(OptimizerConfig::default().kind),
            kind_in(&file_layer, "model").unwrap_or(ModelConfig::default().kind),
        );
        let mut file_keys = Vec::new();
        flatten_table("", &file_layer, &mut file_keys);
        let mut set_keys = Vec::new();
        flatten_table("", &set_layer, &mut set_keys);
        file_keys.retain(|(key, _)| !set_keys.iter().any(|(k, _)| k == key));
        if check_file {
            config.check_applicable(&file_keys, Some(file_kinds))?;
        }
        config.check_applicable(&set_keys, None)?;
        config.resolve_paths()?;
        Ok(config)
    }

    /// The resolved config as TOML, ready to be written as the run's
    /// `config.toml`: every key, defaults filled in, except the keys that
    /// apply to none of the kinds this config can run with (see
    /// [`Config::inapplicable_keys`]), so that the file loads again as it is.
    pub fn to_toml(&self) -> String {
        let mut table = toml::Table::try_from(self).expect("a Config always serialises to a table");
        for key in self.inapplicable_keys() {
            let (section, field) = key.split_once('.').expect("a section key");
            if let Some(toml::Value::Table(inner)) = table.get_mut(section) {
                inner.remove(field);
            }
        }
        toml::to_string_pretty(&table).expect("a Config always serialises to TOML")
    }

    /// The optimizer and model kinds this config can run with: its own, the
    /// kind a `divergence.rescue` table switches to, and the kinds of a
    /// `[sweep]` grid.
    fn reachable_kinds(&self) -> (Vec<OptimizerKind>, Vec<ModelKind>) {
        let mut optimizers = vec![self.optimizer.kind];
        let mut models = vec![self.model.kind];
        let mut values: Vec<(String, toml::Value)> = Vec::new();
        flatten_table("", &self.divergence.rescue, &mut values);
        for (key, value) in &self.sweep.grid {
            if let toml::Value::Array(list) = value {
                values.extend(list.iter().map(|v| (key.clone(), v.clone())));
            }
        }
        for (key, value) in values {
            match key.as_str() {
                "optimizer.kind" => optimizers.extend(value.try_into::<OptimizerKind>().ok()),
                "model.kind" => models.extend(value.try_into::<ModelKind>().ok()),
                _ => {}
            }
        }
        // The rescue ladder's LARS rungs switch an SGD-family run to LARS.
        let d = &self.divergence;
        if d.action == DivergenceAction::Rescue
            && d.rescue.is_empty()
            && matches!(
                self.optimizer.kind,
                OptimizerKind::Sgd | OptimizerKind::Lars
            )
            && d.ladder
                .iter()
                .any(|r| matches!(r, Rung::LarcClip | Rung::LarsPoly))
        {
            optimizers.push(OptimizerKind::Lars);
        }
        (optimizers, models)
    }

    /// Dotted keys that apply to none of [`Config::reachable_kinds`].
    pub fn inapplicable_keys(&self) -> Vec<String> {
        let (optimizers, models) = self.reachable_kinds();
        let mut keys = Vec::new();
        for (field, kinds) in OPTIMIZER_KEYS {
            if !kinds.iter().any(|k| optimizers.contains(k)) {
                keys.push(format!("optimizer.{field}"));
            }
        }
        for (field, kinds) in MODEL_KEYS {
            if !kinds.iter().any(|k| models.contains(k)) {
                keys.push(format!("model.{field}"));
            }
        }
        keys
    }

    /// Refuses an explicitly given key (`explicit`: the leaves of one layer,
    /// the file's or `--set`'s) that does not apply to the config's kinds
    /// (nor to `also`, the kinds the layer itself chose).
    fn check_applicable(
        &self,
        explicit: &[(String, toml::Value)],
        also: Option<(OptimizerKind, ModelKind)>,
    ) -> Result<(), UserError> {
        let (mut optimizers, mut models) = self.reachable_kinds();
        if let Some((optimizer, model)) = also {
            optimizers.push(optimizer);
            models.push(model);
        }
        let name = |kind: &dyn std::fmt::Debug| format!("{kind:?}").to_lowercase();
        let names = |kinds: &mut dyn Iterator<Item = String>| kinds.collect::<Vec<_>>().join(", ");
        for (key, _) in explicit {
            let Some((section, field)) = key.split_once('.') else {
                continue;
            };
            let refused = match section {
                "optimizer" => OPTIMIZER_KEYS
                    .iter()
                    .find(|(f, _)| *f == field)
                    .filter(|(_, kinds)| !kinds.iter().any(|k| optimizers.contains(k)))
                    .map(|(_, kinds)| {
                        (
                            names(&mut optimizers.iter().map(|k| name(k))),
                            names(&mut kinds.iter().map(|k| name(k))),
                        )
                    }),
                "model" => MODEL_KEYS
                    .iter()
                    .find(|(f, _)| *f == field)
                    .filter(|(_, kinds)| !kinds.iter().any(|k| models.contains(k)))
                    .map(|(_, kinds)| {
                        (
                            names(&mut models.iter().map(|k| name(k))),
                            names(&mut kinds.iter().map(|k| name(k))),
                        )
                    }),
                _ => None,
            };
            if let Some((chosen, applies)) = refused {
                let mut chosen: Vec<&str> = chosen.split(", ").collect();
                chosen.dedup();
                return Err(UserError::key(
                    key.clone(),
                    format!(
                        "does not apply to {section}.kind = \"{}\" (only to {applies}); remove it",
                        chosen.join("\" or \"")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Rejects values out of range, naming the dotted key at fault (the
    /// rescue overrides included).
    pub fn validate(&self) -> Result<(), UserError> {
        self.validate_settings()?;
        self.rescued().map(|_| ())
    }

    /// Products of sizes that would not fit in memory (each size alone may be fine).
    fn check_sizes(&self) -> Result<(), UserError> {
        let d = &self.data;
        let inputs = if d.kind == DataKind::MnistLike {
            28 * 28
        } else {
            d.features
        };
        let generated = if d.kind == DataKind::Idx {
            0
        } else {
            d.n_train.saturating_add(d.n_test)
        };
        check(
            generated.saturating_mul(inputs) <= MAX_DATA_VALUES,
            "data.n_train",
            &format!(
                "data.n_train (+ n_test) × {inputs} features exceeds {MAX_DATA_VALUES} values"
            ),
        )?;
        let layer_fits = |widths: &[usize]| {
            widths
                .windows(2)
                .all(|w| w[0].saturating_mul(w[1]) <= MAX_LAYER_WEIGHTS)
        };
        let teacher: Vec<usize> = std::iter::once(d.features)
            .chain(d.teacher_hidden.iter().copied())
            .chain(std::iter::once(d.classes))
            .collect();
        check(
            d.kind != DataKind::Teacher || layer_fits(&teacher),
            "data.teacher_hidden",
            &format!(
                "a teacher layer of more than {MAX_LAYER_WEIGHTS} weights would not fit in memory"
            ),
        )?;
        let model: Vec<usize> = std::iter::once(inputs)
            .chain(self.model.hidden.iter().copied())
            .chain(std::iter::once(d.classes))
            .collect();
        check(
            d.kind == DataKind::Idx || layer_fits(&model),
            "model.hidden",
            &format!("a layer of more than {MAX_LAYER_WEIGHTS} weights would not fit in memory"),
        )
    }

    /// This config with `divergence.rescue`'s overrides applied: the config of a rescue run.
    pub fn rescued(&self) -> Result<Config, UserError> {
        self.overridden(&dotted(&self.divergence.rescue), "divergence.rescue")
    }

    /// This config with dotted keys set to values (a rescue's changes), each
    /// error named under `source`.
    pub fn overridden(
        &self,
        overrides: &[(String, toml::Value)],
        source: &str,
    ) -> Result<Config, UserError> {
        let within = |e: UserError| match e {
            UserError::ConfigKey { key, message } => {
                UserError::key(format!("{source}: {key}"), message)
            }
            other => other,
        };
        let mut table = toml::Table::try_from(self).expect("a Config always serialises to a table");
        for (key, value) in overrides {
            if key.starts_with("divergence.rescue") {
                return Err(UserError::key(source, "cannot override divergence.rescue"));
            }
            set_dotted(&mut table, key, value.clone()).map_err(within)?;
        }
        let changed = from_table(table).map_err(within)?;
        changed.validate_settings().map_err(within)?;
        changed.check_applicable(overrides, None).map_err(within)?;
        Ok(changed)
    }

    fn validate_settings(&self) -> Result<(), UserError> {
        let d = &self.data;
        let m = &self.model;
        let o = &self.optimizer;
        let s = &self.schedule;
        let t = &self.train;
        check(!self.name.trim().is_empty(), "name", "must not be empty")?;
        check(
            !self.name.contains(['/', '\\']) && self.name != "." && self.name != "..",
            "name",
            "must be a plain file name (no path separators)",
        )?;
        if d.kind == DataKind::Idx && d.dir.is_none() {
            let needed = "is required when data.kind = \"idx\" (or give data.dir)";
            check(d.images.is_some(), "data.images", needed)?;
            check(d.labels.is_some(), "data.labels", needed)?;
        }
        check(
            d.test_images.is_some() == d.test_labels.is_some(),
            if d.test_images.is_some() {
                "data.test_labels"
            } else {
                "data.test_images"
            },
            "test_images and test_labels go together",
        )?;
        // Sizes past these would exhaust memory (and abort) rather than fail cleanly.
        check(
            (2..=MAX_SAMPLES).contains(&d.n_train),
            "data.n_train",
            &format!("must be between 2 and {MAX_SAMPLES}"),
        )?;
        check(
            d.n_test <= MAX_SAMPLES,
            "data.n_test",
            &format!("must be at most {MAX_SAMPLES}"),
        )?;
        check(
            (0.0..1.0).contains(&d.val_fraction),
            "data.val_fraction",
            "must be in [0, 1)",
        )?;
        check(d.batch_size >= 1, "data.batch_size", "must be at least 1")?;
        check(
            (1..=MAX_WIDTH).contains(&d.features),
            "data.features",
            &format!("must be between 1 and {MAX_WIDTH}"),
        )?;
        check(
            (2..=MAX_WIDTH).contains(&d.classes),
            "data.classes",
            &format!("must be between 2 and {MAX_WIDTH}"),
        )?;
        check(
            d.teacher_hidden
                .iter()
                .all(|&w| (1..=MAX_WIDTH).contains(&w)),
            "data.teacher_hidden",
            &format!("every width must be between 1 and {MAX_WIDTH}"),
        )?;
        check_positive(d.cluster_std, "data.cluster_std")?;
        check(
            m.hidden.iter().all(|&w| (1..=MAX_WIDTH).contains(&w)),
            "model.hidden",
            &format!("every width must be between 1 and {MAX_WIDTH}"),
        )?;
        check(
            m.hidden
                .windows(2)
                .all(|w| w[0] * w[1] <= MAX_LAYER_WEIGHTS),
            "model.hidden",
            &format!("a layer of more than {MAX_LAYER_WEIGHTS} weights would not fit in memory"),
        )?;
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
        )?;
        self.check_sizes()?;
        check(
            (m.bias_init as f32).is_finite(),
            "model.bias_init",
            "must be finite in f32",
        )?;
        check(
            (0.0..1.0).contains(&m.dropout),
            "model.dropout",
            "must be in [0, 1)",
        )?;
        check_positive(o.lr, "optimizer.lr")?;
        check(
            (0.0..1.0).contains(&o.momentum),
            "optimizer.momentum",
            "must be in [0, 1)",
        )?;
        check(
            !o.nesterov || o.momentum > 0.0,
            "optimizer.nesterov",
            "needs optimizer.momentum > 0",
        )?;
        check(
            o.weight_decay.is_finite() && o.weight_decay >= 0.0,
            "optimizer.weight_decay",
            "must be ≥ 0",
        )?;
        check_positive(o.trust_coefficient, "optimizer.trust_coefficient")?;
        check(
            o.eps.is_finite() && o.eps >= 0.0,
            "optimizer.eps",
            "must be ≥ 0",
        )?;
        check(
            !o.clip || o.kind == OptimizerKind::Lars,
            "optimizer.clip",
            "LARC clipping applies to optimizer.kind = \"lars\" only",
        )?;
        check(
            (0.0..1.0).contains(&o.beta1),
            "optimizer.beta1",
            "must be in [0, 1)",
        )?;
        check(
            (0.0..1.0).contains(&o.beta2),
            "optimizer.beta2",
            "must be in [0, 1)",
        )?;
        check_positive(o.adam_eps, "optimizer.adam_eps")?;
        check(
            s.power.is_finite() && s.power > 0.0,
            "schedule.power",
            "must be > 0",
        )?;
        check(
            s.step_every >= 1,
            "schedule.step_every",
            "must be at least 1",
        )?;
        check(
            s.gamma > 0.0 && s.gamma <= 1.0,
            "schedule.gamma",
            "must be in (0, 1]",
        )?;
        check(t.steps >= 1, "train.steps", "must be at least 1")?;
        check(t.log_every >= 1, "train.log_every", "must be at least 1")?;
        check(t.eval_every >= 1, "train.eval_every", "must be at least 1")?;
        check(
            t.keep_checkpoints >= 1,
            "train.keep_checkpoints",
            "must be at least 1",
        )?;
        self.check_sweep_table()?;
        let v = &self.divergence;
        check(
            v.loss_factor == 0.0 || (v.loss_factor.is_finite() && v.loss_factor > 1.0),
            "divergence.loss_factor",
            "must be 0 (off) or > 1",
        )?;
        check(
            v.grad_factor == 0.0 || (v.grad_factor.is_finite() && v.grad_factor > 1.0),
            "divergence.grad_factor",
            "must be 0 (off) or > 1",
        )?;
        check(
            v.loss_min_rise.is_finite() && v.loss_min_rise >= 0.0,
            "divergence.loss_min_rise",
            "must be ≥ 0",
        )?;
        check(v.patience >= 1, "divergence.patience", "must be at least 1")?;
        check(
            (0.0..1.0).contains(&v.smoothing),
            "divergence.smoothing",
            "must be in [0, 1)",
        )?;
        check(
            v.grad_window >= 1,
            "divergence.grad_window",
            "must be at least 1",
        )?;
        for (value, key) in [
            (v.explosion_factor, "divergence.explosion_factor"),
            (v.runaway_factor, "divergence.runaway_factor"),
        ] {
            check(
                value == 0.0 || (value.is_finite() && value > 1.0),
                key,
                "must be 0 (off) or > 1",
            )?;
        }
        check(
            v.dead_ratio.is_finite() && (0.0..1.0).contains(&v.dead_ratio),
            "divergence.dead_ratio",
            "must be in [0, 1); 0 is off",
        )?;
        check(
            v.layer_band.is_finite() && v.layer_band > 1.0,
            "divergence.layer_band",
            "must be > 1",
        )?;
        for (value, key) in [
            (v.early_steps, "divergence.early_steps"),
            (v.fast_patience, "divergence.fast_patience"),
            (v.snapshot_every, "divergence.snapshot_every"),
            (v.snapshots as u64, "divergence.snapshots"),
        ] {
            check(value >= 1, key, "must be at least 1")?;
        }
        Ok(())
    }

    /// A `[sweep]` table that `larslab sweep` could expand: every grid entry
    /// a non-empty list of distinct values under a config key, no grid
    /// entry for `seed` or `name`, distinct seeds. (A value of the wrong type
    /// is left to its run, which fails alone.)
    fn check_sweep_table(&self) -> Result<(), UserError> {
        let base = toml::Table::try_from(self).expect("a Config always serialises to a table");
        for (key, values) in &self.sweep.grid {
            let at = format!("sweep.grid.{key}");
            match key.as_str() {
                "seed" => {
                    return Err(UserError::key(
                        at,
                        "seeds are a sweep's own axis: give them as sweep.seeds (or --seeds)",
                    ));
                }
                "name" => return Err(UserError::key(at, "a sweep names its runs itself")),
                _ if key.starts_with("sweep.") => {
                    return Err(UserError::key(at, "a grid cannot vary the sweep itself"));
                }
                _ => {}
            }
            let toml::Value::Array(values) = values else {
                return Err(UserError::key(at, "must be a list of values"));
            };
            check(!values.is_empty(), &at, "must list at least one value")?;
            if let Some(twice) = first_repeat(values) {
                return Err(UserError::key(
                    at,
                    format!("lists the value {twice} twice (it would run twice)"),
                ));
            }
            for value in values {
                let mut table = base.clone();
                let unknown = match set_dotted(&mut table, key, value.clone()) {
                    Err(e) => Some(e.to_string()),
                    Ok(()) => match from_table(table) {
                        Err(UserError::ConfigKey { key: k, message })
                            if message.starts_with("unknown field") =>
                        {
                            Some(format!("`{k}` is not a config key"))
                        }
                        _ => None,
                    },
                };
                if let Some(why) = unknown {
                    return Err(UserError::key(at, why));
                }
            }
        }
        if let Some(twice) = first_repeat(&self.sweep.seeds) {
            return Err(UserError::key(
                "sweep.seeds",
                format!("lists seed {twice} twice"),
            ));
        }
        Ok(())
    }

    /// Every leaf of the config as a dotted key and its value, in file order
    /// (`divergence.rescue`'s overrides are left out: they are not settings of this run).
    pub fn flatten(&self) -> Vec<(String, toml::Value)> {
        let mut table = toml::Table::try_from(self).expect("a Config always serialises to a table");
        if let Some(toml::Value::Table(divergence)) = table.get_mut("divergence") {
            divergence.remove("rescue");
        }
        table.remove("sweep");
        let mut out = Vec::new();
        flatten_table("", &table, &mut out);
        out
    }

    /// Makes every path absolute (relative paths are taken from the current
    /// directory), so that the written `config.toml` reproduces the run from anywhere.
    fn resolve_paths(&mut self) -> Result<(), UserError> {
        let cwd = std::env::current_dir()
            .map_err(|e| UserError::Usage(format!("cannot read the current directory: {e}")))?;
        for path in [
            &mut self.data.images,
            &mut self.data.labels,
            &mut self.data.dir,
            &mut self.data.test_images,
            &mut self.data.test_labels,
            &mut self.model.init_from,
        ]
        .into_iter()
        .flatten()
        {
            if path.is_relative() {
                *path = cwd.join(&*path);
            }
        }
        Ok(())
    }
}

/// Limits on sizes, so that an absurd value is a config error, not an out-of-memory abort.
const MAX_SAMPLES: usize = 100_000_000;
const MAX_WIDTH: usize = 1_000_000;
const MAX_LAYER_WEIGHTS: usize = 1 << 30;
const MAX_KERNEL: usize = 64;
const MAX_DATA_VALUES: usize = 1 << 32;

/// The `[optimizer]` keys that only some kinds use (the others apply to every kind).
/// LAMB takes neither `trust_coefficient` nor `eps`: optax.lamb has no trust
/// coefficient and its only eps is Adam's (`adam_eps`).
const OPTIMIZER_KEYS: &[(&str, &[OptimizerKind])] = {
    use OptimizerKind::{Adamw, Lamb, Lars, Sgd};
    &[
        ("momentum", &[Sgd, Lars]),
        ("nesterov", &[Sgd, Lars]),
        ("trust_coefficient", &[Lars]),
        ("eps", &[Lars]),
        ("denominator", &[Lars]),
        ("clip", &[Lars]),
        ("exclude_1d", &[Lars, Lamb, Adamw]),
        ("beta1", &[Lamb, Adamw]),
        ("beta2", &[Lamb, Adamw]),
        ("adam_eps", &[Lamb, Adamw]),
    ]
};

/// The `[model]` keys that only convolutional models use.
const MODEL_KEYS: &[(&str, &[ModelKind])] = &[
    ("conv", &[ModelKind::Cnn]),
    ("batch_norm", &[ModelKind::Cnn]),
    ("pool", &[ModelKind::Cnn]),
    ("padding", &[ModelKind::Cnn]),
];

/// The largest config file read: a config is a page of text, and a device
/// (`/dev/zero`) or a wrong path to a data file must not be read whole.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a config file as UTF-8 text, at most [`MAX_CONFIG_BYTES`].
fn read_config_text(path: &Path) -> Result<String, UserError> {
    use std::io::Read;
    let fail = |message: String| UserError::ConfigFile {
        source_name: path.display().to_string(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    if file.metadata().is_ok_and(|m| m.is_dir()) {
        return Err(fail("cannot read: is a directory".into()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(fail(format!(
            "larger than {} MiB: not a config file",
            MAX_CONFIG_BYTES >> 20
        )));
    }
    if bytes.starts_with(&[0xFF, 0xFE]) || bytes.starts_with(&[0xFE, 0xFF]) {
        return Err(fail(
            "is UTF-16 text; a config must be UTF-8 (save it as UTF-8)".into(),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        fail(format!(
            "line {line}: byte 0x{:02X} is not UTF-8 (Latin-1 or another encoding?); a config must be UTF-8",
            bytes[at]
        ))
    })
}

/// The first value that occurs twice in `values`, shown as TOML.
pub fn first_repeat<T: PartialEq + std::fmt::Display>(values: &[T]) -> Option<String> {
    values
        .iter()
        .enumerate()
        .find(|(i, v)| values[..*i].contains(v))
        .map(|(_, v)| v.to_string())
}

/// The `kind` a layer's table gives a section, if it gives one that parses.
fn kind_in<K: serde::de::DeserializeOwned>(table: &toml::Table, section: &str) -> Option<K> {
    match table.get(section)? {
        toml::Value::Table(inner) => inner.get("kind")?.clone().try_into().ok(),
        _ => None,
    }
}

/// The built-in experiment that `larslab train` runs without `--config`.
pub const DEFAULT_EXPERIMENT: &str = include_str!("../experiments/default.toml");

fn check(ok: bool, key: &str, message: &str) -> Result<(), UserError> {
    if ok {
        Ok(())
    } else {
        Err(UserError::key(key, message))
    }
}

fn check_positive(value: f64, key: &str) -> Result<(), UserError> {
    check(value.is_finite() && value > 0.0, key, "must be > 0")
}

fn parse_table(text: &str, source: &Source) -> Result<toml::Table, UserError> {
    text.parse::<toml::Table>()
        .map_err(|e| UserError::ConfigFile {
            source_name: match e.span() {
                Some(span) => format!("{}: line {}", source.describe(), line_of(text, span.start)),
                None => source.describe(),
            },
            message: out_of_range(e.message().trim()),
        })
}

/// toml's message for an integer past 64 bits names its own i128 parse;
/// the user needs to hear that the number is too large.
fn out_of_range(message: &str) -> String {
    match message.strip_prefix("invalid type: integer `") {
        Some(rest) if rest.contains("` as i128") => format!(
            "integer {} is out of range (TOML integers are 64-bit: at most {})",
            rest.split('`').next().unwrap_or_default(),
            i64::MAX
        ),
        _ => message.to_string(),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// A table with its keys sorted at every level.
fn sorted(table: &toml::Table) -> toml::Table {
    let mut entries: Vec<(&String, &toml::Value)> = table.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                toml::Value::Table(inner) => toml::Value::Table(sorted(inner)),
                other => other.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

/// Types a table, reporting the first bad value under its dotted key. The
/// free-form tables (`divergence.rescue`, `sweep.grid`) come out with their
/// keys sorted, as they always iterated (toml keeps insertion order only so
/// that `to_toml` can write the struct's order).
fn from_table(table: toml::Table) -> Result<Config, UserError> {
    from_table_unsorted(table).map(|mut config| {
        config.divergence.rescue = sorted(&config.divergence.rescue);
        config.sweep.grid = sorted(&config.sweep.grid);
        config
    })
}

fn from_table_unsorted(table: toml::Table) -> Result<Config, UserError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().message().trim().to_string();
        // Name an unknown key itself, not only the table it sits in.
        let key = match unknown_field(&message) {
            Some(field) if path == "." => field.to_string(),
            Some(field) if !path.ends_with(field) => format!("{path}.{field}"),
            _ => path,
        };
        UserError::key(key, message)
    })
}

fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// Every leaf of `table` as a dotted key and its value, keys sorted.
pub fn dotted(table: &toml::Table) -> Vec<(String, toml::Value)> {
    let mut out = Vec::new();
    flatten_table("", table, &mut out);
    out
}

/// Every leaf of `table` as a dotted key (a key may itself hold dots, e.g.
/// `"optimizer.kind"`), keys sorted at every level (the order compare's
/// columns and the hparams have always had).
fn flatten_table(prefix: &str, table: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
    let mut entries: Vec<(&String, &toml::Value)> = table.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    for (key, value) in entries {
        let key = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(inner) => flatten_table(&key, inner, out),
            leaf => out.push((key, leaf.clone())),
        }
    }
}

/// Parses the value of a `--set` or a grid entry: a TOML value, or a bare word taken as a string.
pub fn parse_value(text: &str) -> toml::Value {
    match format!("v = {text}").parse::<toml::Table>() {
        Ok(mut table) => table.remove("v").expect("the key was just written"),
        Err(_) => toml::Value::String(text.to_string()),
    }
}

/// Applies one `KEY=VALUE` assignment with a dotted key to a config table.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), UserError> {
    let Some((key, value)) = assignment.split_once('=') else {
        return Err(UserError::Usage(format!(
            "--set `{assignment}`: expected KEY=VALUE, e.g. optimizer.lr=0.1"
        )));
    };
    let key = key.trim();
    if key.split('.').any(|p| p.is_empty()) {
        return Err(UserError::Usage(format!(
            "--set `{assignment}`: `{key}` is not a dotted config key"
        )));
    }
    let value = value.trim();
    let parsed = parse_value(value);
    if matches!(parsed, toml::Value::String(_)) && looks_numeric(value) {
        return Err(UserError::key(
            key,
            format!(
                "`{value}` is not a TOML number: out of range (integers are 64-bit, at most {}; floats are f64) or malformed (leading zeros); quote it for a string",
                i64::MAX
            ),
        ));
    }
    set_dotted(table, key, parsed)
}

/// Text that reads as a number (digits, an optional sign, point and exponent)
/// although TOML could not take it: a number out of range, not a word.
fn looks_numeric(text: &str) -> bool {
    static NUMBER: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"^[+-]?[0-9][0-9_]*(\.[0-9_]+)?([eE][+-]?[0-9_]+)?$")
            .expect("a valid pattern")
    });
    NUMBER.is_match(text)
}

/// Sets the value at a dotted key, creating the tables on the way.
fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), UserError> {
    let parts: Vec<&str> = key.split('.').collect();
    let (last, parents) = parts.split_last().expect("split never yields nothing");
    let mut node = table;
    for (depth, part) in parents.iter().enumerate() {
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = match entry {
            toml::Value::Table(inner) => inner,
            _ => {
                return Err(UserError::key(
                    parts[..=depth].join("."),
                    "is a value, not a table of keys",
                ));
            }
        };
    }
    node.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_experiment_is_valid() {
        let config = Config::load(None, &[]).unwrap();
        assert_eq!(config.name, "default");
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let config = from_table(toml::Table::new()).unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn written_config_reads_back_identically() {
        let config = Config::load(None, &["model.hidden=[3,4]".into()]).unwrap();
        let again = from_table(config.to_toml().parse().unwrap()).unwrap();
        assert_eq!(config, again);
    }

    #[test]
    fn values_parse_as_toml_or_bare_strings() {
        assert_eq!(parse_value("0.5"), toml::Value::Float(0.5));
        assert_eq!(parse_value("3"), toml::Value::Integer(3));
        assert_eq!(parse_value("true"), toml::Value::Boolean(true));
        assert_eq!(parse_value("tanh"), toml::Value::String("tanh".into()));
        assert_eq!(parse_value("\"tanh\""), toml::Value::String("tanh".into()));
        assert_eq!(
            parse_value("[256, 256]"),
            toml::Value::Array(vec![256.into(), 256.into()])
        );
    }

    #[test]
    fn overrides_reach_nested_keys() {
        let config = Config::load(
            None,
            &[
                "optimizer.lr=0.5".into(),
                "model.hidden=[]".into(),
                "model.activation=tanh".into(),
                "seed=7".into(),
            ],
        )
        .unwrap();
        assert_eq!(config.optimizer.lr, 0.5);
        assert!(config.model.hidden.is_empty());
        assert_eq!(config.model.activation, Activation::Tanh);
        assert_eq!(config.seed, 7);
    }

    fn rejected_key(assignment: &str) -> String {
        match Config::load(None, &[assignment.to_string()]) {
            Err(UserError::ConfigKey { key, .. }) => key,
            other => panic!("{assignment}: expected a config key error, got {other:?}"),
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        for (assignment, key) in [
            ("optimizer.lr=0", "optimizer.lr"),
            ("optimizer.lr=-1", "optimizer.lr"),
            ("optimizer.lr=nan", "optimizer.lr"),
            ("optimizer.lr=fast", "optimizer.lr"),
            ("optimizer.momentum=1", "optimizer.momentum"),
            ("optimizer.weight_decay=-0.1", "optimizer.weight_decay"),
            ("optimizer.kind=rmsprop", "optimizer.kind"),
            (
                "optimizer.trust_coefficient=0",
                "optimizer.trust_coefficient",
            ),
            ("optimizer.eps=-1e-9", "optimizer.eps"),
            ("optimizer.denominator=optax", "optimizer.denominator"),
            ("optimizer.clip=true", "optimizer.clip"),
            ("optimizer.beta2=1", "optimizer.beta2"),
            ("optimizer.adam_eps=0", "optimizer.adam_eps"),
            ("data.batch_size=0", "data.batch_size"),
            ("data.batch_size=-3", "data.batch_size"),
            ("data.val_fraction=1", "data.val_fraction"),
            ("data.kind=idx", "data.images"),
            ("model.dropout=1", "model.dropout"),
            ("model.dropout=-0.1", "model.dropout"),
            ("model.activation=swish", "model.activation"),
            ("model.init=glorot", "model.init"),
            ("model.hidden=[0]", "model.hidden"),
            ("model.hidden=[100000000]", "model.hidden"),
            ("model.hidden=[100000,100000]", "model.hidden"),
            ("data.n_train=1000000000000", "data.n_train"),
            (
                "data.teacher_hidden=[9223372036854775807]",
                "data.teacher_hidden",
            ),
            ("model.init_scale=1e39", "model.init_scale"),
            ("model.hidden=3", "model.hidden"),
            ("model.hiden=[3]", "model.hiden"),
            ("colour=1", "colour"),
            ("train.steps=0", "train.steps"),
            ("schedule.kind=linear", "schedule.kind"),
            ("name=a/b", "name"),
        ] {
            assert_eq!(rejected_key(assignment), key, "{assignment}");
        }
    }

    /// Every float key refuses NaN and both infinities, from `--set` (and so from a file).
    #[test]
    fn every_float_key_refuses_nan_and_infinity() {
        let floats: Vec<String> = Config::default()
            .flatten()
            .into_iter()
            .filter(|(_, v)| matches!(v, toml::Value::Float(_)))
            .map(|(k, _)| k)
            .collect();
        assert!(floats.len() >= 19, "{floats:?}");
        for key in &floats {
            for value in ["nan", "inf", "-inf", "1e300"] {
                if value == "1e300" && key.starts_with("divergence.") {
                    continue; // large finite factors are legal there
                }
                let assignment = format!("{key}={value}");
                match Config::load(None, std::slice::from_ref(&assignment)) {
                    Err(UserError::ConfigKey { key: k, .. }) => assert_eq!(&k, key, "{assignment}"),
                    Err(other) if value == "1e300" => panic!("{assignment}: {other}"),
                    Ok(_) if value == "1e300" => {}
                    other => panic!("{assignment}: expected a config key error, got {other:?}"),
                }
            }
        }
        // Finite in f64, infinite in the model's f32.
        assert_eq!(rejected_key("model.bias_init=1e300"), "model.bias_init");
    }

    fn rejected_message(file: &str, assignments: &[&str]) -> (String, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, file).unwrap();
        let overrides: Vec<String> = assignments.iter().map(|a| a.to_string()).collect();
        match Config::load(Some(&path), &overrides) {
            Err(UserError::ConfigKey { key, message }) => (key, message),
            other => panic!("{file} {assignments:?}: expected a config key error, got {other:?}"),
        }
    }

    #[test]
    fn keys_that_do_not_apply_to_the_kind_are_errors_naming_key_and_kind() {
        for (file, set, key, kind) in [
            (
                "[optimizer]\nkind = 'adamw'\nmomentum = 0.5\n",
                "",
                "optimizer.momentum",
                "adamw",
            ),
            (
                "",
                "optimizer.kind=adamw,optimizer.nesterov=true",
                "optimizer.nesterov",
                "adamw",
            ),
            (
                "[optimizer]\nkind = 'lamb'\n",
                "optimizer.trust_coefficient=0.01",
                "optimizer.trust_coefficient",
                "lamb",
            ),
            (
                "[optimizer]\nkind = 'lamb'\neps = 1e-6\n",
                "",
                "optimizer.eps",
                "lamb",
            ),
            (
                "[optimizer]\nkind = 'sgd'\nexclude_1d = false\n",
                "",
                "optimizer.exclude_1d",
                "sgd",
            ),
            (
                "[optimizer]\nkind = 'lars'\nbeta1 = 0.8\n",
                "",
                "optimizer.beta1",
                "lars",
            ),
            ("", "optimizer.adam_eps=1e-6", "optimizer.adam_eps", "sgd"),
            ("[model]\nconv = [[8, 5]]\n", "", "model.conv", "mlp"),
            (
                "[model]\nbatch_norm = false\n",
                "",
                "model.batch_norm",
                "mlp",
            ),
            ("", "model.pool=avg", "model.pool", "mlp"),
            ("[model]\npadding = 'valid'\n", "", "model.padding", "mlp"),
            // The file sets momentum for its own sgd; `--set` switching to adamw
            // leaves it quiet, but `--set` giving it again with adamw does not.
            (
                "[optimizer]\nmomentum = 0.5\n",
                "optimizer.kind=adamw,optimizer.momentum=0.5",
                "optimizer.momentum",
                "adamw",
            ),
        ] {
            let set: Vec<&str> = set.split(',').filter(|a| !a.is_empty()).collect();
            let (got, message) = rejected_message(file, &set);
            assert_eq!(got, key, "{file} {set:?}");
            assert!(message.contains(&format!("kind = \"{kind}\"")), "{message}");
        }
        assert_eq!(
            rejected_key(
                "divergence.rescue={\"optimizer.kind\" = \"adamw\", \"optimizer.momentum\" = 0.1}"
            ),
            "divergence.rescue: optimizer.momentum"
        );
    }

    #[test]
    fn keys_for_a_kind_the_config_can_reach_are_accepted() {
        let load = |file: &str, set: &[&str]| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.toml");
            std::fs::write(&path, file).unwrap();
            let set: Vec<String> = set.iter().map(|a| a.to_string()).collect();
            Config::load(Some(&path), &set).unwrap_or_else(|e| panic!("{file} {set:?}: {e}"))
        };
        // The file's kind, switched by --set: the file's LARS keys stay quiet.
        load(
            "[optimizer]\nkind = 'lars'\ntrust_coefficient = 0.01\n",
            &["optimizer.kind=sgd"],
        );
        load(
            "[model]\nkind = 'cnn'\nconv = [[4, 3]]\npool = 'avg'\n",
            &["model.kind=mlp"],
        );
        // A rescue that switches to lars, and a grid over kinds.
        load(
            "[optimizer]\ntrust_coefficient = 0.01\n[divergence.rescue]\n\"optimizer.kind\" = 'lars'\n",
            &[],
        );
        load(
            "[optimizer]\nclip = false\n[sweep]\ngrid = { \"optimizer.kind\" = ['sgd', 'lars'] }\n",
            &[],
        );
        let config = load("[optimizer]\nkind = 'adamw'\n", &[]);
        let written = config.to_toml();
        assert!(!written.contains("momentum") && !written.contains("trust_coefficient"));
        assert!(
            written.contains("beta1") && !written.contains("\npool"),
            "{written}"
        );
    }

    /// A run's config.toml written before keys that do not apply were left
    /// out (every key) still serves resume, rescue and compare.
    #[test]
    fn an_older_run_config_with_every_key_loads_as_a_run_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, toml::to_string_pretty(&Config::default()).unwrap()).unwrap();
        assert!(matches!(
            Config::load(Some(&path), &[]),
            Err(UserError::ConfigKey { .. })
        ));
        let config = Config::load_run(&path, &[]).unwrap();
        assert_eq!(config, Config::default());
        // Its --set overrides are checked as ever.
        assert!(Config::load_run(&path, &["optimizer.beta1=0.5".into()]).is_err());
    }

    /// Every experiment loads, and the config.toml its run writes loads again to the same text.
    #[test]
    fn every_experiment_and_its_written_config_load() {
        let dir = tempfile::tempdir().unwrap();
        let experiments = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
        let mut seen = 0;
        for entry in std::fs::read_dir(experiments).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let config = Config::load(Some(&path), &[])
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let written = dir.path().join("config.toml");
            std::fs::write(&written, config.to_toml()).unwrap();
            let again = Config::load(Some(&written), &[])
                .unwrap_or_else(|e| panic!("{}'s written config: {e}", path.display()));
            assert_eq!(again.to_toml(), config.to_toml(), "{}", path.display());
            seen += 1;
        }
        assert!(seen >= 8);
    }

    #[test]
    fn config_files_that_are_not_configs_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let message = |path: &Path| match Config::load(Some(path), &[]) {
            Err(e @ UserError::ConfigFile { .. }) => e.to_string(),
            other => panic!(
                "{}: expected a config file error, got {other:?}",
                path.display()
            ),
        };
        assert!(message(Path::new("/dev/zero")).contains("larger than 1 MiB"));
        let utf16 = dir.path().join("utf16.toml");
        std::fs::write(&utf16, [0xFF, 0xFE, b's', 0, b'=', 0, b'1', 0]).unwrap();
        assert!(message(&utf16).contains("UTF-16"));
        let latin1 = dir.path().join("latin1.toml");
        std::fs::write(&latin1, b"seed = 1\nname = \"caf\xe9\"\n").unwrap();
        assert!(message(&latin1).contains("line 2: byte 0xE9 is not UTF-8"));
        let big = dir.path().join("big.toml");
        std::fs::write(&big, "seed = 99999999999999999999\n").unwrap();
        assert!(message(&big).contains("integer 99999999999999999999 is out of range"));
        match Config::load(None, &["seed=99999999999999999999".into()]) {
            Err(UserError::ConfigKey { key, message }) => {
                assert_eq!(key, "seed");
                assert!(message.contains("out of range"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // A word stays a string.
        assert_eq!(rejected_key("train.steps=many"), "train.steps");
    }

    #[test]
    fn train_validates_the_sweep_table() {
        for (grid, needle) in [
            ("grid = { \"optimizer.lr\" = 0.1 }", "must be a list"),
            ("grid = { \"optimizer.lr\" = [] }", "at least one value"),
            (
                "grid = { \"optimizer.lr\" = [0.1, 0.1] }",
                "lists the value 0.1 twice",
            ),
            (
                "grid = { \"optimizer.lrr\" = [0.1] }",
                "`optimizer.lrr` is not a config key",
            ),
            ("grid = { seed = [1, 2] }", "sweep.seeds"),
            ("seeds = [1, 1]", "seed 1 twice"),
        ] {
            let (key, message) = rejected_message(&format!("[sweep]\n{grid}\n"), &[]);
            assert!(key.starts_with("sweep."), "{grid}: {key}");
            assert!(message.contains(needle), "{grid}: {message}");
        }
        // A bad value (not a bad key) is left to its own run.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[sweep]\ngrid = { \"optimizer.lr\" = [0.1, -1] }\n").unwrap();
        Config::load(Some(&path), &[]).unwrap();
    }

    #[test]
    fn rescue_overrides_apply_and_are_validated() {
        let config = Config::load(
            None,
            &[
                "divergence.rescue={\"optimizer.kind\" = \"lars\", optimizer = { clip = true }}"
                    .into(),
            ],
        )
        .unwrap();
        let rescued = config.rescued().unwrap();
        assert_eq!(rescued.optimizer.kind, OptimizerKind::Lars);
        assert!(rescued.optimizer.clip);
        assert_eq!(
            rejected_key("divergence.rescue={\"optimizer.lr\" = -1}"),
            "divergence.rescue: optimizer.lr"
        );
        assert_eq!(
            rejected_key("divergence.rescue={\"optimizer.colour\" = 1}"),
            "divergence.rescue: optimizer.colour"
        );
    }

    #[test]
    fn override_into_a_value_is_rejected() {
        assert_eq!(rejected_key("seed.x=1"), "seed");
    }

    #[test]
    fn malformed_assignment_is_a_usage_error() {
        assert!(matches!(
            Config::load(None, &["optimizer.lr".into()]),
            Err(UserError::Usage(_))
        ));
        assert!(matches!(
            Config::load(None, &["optimizer..lr=1".into()]),
            Err(UserError::Usage(_))
        ));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = parse_table("seed = 1\n[model\n", &Source::BuiltIn).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
