//! `larslab bench`: training-step throughput of fixed cases.
//!
//! Each case times [`Trainer::train_step`], the very step `larslab train`
//! runs (next batch, forward and backward, the divergence detector, the
//! optimizer, the measurements), on one full batch of generated digits: a
//! warm-up, then the median over several repeats of a block of steps.
//! Achieved GFLOP/s counts [`crate::model::Model::step_flops`] × batch per
//! step, per layer from its shapes: a dense layer's multiply-adds are its
//! weights, a convolution's are output positions × kernel volume × input
//! channels × output channels; each counts 2 FLOPs forward, 2 for ∂W and 2
//! for the δ of its input, which the first layer does not compute.

use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

use crate::config::{
    Config, DataConfig, DataKind, DeviceKind, DivergenceAction, ModelConfig, ModelKind,
    OptimizerConfig, OptimizerKind, ScheduleKind,
};
use crate::error::UserError;
use crate::optim::schedule::Schedule;
use crate::sinks::Record;
use crate::train::step::Measures;
use crate::train::{StepPlan, Trainer};

/// A benchmark case: a model shape and a batch size.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub name: &'static str,
    pub inputs: usize,
    /// Convolutions `[channels, kernel]` on `inputs` as a square image (a CNN), or none (an MLP).
    pub conv: &'static [[usize; 2]],
    pub batch_norm: bool,
    pub hidden: &'static [usize],
    pub classes: usize,
    pub batch: usize,
}

impl Case {
    const fn mlp(name: &'static str, hidden: &'static [usize], batch: usize) -> Self {
        Self {
            name,
            inputs: 784,
            conv: &[],
            batch_norm: false,
            hidden,
            classes: 10,
            batch,
        }
    }

    /// A LeNet-style CNN on 28×28 images: two 5×5 convolutions with
    /// BatchNorm, ReLU and max pooling, a 128-unit head.
    const fn cnn(name: &'static str, batch: usize) -> Self {
        Self {
            name,
            inputs: 784,
            conv: &[[16, 5], [32, 5]],
            batch_norm: true,
            hidden: &[128],
            classes: 10,
            batch,
        }
    }

    fn model_config(&self) -> ModelConfig {
        ModelConfig {
            kind: if self.conv.is_empty() {
                ModelKind::Mlp
            } else {
                ModelKind::Cnn
            },
            conv: self.conv.to_vec(),
            batch_norm: self.batch_norm,
            hidden: self.hidden.to_vec(),
            ..ModelConfig::default()
        }
    }

    /// A run of this case with `kind`: one full batch of generated digits,
    /// a constant rate, no evaluation; the detector on, as in every run (a
    /// verdict does not stop the steps).
    fn config(&self, kind: OptimizerKind) -> std::result::Result<Config, UserError> {
        let mut config = Config {
            name: self.name.into(),
            data: DataConfig {
                kind: DataKind::MnistLike,
                n_train: self.batch,
                n_test: 0,
                val_fraction: 0.0,
                batch_size: self.batch,
                classes: self.classes,
                ..DataConfig::default()
            },
            model: self.model_config(),
            optimizer: OptimizerConfig {
                kind,
                lr: 0.01,
                ..OptimizerConfig::default()
            },
            ..Config::default()
        };
        config.schedule.kind = ScheduleKind::Constant;
        config.schedule.warmup_steps = 0;
        config.divergence.action = DivergenceAction::Continue;
        config.log.tensorboard = false;
        config.validate()?;
        Ok(config)
    }
}

const DEEP30: [usize; 30] = [256; 30];

/// The contract's cases (DESIGN.md), then the CNN's.
pub const CASES: &[Case] = &[
    Case::mlp("mlp-1024-b128", &[1024, 1024], 128),
    Case::mlp("mlp-1024-b1024", &[1024, 1024], 1024),
    Case::mlp("mlp-256-b128", &[256, 256], 128),
    Case::mlp("deep30-b128", &DEEP30, 128),
    Case::cnn("cnn-bn-b128", 128),
    Case::cnn("cnn-bn-b1024", 1024),
];

/// How long to measure.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub warmup_steps: usize,
    pub steps_per_repeat: usize,
    pub repeats: usize,
    /// With measurements on, per-layer measurements every this many steps (the default `train.log_every`).
    pub measure_every: usize,
}

/// One measured configuration: a line of the table, an object of the JSON list.
#[derive(Debug, Clone, Serialize)]
pub struct Result {
    pub case: String,
    pub optimizer: String,
    pub measurements: bool,
    pub batch: usize,
    pub parameters: usize,
    pub steps_per_sec: f64,
    pub ms_per_step: f64,
    pub gflops: f64,
    pub repeats: usize,
    pub steps_per_repeat: usize,
    pub threads: usize,
}

