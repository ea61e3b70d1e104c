//! The training loop: batch → forward → loss → backward → detect → measure → step → log.
//!
//! Steps are numbered by the updates made before them: at step t the
//! parameters are θ_t (t updates done). The training metrics of step t are
//! those of update t (its batch loss, its gradients, the norms of θ_t and of
//! the step taken); an evaluation at step t evaluates θ_t. The final
//! evaluation and checkpoint are at step `train.steps`.
//!
//! Everything that changes as training goes lives in the [`Trainer`] and is
//! saved in every checkpoint, so a run resumed from one continues exactly.

pub mod eval;
pub mod step;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Checkpoint};
use crate::config::{Config, DivergenceAction, OptimizerKind};
use crate::data::{self, Batcher, BatcherState, Dataset};
use crate::device;
use crate::diagnostics::{layer_stats, spectra};
use crate::divergence::{Detector, DetectorState, Verdict};
use crate::error::UserError;
use crate::model::Model;
use crate::optim::Optimizer;
use crate::optim::schedule::Schedule;
use crate::rng::{self, Rng, RngState, Stream};
use crate::run_dir::{self, RunDir};
use crate::sinks::console::Console;
use crate::sinks::jsonl::JsonlSink;
use crate::sinks::tensorboard::TensorBoardSink;
use crate::sinks::{Record, Sinks};
use eval::{BestSoFar, evaluate, loss_and_accuracy};
use step::{Probe, apply_update, forward_backward, global_grad_norm, record_batch};

/// How a run ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    #[default]
    Finished,
    Diverged,
    Interrupted,
}

/// Where a rescue run came from, and whether it recovered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rescue {
    /// The diverged run's directory.
    pub from_run: String,
    /// The checkpoint it started from, the last one before the divergence's onset.
    pub from_step: u64,
    /// The settings changed for the rescue.
    pub overrides: Vec<String>,
    /// The diverged run's best smoothed training loss up to that checkpoint.
    pub best_smoothed_loss_before: Option<f64>,
    /// The step at which the smoothed loss came back under that best (within `divergence.recover_within`).
    pub back_under_best_at_step: Option<u64>,
    /// Back under the best in time, and the run finished without diverging.
    pub recovered: bool,
}

/// What a run reports in `summary.json`. Fields missing from an older
/// summary read as their defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Summary {
    pub name: String,
    pub status: Status,
    /// The last step reached (updates made, counted from the start of the first run).
    pub steps: u64,
    /// The step this process started at (0, or a checkpoint's step for resumed and rescue runs).
    pub start_step: u64,
    pub diverged: bool,
    pub diverged_at_step: Option<u64>,
    /// The best (lowest) smoothed training loss the run reached.
    pub best_smoothed_train_loss: Option<f64>,
    /// Which rule fired, when, and where its streak began.
    pub divergence: Option<Verdict>,
    /// The training batch loss at the last step made.
    pub final_train_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub final_val_accuracy: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub best_val_accuracy: Option<f64>,
    pub best_val_accuracy_step: Option<u64>,
    /// On the test split (`data.test_images`, or `data.n_test` generated digits), once at the end.
    pub test_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
    pub wall_seconds: f64,
    pub samples_per_second: f64,
    pub parameters: usize,
    pub train_samples: usize,
    pub val_samples: usize,
    pub classes: usize,
    pub batch_size: usize,
    /// Set for a rescue run.
    pub rescue: Option<Rescue>,
}

/// Everything besides tensors that a checkpoint holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingState {
    pub step: u64,
    pub optimizer_kind: OptimizerKind,
    pub batcher: BatcherState,
    pub dropout_rng: RngState,
    pub detector: DetectorState,
    pub best: BestSoFar,
    pub final_train_loss: Option<f64>,
    pub divergence: Option<Verdict>,
    pub rescue: Option<Rescue>,
}

