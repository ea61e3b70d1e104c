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

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Checkpoint};
use crate::config::{Config, DivergenceAction, OptimizerKind, Rung};
use crate::data::{self, Batcher, BatcherState, Dataset};
use crate::device;
use crate::diagnostics::{layer_stats, spectra};
use crate::divergence::{Detector, DetectorState, Observation, Rule, Verdict};
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
use step::{Backward, Measures, apply_update, norm_of, param_grad_norms, record_batch};

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
    /// The rung of the rescue ladder, or `None` for `[divergence.rescue]` or `--set` overrides.
    #[serde(default)]
    pub rung: Option<Rung>,
    /// Whether it started from an in-memory snapshot (else a checkpoint on disk).
    #[serde(default)]
    pub from_snapshot: bool,
    /// The settings changed for the rescue.
    pub overrides: Vec<String>,
    /// Batches passed over unseen before the rescue's first step (`skip_batches`).
    #[serde(default)]
    pub skipped_batches: u64,
    /// The rate warms up again from the rescue's first step over this many steps (0: no).
    #[serde(default)]
    pub rewarm_steps: u64,
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
    /// The rescues tried after this run diverged, in order (written once they ran).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rescued_by: Vec<RescueAttempt>,
}

impl Summary {
    /// The line a person reads when a run in `dir` ends.
    pub fn line(&self, dir: &Path) -> String {
        let percent = |v: Option<f64>| v.map_or("-".into(), |a| format!("{:.1}%", 100.0 * a));
        let outcome = match (&self.divergence, self.status) {
            (_, Status::Interrupted) => format!("interrupted at step {}", self.steps),
            (Some(v), Status::Diverged) => format!("diverged: {}", v.describe()),
            _ => format!("{} steps", self.steps),
        };
        let rescue = self.rescue.as_ref().map_or(String::new(), |r| {
            let rung = r
                .rung
                .map_or(String::new(), |rung| format!(" ({})", rung.name()));
            let result = if r.recovered {
                "recovered"
            } else {
                "not recovered"
            };
            format!(", rescue{rung} from step {}: {result}", r.from_step)
        });
        let test = self.test_accuracy.map_or(String::new(), |a| {
            format!(", test accuracy {}", percent(Some(a)))
        });
        format!(
            "{}: {outcome}, final val accuracy {} (best {}){test}{rescue}, {:.1} s, {:.0} samples/s",
            dir.display(),
            percent(self.final_val_accuracy),
            percent(self.best_val_accuracy),
            self.wall_seconds,
            self.samples_per_second,
        )
    }
}

/// One rescue tried after a divergence, as the diverged run's summary lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RescueAttempt {
    /// The rescue run's directory, a sibling of this run's.
    pub run: String,
    pub rung: Option<Rung>,
    pub from_step: u64,
    pub recovered: bool,
    /// Where the rescue run diverged in turn, if it did.
    pub diverged_at_step: Option<u64>,
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
    /// How each step takes its gradients, chosen with the model.
    backward: Backward,
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
    /// Each parameter's layer, an index into the detector's layers.
    layer_of_param: Vec<usize>,
    /// The newest in-memory states, oldest first (kept when `divergence.action = "rescue"`).
    snapshots: VecDeque<Snapshot>,
    /// The newest states taken while training was healthy, oldest first: a
    /// slow blow-up can outlast the ring above.
    healthy_snapshots: VecDeque<Snapshot>,
}

/// What one step does besides training.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepPlan {
    /// Evaluate on the validation split before the step.
    pub evaluate: bool,
    /// The measurements taken during the step.
    pub measures: Measures,
    /// Singular values of every weight matrix.
    pub spectra: bool,
}

/// How a step ended.
#[derive(Debug, Default)]
pub struct StepDone {
    /// The divergence flagged at this step, in words (the first one only).
    pub diverging: Option<String>,
    /// The run must stop: diverging with `action` other than `continue`, or
    /// nothing left to differentiate. No update was made.
    pub stopped: bool,
    /// Parameter and gradient values for the histograms the plan asked for.
    pub histograms: Vec<(String, Vec<f32>)>,
}