/// Selects cases by name; `None` is all of them.
pub fn select(name: Option<&str>) -> std::result::Result<Vec<Case>, UserError> {
    match name {
        None => Ok(CASES.to_vec()),
        Some(name) => CASES
            .iter()
            .find(|c| c.name == name)
            .map(|c| vec![*c])
            .ok_or_else(|| {
                let names: Vec<_> = CASES.iter().map(|c| c.name).collect();
                UserError::Usage(format!(
                    "--case `{name}`: no such case (cases: {})",
                    names.join(", ")
                ))
            }),
    }
}

/// One configuration under test: a trainer of its own, on one full batch.
struct Setup {
    kind: OptimizerKind,
    measurements: bool,
    trainer: Trainer,
    schedule: Schedule,
    steps_done: usize,
    rates: Vec<f64>,
}

impl Setup {
    fn new(
        case: &Case,
        kind: OptimizerKind,
        measurements: bool,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let mut config = case.config(kind)?;
        config.device = if device.is_cuda() {
            DeviceKind::Cuda
        } else {
            DeviceKind::Cpu
        };
        let trainer = Trainer::new(&config)?;
        Ok(Self {
            kind,
            measurements,
            schedule: trainer.schedule(),
            trainer,
            steps_done: 0,
            rates: Vec::new(),
        })
    }

    fn steps(&mut self, n: usize, measure_every: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            let measure = self.measurements && self.steps_done.is_multiple_of(measure_every);
            let plan = StepPlan {
                evaluate: false,
                measures: Measures {
                    measure,
                    histograms: false,
                    diagnostics: measure,
                },
                spectra: false,
            };
            let mut record = Record::new(self.steps_done as u64);
            self.trainer.train_step(&self.schedule, plan, &mut record)?;
            self.steps_done += 1;
        }
        Ok(())
    }
}

/// Times one case in every configuration. The configurations take turns,
/// one block of steps each per repeat, so that drift in the machine's speed
/// (other load, frequency scaling) reaches all of them alike.
pub fn run(
    case: &Case,
    configurations: &[(OptimizerKind, bool)],
    plan: &Plan,
    device: &Device,
) -> anyhow::Result<Vec<Result>> {
    let mut setups = configurations
        .iter()
        .map(|&(kind, measurements)| Setup::new(case, kind, measurements, device))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for setup in &mut setups {
        setup.steps(plan.warmup_steps, plan.measure_every)?;
    }
    for _ in 0..plan.repeats {
        for setup in &mut setups {
            let start = Instant::now();
            setup.steps(plan.steps_per_repeat, plan.measure_every)?;
            // A GPU queues its kernels: the block ends when the device is done.
            device.synchronize()?;
            setup
                .rates
                .push(plan.steps_per_repeat as f64 / start.elapsed().as_secs_f64());
        }
    }
    Ok(setups
        .into_iter()
        .map(|mut setup| {
            let steps_per_sec = median(&mut setup.rates);
            let parameters = setup.trainer.parameters();
            let flops_per_step = setup.trainer.model().step_flops() as f64 * case.batch as f64;
            Result {
                case: case.name.into(),
                optimizer: format!("{:?}", setup.kind).to_lowercase(),
                measurements: setup.measurements,
                batch: case.batch,
                parameters,
                steps_per_sec,
                ms_per_step: 1000.0 / steps_per_sec,
                gflops: flops_per_step * steps_per_sec / 1e9,
                repeats: plan.repeats,
                steps_per_repeat: plan.steps_per_repeat,
                threads: candle_core::utils::get_num_threads(),
            }
        })
        .collect())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The results as an aligned table, with each configuration's cost relative
/// to plain SGD without measurements on the same case.
pub fn table(results: &[Result]) -> String {
    let mut out = format!(
        "{:<16} {:<9} {:<12} {:>10} {:>9} {:>8} {:>9}\n",
        "case", "optimizer", "measurements", "steps/s", "ms/step", "GFLOP/s", "vs sgd"
    );
    for r in results {
        let baseline = results
            .iter()
            .find(|b| b.case == r.case && b.optimizer == "sgd" && !b.measurements)
            .map_or(String::from("-"), |b| {
                format!("{:+.1}%", 100.0 * (r.ms_per_step / b.ms_per_step - 1.0))
            });
        out.push_str(&format!(
            "{:<16} {:<9} {:<12} {:>10.2} {:>9.2} {:>8.1} {:>9}\n",
            r.case,
            r.optimizer,
            if r.measurements { "on" } else { "off" },
            r.steps_per_sec,
            r.ms_per_step,
            r.gflops,
            baseline
        ));
    }
    out
}