/// How to run: quietly or not, and the flag a signal handler raises.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub quiet: bool,
    pub interrupt: Option<Arc<AtomicBool>>,
}

/// A run in progress: built and checked before its directory exists, so that
/// bad data or a bad init file leaves nothing behind.
pub struct Trainer {
    config: Config,
    device: Device,
    data: data::Splits,
    model: Model,
    optimizer: Optimizer,
    batcher: Batcher,
    dropout_rng: Rng,
    detector: Detector,
    step: u64,
    start_step: u64,
    best: BestSoFar,
    final_train_loss: Option<f64>,
    divergence: Option<Verdict>,
    rescue: Option<Rescue>,
}

impl Trainer {
    /// A fresh run at step 0.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let device = device::select(config.device)?;
        let data = data::load(config)?;
        let model = Model::for_data(config, &data, &device)?;
        let batcher = Batcher::new(
            data.train.len(),
            config.data.batch_size,
            config.data.shuffle,
            config.seed,
        );
        Ok(Self {
            optimizer: Optimizer::new(&config.optimizer),
            dropout_rng: rng::stream(config.seed, Stream::Dropout),
            detector: Detector::new(&config.divergence, DetectorState::default()),
            config: config.clone(),
            device,
            data,
            model,
            batcher,
            step: 0,
            start_step: 0,
            best: BestSoFar::default(),
            final_train_loss: None,
            divergence: None,
            rescue: None,
        })
    }

    /// Continues from the checkpoint of `step` in `checkpoints`: parameters,
    /// data order, generators and detector always; the optimizer's state
    /// (momentum, Adam moments) when `config` keeps the checkpoint's optimizer
    /// kind, else the optimizer starts afresh.
    pub fn resume(
        config: &Config,
        checkpoints: &std::path::Path,
        step: u64,
    ) -> anyhow::Result<Self> {
        let mut trainer = Self::new(config)?;
        let ckpt: Checkpoint<TrainingState> = checkpoint::load(checkpoints, step, &trainer.device)?;
        let params_file = checkpoint::params_path(checkpoints, step);
        let damaged = |message: String| UserError::data(&params_file, message);
        for param in trainer.model.params().iter().chain(trainer.model.buffers()) {
            let value = ckpt
                .params
                .get(&param.name)
                .ok_or_else(|| damaged(format!("has no `{}`", param.name)))?;
            if value.dims() != param.tensor().dims() {
                return Err(damaged(format!(
                    "`{}` has shape {:?}, the model needs {:?}",
                    param.name,
                    value.dims(),
                    param.tensor().dims()
                ))
                .into());
            }
            param.var.set(value)?;
        }
        let state = ckpt.state;
        if state.optimizer_kind == config.optimizer.kind {
            trainer
                .optimizer
                .restore(trainer.model.params(), &ckpt.optimizer)
                .map_err(damaged)?;
        }
        trainer
            .batcher
            .restore(&state.batcher)
            .ok_or_else(|| damaged("its data order does not fit this data set".into()))?;
        trainer.dropout_rng = state
            .dropout_rng
            .restore()
            .ok_or_else(|| damaged("its dropout generator state is malformed".into()))?;
        trainer.detector = Detector::new(&config.divergence, state.detector);
        trainer.step = state.step;
        trainer.start_step = state.step;
        trainer.best = state.best;
        trainer.final_train_loss = state.final_train_loss;
        trainer.divergence = state.divergence;
        trainer.rescue = state.rescue;
        Ok(trainer)
    }

    /// Marks this run as a rescue of `from_run` (started from its checkpoint
    /// at this step), whose best smoothed loss before diverging was `best_before`.
    pub fn rescuing(
        mut self,
        from_run: &std::path::Path,
        overrides: Vec<String>,
        best_before: Option<f64>,
    ) -> Self {
        self.divergence = None;
        self.rescue = Some(Rescue {
            from_run: from_run.display().to_string(),
            from_step: self.step,
            overrides,
            best_smoothed_loss_before: best_before,
            back_under_best_at_step: None,
            recovered: false,
        });
        self
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// The run's name, for a rescue run written under a new directory.
    pub fn renamed(mut self, name: &str) -> Self {
        self.config.name = name.to_string();
        self
    }

    fn state(&self) -> TrainingState {
        TrainingState {
            step: self.step,
            optimizer_kind: self.config.optimizer.kind,
            batcher: self.batcher.state(),
            dropout_rng: RngState::of(&self.dropout_rng),
            detector: self.detector.state.clone(),
            best: self.best.clone(),
            final_train_loss: self.final_train_loss,
            divergence: self.divergence,
            rescue: self.rescue.clone(),
        }
    }

    fn save_checkpoint(&self, run_dir: &RunDir, final_step: Option<u64>) -> anyhow::Result<()> {
        let dir = run_dir.file(run_dir::CHECKPOINTS);
        let optimizer = self.optimizer.state(self.model.params());
        checkpoint::save(
            &dir,
            self.step,
            &self.model.named_tensors(),
            &optimizer,
            &self.state(),
        )?;
        let protect: Vec<u64> = final_step.into_iter().collect();
        checkpoint::prune(&dir, self.config.train.keep_checkpoints, &protect)
    }

    fn interrupted(options: &RunOptions) -> bool {
        options
            .interrupt
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::SeqCst))
    }

    /// Trains into `run_dir` from the current step to `train.steps`. A run
    /// that starts past step 0 (resumed, or a rescue) appends to the
    /// directory's files, dropping metrics lines from its start step on.
    pub fn run(mut self, run_dir: &RunDir, options: &RunOptions) -> anyhow::Result<Summary> {
        let started = Instant::now();
        let config = self.config.clone();
        let t = &config.train;
        run_dir.write_text(run_dir::CONFIG, &config.to_toml())?;
        let mut sinks = open_sinks(&config, run_dir, self.step)?;
        let mut console = Console::new(options.quiet, t.steps);
        let schedule = Schedule::new(&config.schedule, config.optimizer.lr, t.steps);
        let histogram_every = config.log.histogram_every;
        let spectrum_every = config.diagnostics.spectrum_every;
        self.announce(&console, run_dir);
        if t.checkpoint_every > 0 || config.divergence.action == DivergenceAction::Rescue {
            self.save_checkpoint(run_dir, None)?;
        }

        let mut status = Status::Finished;
        let train_clock = Instant::now();
        while self.step < t.steps {
            if Self::interrupted(options) {
                status = Status::Interrupted;
                console.note(&format!(
                    "interrupted at step {}: writing a checkpoint",
                    self.step
                ));
                break;
            }
            let step = self.step;
            let mut record = Record::new(step);
            if step.is_multiple_of(t.eval_every) {
                evaluate(
                    &self.model,
                    self.data.val.as_ref(),
                    &self.device,
                    &mut record,
                    &mut self.best,
                )?;
                sinks.flush()?;
            }
            let lr = schedule.lr(step);
            let every = |n: u64| n > 0 && step.is_multiple_of(n);
            let probe = Probe {
                measure: step.is_multiple_of(t.log_every),
                histograms: every(histogram_every),
                diagnostics: every(config.diagnostics.every),
            };
            let (x, y) = self
                .data
                .train
                .batch(self.batcher.next_batch(), &self.device)?;
            let g = forward_backward(
                &self.model,
                (&x, &y),
                &mut self.dropout_rng,
                probe.diagnostics,
            )?;
            let grad_norm = match &g.grads {
                Some(_) if self.detector.needs_grad_norm() => {
                    Some(global_grad_norm(&self.model, &g)?)
                }
                _ => None,
            };
            self.final_train_loss = Some(g.loss);
            // A non-finite loss has no gradients: the run cannot go on, whatever the rules say.
            let verdict = self.detector.observe(step, g.loss, grad_norm).or_else(|| {
                (!g.loss.is_finite()).then_some(Verdict {
                    rule: crate::divergence::Rule::NonFiniteLoss,
                    step,
                    onset_step: step,
                })
            });
            if probe.measure || verdict.is_some() {
                record_batch(&mut record, &g, &y, lr)?;
                if let Some(smoothed) = self.detector.smoothed_loss() {
                    record.push("loss/smoothed", smoothed);
                }
                if let Some(norm) = grad_norm {
                    record.push("grad_norm/global", norm);
                }
            }
            self.note_recovery(step);
            if let Some(verdict) = verdict {
                record.push("diverged", 1.0);
                let first = self.divergence.is_none();
                self.divergence.get_or_insert(verdict);
                if first {
                    console.note(&format!(
                        "step {step}: diverging ({:?} since step {}, loss {:.4})",
                        verdict.rule, verdict.onset_step, g.loss
                    ));
                }
                let can_go_on = g.loss.is_finite() && grad_norm.is_none_or(f64::is_finite);
                if config.divergence.action != DivergenceAction::Continue || !can_go_on {
                    sinks.write(&record)?;
                    status = Status::Diverged;
                    break;
                }
            }
            let grads = g.grads.as_ref().expect("a finite loss has gradients");
            if let Some(trace) = &g.trace {
                layer_stats(&self.model, trace, &mut record)?;
            }
            if every(spectrum_every) {
                spectra(self.model.params(), &mut record)?;
            }
            let histograms = apply_update(
                &self.model,
                &mut self.optimizer,
                grads,
                g.grad_norms.as_deref(),
                lr,
                &mut record,
                probe,
            )?;
            sinks.histograms(step, &histograms)?;
            self.step = step + 1;
            if record.values.iter().any(|(_, v)| !v.is_finite()) && record.get("diverged").is_none()
            {
                record.push("diverged", 1.0);
            }
            if !record.is_empty() {
                sinks.write(&record)?;
            }
            let done = self.step - self.start_step;
            let samples_per_sec = done as f64 * self.batcher.batch_size() as f64
                / train_clock.elapsed().as_secs_f64().max(1e-9);
            console.progress(&record, samples_per_sec, false);
            if t.checkpoint_every > 0
                && self.step.is_multiple_of(t.checkpoint_every)
                && self.step < t.steps
            {
                self.save_checkpoint(run_dir, None)?;
            }
        }
        let train_seconds = train_clock.elapsed().as_secs_f64();

        let mut test = None;
        if status == Status::Finished {
            let mut record = Record::new(self.step);
            evaluate(
                &self.model,
                self.data.val.as_ref(),
                &self.device,
                &mut record,
                &mut self.best,
            )?;
            if let Some(data) = &self.data.test {
                let (loss, accuracy) = loss_and_accuracy(&self.model, data, &self.device)?;
                record.push("loss/test", loss);
                record.push("accuracy/test", accuracy);
                test = Some((loss, accuracy));
            }
            if !record.is_empty() {
                sinks.write(&record)?;
            }
        }
        if let Some(rescue) = &mut self.rescue {
            rescue.recovered =
                rescue.back_under_best_at_step.is_some() && status == Status::Finished;
        }
        self.save_checkpoint(run_dir, Some(self.step))?;
        match status {
            Status::Interrupted => sinks.flush()?,
            _ => sinks.finish(status == Status::Diverged)?,
        }
        let summary = self.summary(status, started, train_seconds, test);
        run_dir.write_json(run_dir::SUMMARY, &summary)?;
        Ok(summary)
    }

    /// For a rescue run: the first step at which the smoothed loss is back
    /// under the diverged run's best, if within `divergence.recover_within`.
    fn note_recovery(&mut self, step: u64) {
        let smoothed = self.detector.smoothed_loss();
        let within = self.config.divergence.recover_within;
        if let Some(rescue) = &mut self.rescue
            && rescue.back_under_best_at_step.is_none()
            && step <= rescue.from_step + within
            && let (Some(smoothed), Some(best)) = (smoothed, rescue.best_smoothed_loss_before)
            && smoothed <= best
        {
            rescue.back_under_best_at_step = Some(step);
        }
    }

    fn announce(&self, console: &Console, run_dir: &RunDir) {
        if self.batcher.batch_size() < self.config.data.batch_size {
            console.note(&format!(
                "data.batch_size = {} exceeds the {} training samples: training full-batch",
                self.config.data.batch_size,
                self.data.train.len()
            ));
        }
        let from = match self.step {
            0 => String::new(),
            step => format!(" from step {step}"),
        };
        console.note(&format!(
            "{}: {} ({} parameters), {} train / {} val samples, {} classes{from} -> {}",
            self.config.name,
            self.model.describe(),
            self.parameters(),
            self.data.train.len(),
            self.data.val.as_ref().map_or(0, Dataset::len),
            self.data.classes,
            run_dir.path().display()
        ));
    }

    fn parameters(&self) -> usize {
        self.model
            .params()
            .iter()
            .map(|p| p.tensor().elem_count())
            .sum()
    }

    fn summary(
        &self,
        status: Status,
        started: Instant,
        train_seconds: f64,
        test: Option<(f64, f64)>,
    ) -> Summary {
        let batch_size = self.batcher.batch_size();
        let done = self.step - self.start_step;
        Summary {
            name: self.config.name.clone(),
            status,
            steps: self.step,
            start_step: self.start_step,
            diverged: self.divergence.is_some(),
            diverged_at_step: self.divergence.map(|v| v.step),
            best_smoothed_train_loss: self.detector.state.best_smoothed,
            divergence: self.divergence,
            final_train_loss: self.final_train_loss.filter(|l| l.is_finite()),
            final_val_loss: self.best.last_loss,
            final_val_accuracy: self.best.last_accuracy,
            best_val_loss: self.best.loss,
            best_val_accuracy: self.best.accuracy,
            best_val_accuracy_step: self.best.accuracy_step,
            test_loss: test.map(|t| t.0),
            test_accuracy: test.map(|t| t.1),
            wall_seconds: started.elapsed().as_secs_f64(),
            samples_per_second: done as f64 * batch_size as f64 / train_seconds.max(1e-9),
            parameters: self.parameters(),
            train_samples: self.data.train.len(),
            val_samples: self.data.val.as_ref().map_or(0, Dataset::len),
            classes: self.data.classes,
            batch_size,
            rescue: self.rescue.clone(),
        }
    }
}