/// A training state held in memory: exactly what a checkpoint holds.
pub type Snapshot = Checkpoint<TrainingState>;

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
        let (layers, layer_of_param) = layers_of(&model);
        Ok(Self {
            optimizer: Optimizer::new(&config.optimizer),
            dropout_rng: rng::stream(config.seed, Stream::Dropout),
            detector: Detector::new(
                &config.divergence,
                DetectorState::default(),
                layers,
                data.classes,
            ),
            layer_of_param,
            snapshots: VecDeque::new(),
            healthy_snapshots: VecDeque::new(),
            config: config.clone(),
            device,
            data,
            backward: Backward::for_model(&model),
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

    /// Continues from the checkpoint of `step` in `checkpoints` (see [`Trainer::restore`]).
    pub fn resume(config: &Config, checkpoints: &Path, step: u64) -> anyhow::Result<Self> {
        let device = device::select(config.device)?;
        let ckpt: Snapshot = checkpoint::load(checkpoints, step, &device)?;
        Self::restore(config, &ckpt, &checkpoint::params_path(checkpoints, step))
    }

    /// Continues from a saved state (`origin` names it in errors): parameters,
    /// data order, generators and detector always; the optimizer's state
    /// (momentum, Adam moments) when `config` keeps the state's optimizer
    /// kind, else the optimizer starts afresh.
    pub fn restore(config: &Config, saved: &Snapshot, origin: &Path) -> anyhow::Result<Self> {
        let mut trainer = Self::new(config)?;
        let damaged = |message: String| UserError::data(origin, message);
        for param in trainer.model.params().iter().chain(trainer.model.buffers()) {
            let value = saved
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
        let state = saved.state.clone();
        if state.optimizer_kind == config.optimizer.kind {
            trainer
                .optimizer
                .restore(trainer.model.params(), &saved.optimizer)
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
        let layers = trainer.detector.layers().to_vec();
        trainer.detector = Detector::new(
            &config.divergence,
            state.detector,
            layers,
            trainer.data.classes,
        );
        trainer.step = state.step;
        trainer.start_step = state.step;
        trainer.best = state.best;
        trainer.final_train_loss = state.final_train_loss;
        trainer.divergence = state.divergence;
        trainer.rescue = state.rescue;
        Ok(trainer)
    }

    /// Marks this run as a rescue of `from_run`, starting at its current
    /// step; `rescue` says how (its `from_step` is filled in here).
    pub fn rescuing(mut self, mut rescue: Rescue) -> Self {
        self.divergence = None;
        rescue.from_step = self.step;
        for _ in 0..rescue.skipped_batches {
            self.batcher.next_batch();
        }
        self.rescue = Some(rescue);
        self
    }

    /// The newest state held in memory that was taken before step `before`
    /// while training was still healthy.
    pub fn healthy_snapshot(&self, before: u64) -> Option<&Snapshot> {
        let healthy =
            |s: &&Snapshot| s.step < before && self.detector_for(&s.state.detector).is_healthy();
        let recent = self.snapshots.iter().rev().find(healthy);
        let older = self.healthy_snapshots.iter().rev().find(healthy);
        recent.into_iter().chain(older).max_by_key(|s| s.step)
    }

    /// The current run's detector configuration over another state.
    fn detector_for(&self, state: &DetectorState) -> Detector {
        Detector::new(
            &self.config.divergence,
            state.clone(),
            self.detector.layers().to_vec(),
            self.data.classes,
        )
    }

    /// Everything mutable, copied: tensors that later steps update in place are not shared.
    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let copied = |tensors: std::collections::HashMap<String, candle_core::Tensor>| {
            tensors
                .into_iter()
                .map(|(name, t)| Ok((name, t.copy()?)))
                .collect::<candle_core::Result<std::collections::HashMap<_, _>>>()
        };
        Ok(Snapshot {
            step: self.step,
            params: copied(self.model.named_tensors())?,
            optimizer: copied(self.optimizer.state(self.model.params()))?,
            state: self.state(),
        })
    }

    /// Keeps a snapshot every `divergence.snapshot_every` steps when the run may be rescued.
    fn keep_snapshot(&mut self) -> anyhow::Result<()> {
        let d = &self.config.divergence;
        if d.action != DivergenceAction::Rescue || !self.step.is_multiple_of(d.snapshot_every) {
            return Ok(());
        }
        let keep = d.snapshots;
        let snapshot = self.snapshot()?;
        if self.detector.is_healthy() {
            self.healthy_snapshots.push_back(snapshot.clone());
            if self.healthy_snapshots.len() > keep {
                self.healthy_snapshots.pop_front();
            }
        }
        self.snapshots.push_back(snapshot);
        if self.snapshots.len() > keep {
            self.snapshots.pop_front();
        }
        Ok(())
    }

    /// The rate at `step`: the schedule's, warmed up again from a rescue's start where it asks.
    fn lr_at(&self, schedule: &Schedule, step: u64) -> f64 {
        let lr = schedule.lr(step);
        match &self.rescue {
            Some(r) if r.rewarm_steps > 0 && step >= r.from_step => {
                let done = (step - r.from_step + 1) as f64;
                lr * (done / r.rewarm_steps as f64).min(1.0)
            }
            _ => lr,
        }
    }

    /// The gradient norms the detector reads: all together, and per layer.
    fn observed_norms(&self, g: &step::Gradients) -> anyhow::Result<(f64, Vec<f64>)> {
        let norms = param_grad_norms(&self.model, g)?;
        let mut layers = vec![Vec::new(); self.detector.layers().len()];
        for (&layer, &norm) in self.layer_of_param.iter().zip(&norms) {
            layers[layer].push(norm);
        }
        let per_layer = layers.into_iter().map(norm_of).collect();
        Ok((norm_of(norms), per_layer))
    }

    /// For a dead layer: the layers whose units are all dead or saturated on
    /// this batch (evaluated without dropout), with their fractions recorded.
    fn dead_layers(
        &self,
        x: &candle_core::Tensor,
        verdict: &mut Verdict,
        record: &mut Record,
    ) -> anyhow::Result<()> {
        let (_, trace) = self.model.forward_traced(x, None, false)?;
        let mut stats = Record::new(record.step);
        layer_stats(&self.model, &trace, &mut stats)?;
        let mut dead = Vec::new();
        for (tag, value) in stats.values {
            let layer = tag
                .strip_prefix("dead_frac/")
                .or_else(|| tag.strip_prefix("saturated_frac/"));
            if let Some(layer) = layer {
                if value >= DEAD_LAYER_FRACTION {
                    dead.push(layer.to_string());
                }
                record.push(tag.clone(), value);
            }
        }
        if !dead.is_empty() {
            verdict.layer = dead.first().cloned();
            verdict.layer_signal = Some("all its units dead or saturated on the batch".into());
            verdict.layer_step = Some(record.step);
            verdict.layers = dead;
        }
        Ok(())
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn config(&self) -> &Config {
        &self.config
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
            divergence: self.divergence.clone(),
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
    pub fn run(&mut self, run_dir: &RunDir, options: &RunOptions) -> anyhow::Result<Summary> {
        let started = Instant::now();
        let config = self.config.clone();
        let t = &config.train;
        run_dir.write_text(run_dir::CONFIG, &config.to_toml())?;
        let mut sinks = open_sinks(&config, run_dir, self.step)?;
        let mut console = Console::new(options.quiet, t.steps);
        let schedule = self.schedule();
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
            self.keep_snapshot()?;
            let plan = self.plan();
            let mut record = Record::new(self.step);
            if plan.evaluate {
                evaluate(
                    &self.model,
                    self.data.val.as_ref(),
                    &self.device,
                    &mut record,
                    &mut self.best,
                )?;
                sinks.flush()?;
            }
            let done = self.train_step(&schedule, plan, &mut record)?;
            if let Some(line) = &done.diverging {
                console.note(&format!("step {}: diverging: {line}", record.step));
                sinks.text(record.step, "divergence", line)?;
            }
            if done.stopped {
                sinks.write(&record)?;
                status = Status::Diverged;
                break;
            }
            sinks.histograms(record.step, &done.histograms)?;
            if !record.is_empty() {
                sinks.write(&record)?;
            }
            let steps_done = self.step - self.start_step;
            let samples_per_sec = steps_done as f64 * self.batcher.batch_size() as f64
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

    /// The rate schedule over the whole run.
    pub fn schedule(&self) -> Schedule {
        let c = &self.config;
        Schedule::new(&c.schedule, c.optimizer.lr, c.train.steps)
    }

    /// What the current step does besides training, from the config's intervals.
    pub fn plan(&self) -> StepPlan {
        let step = self.step;
        let c = &self.config;
        let every = |n: u64| n > 0 && step.is_multiple_of(n);
        StepPlan {
            evaluate: step.is_multiple_of(c.train.eval_every),
            measures: Measures {
                measure: step.is_multiple_of(c.train.log_every),
                histograms: every(c.log.histogram_every),
                diagnostics: every(c.diagnostics.every),
            },
            spectra: every(c.diagnostics.spectrum_every),
        }
    }

    /// One update, the same for `larslab train` and `larslab bench`: the next
    /// batch → forward and backward → the detector → (unless the run must
    /// stop) the instruments and the optimizer step, whose measurements go
    /// into `record`.
    pub fn train_step(
        &mut self,
        schedule: &Schedule,
        plan: StepPlan,
        record: &mut Record,
    ) -> anyhow::Result<StepDone> {
        let step = self.step;
        let lr = self.lr_at(schedule, step);
        let measures = plan.measures;
        let (x, y) = self
            .data
            .train
            .batch(self.batcher.next_batch(), &self.device)?;
        let g = self.backward.run(
            &self.model,
            (&x, &y),
            &mut self.dropout_rng,
            measures.diagnostics,
        )?;
        let norms = match &g.grads {
            Some(_) if self.detector.needs_grad_norm() => Some(self.observed_norms(&g)?),
            _ => None,
        };
        let grad_norm = norms.as_ref().map(|(global, _)| *global);
        self.final_train_loss = Some(g.loss);
        let seen = Observation {
            loss: g.loss,
            grad_norm,
            layer_grad_norms: norms.as_ref().map(|(_, layers)| layers.as_slice()),
        };
        // A non-finite loss has no gradients: the run cannot go on, whatever the rules say.
        let verdict = self.detector.observe(step, seen).or_else(|| {
            (!g.loss.is_finite()).then(|| Verdict::new(Rule::NonFiniteLoss, step, step))
        });
        if measures.measure || verdict.is_some() {
            record_batch(record, &g, &y, lr)?;
            if let Some(smoothed) = self.detector.smoothed_loss() {
                record.push("loss/smoothed", smoothed);
            }
            if let Some(norm) = grad_norm {
                record.push("grad_norm/global", norm);
            }
        }
        self.note_recovery(step);
        let mut done = StepDone::default();
        if let Some(mut verdict) = verdict {
            record.push("diverged", 1.0);
            if self.divergence.is_none() {
                if verdict.rule == Rule::DeadLayer {
                    self.dead_layers(&x, &mut verdict, record)?;
                }
                done.diverging = Some(format!("{}, loss {:.4}", verdict.describe(), g.loss));
                self.divergence = Some(verdict);
            }
            let can_go_on = g.loss.is_finite() && grad_norm.is_none_or(f64::is_finite);
            if self.config.divergence.action != DivergenceAction::Continue || !can_go_on {
                done.stopped = true;
                return Ok(done);
            }
        }
        let grads = g.grads.as_ref().expect("a finite loss has gradients");
        if let Some(trace) = &g.trace {
            layer_stats(&self.model, trace, record)?;
        }
        if plan.spectra {
            spectra(self.model.params(), record)?;
        }
        done.histograms = apply_update(
            &self.model,
            &mut self.optimizer,
            grads,
            g.grad_norms.as_deref(),
            lr,
            record,
            measures,
        )?;
        self.step = step + 1;
        if record.values.iter().any(|(_, v)| !v.is_finite()) && record.get("diverged").is_none() {
            record.push("diverged", 1.0);
        }
        Ok(done)
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

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn parameters(&self) -> usize {
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
            diverged_at_step: self.divergence.as_ref().map(|v| v.step),
            best_smoothed_train_loss: self.detector.state.best_smoothed,
            divergence: self.divergence.clone(),
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
            rescued_by: Vec::new(),
        }
    }
}

/// A layer counts as dead or saturated when this share of its units is.
const DEAD_LAYER_FRACTION: f64 = 0.99;

/// The model's layers (parameters grouped by the name before the first dot:
/// `fc1`, `conv1`, `bn1`) and each parameter's layer.
fn layers_of(model: &Model) -> (Vec<String>, Vec<usize>) {
    let mut layers: Vec<String> = Vec::new();
    let mut of_param = Vec::new();
    for param in model.params() {
        let layer = param.name.split('.').next().unwrap_or(&param.name);
        let index = match layers.iter().position(|l| l == layer) {
            Some(index) => index,
            None => {
                layers.push(layer.to_string());
                layers.len() - 1
            }
        };
        of_param.push(index);
    }
    (layers, of_param)
}

/// The newest checkpoint in `checkpoints` taken before step `before` while
/// training was still healthy (see [`Detector::is_healthy`]): where a rescue
/// starts when no snapshot in memory is.
pub fn healthy_checkpoint(config: &Config, checkpoints: &Path, before: u64) -> Option<u64> {
    checkpoint::steps(checkpoints)
        .into_iter()
        .rev()
        .filter(|&step| step < before)
        .find(|&step| {
            checkpoint::read_state::<TrainingState>(checkpoints, step).is_some_and(|state| {
                // The layers and classes do not enter the health test.
                Detector::new(&config.divergence, state.detector, Vec::new(), 2).is_healthy()
            })
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
        let tensorboard = TensorBoardSink::create(run_dir.path(), config, start_step)
            .with_context(|| {
                format!(
                    "cannot write TensorBoard events in {}",
                    run_dir.path().display()
                )
            })?;
        sinks.0.push(Box::new(tensorboard));
    }
    Ok(sinks)
}