/// The newest checkpoint in `checkpoints` taken before step `before` while
/// training was still healthy (see [`Detector::is_healthy`]): where a rescue starts.
pub fn healthy_checkpoint(
    config: &Config,
    checkpoints: &std::path::Path,
    before: u64,
) -> Option<u64> {
    checkpoint::steps(checkpoints)
        .into_iter()
        .rev()
        .filter(|&step| step < before)
        .find(|&step| {
            checkpoint::read_state::<TrainingState>(checkpoints, step)
                .is_some_and(|state| Detector::new(&config.divergence, state.detector).is_healthy())
        })
}

/// metrics.jsonl always (continued from `start_step` when past 0);
/// TensorBoard unless `log.tensorboard = false`.
fn open_sinks(config: &Config, run_dir: &RunDir, start_step: u64) -> anyhow::Result<Sinks> {
    let path = run_dir.file(run_dir::METRICS);
    let jsonl = JsonlSink::continue_at(&path, start_step)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let mut sinks = Sinks(vec![Box::new(jsonl)]);
    if config.log.tensorboard {
        let tensorboard = TensorBoardSink::create(run_dir.path(), config).with_context(|| {
            format!(
                "cannot write TensorBoard events in {}",
                run_dir.path().display()
            )
        })?;
        sinks.0.push(Box::new(tensorboard));
    }
    Ok(sinks)
}
