//! The training loop: batch → forward → loss → backward → measure → step → log.
//!
//! Steps are numbered by the updates made before them: at step t the
//! parameters are θ_t (t updates done). The training metrics of step t are
//! those of update t (its batch loss, its gradients, the norms of θ_t and of
//! the step taken); an evaluation at step t evaluates θ_t. The final
//! evaluation and checkpoint are at step `train.steps`.

use std::time::Instant;

use anyhow::Context;
use candle_core::{D, DType, Device, Tensor};
use serde::Serialize;

use crate::checkpoint;
use crate::config::Config;
use crate::data::{self, Batcher, Dataset};
use crate::device;
use crate::diagnostics::BeforeStep;
use crate::model::Mlp;
use crate::optim::Optimizer;
use crate::optim::schedule::Schedule;
use crate::rng::{self, Rng, Stream};
use crate::run_dir::{self, RunDir};
use crate::sinks::console::Console;
use crate::sinks::jsonl::JsonlSink;
use crate::sinks::tensorboard::TensorBoardSink;
use crate::sinks::{Record, Sinks};

/// What a finished run reports in `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub name: String,
    /// Updates made (fewer than `train.steps` when the run diverged).
    pub steps: u64,
    pub diverged: bool,
    pub diverged_at_step: Option<u64>,
    /// The training batch loss at the last step made.
    pub final_train_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub final_val_accuracy: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub best_val_accuracy: Option<f64>,
    pub best_val_accuracy_step: Option<u64>,
    pub wall_seconds: f64,
    pub samples_per_second: f64,
    pub parameters: usize,
    pub train_samples: usize,
    pub val_samples: usize,
    pub classes: usize,
    pub batch_size: usize,
}

/// Evaluations are done in chunks of this many samples to bound memory.
const EVAL_CHUNK: usize = 2048;

/// Everything a run needs, built and checked before its directory exists, so
/// that bad data or a bad init file leaves nothing behind.
pub struct Trainer {
    config: Config,
    device: Device,
    data: data::Splits,
    widths: Vec<usize>,
    model: Mlp,
}

impl Trainer {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let device = device::select(config.device)?;
        let data = data::load(config)?;
        let widths = Mlp::widths(data.train.features(), &config.model, data.classes);
        let model = Mlp::new(&widths, &config.model, config.seed, &device)?;
        Ok(Self {
            config: config.clone(),
            device,
            data,
            widths,
            model,
        })
    }

    /// Trains into `run_dir`, which exists and is empty.
    pub fn run(self, run_dir: &RunDir, quiet: bool) -> anyhow::Result<Summary> {
        let started = Instant::now();
        let Self {
            config,
            device,
            data,
            widths,
            model,
        } = self;
        let config = &config;
        let mut optimizer = Optimizer::new(&config.optimizer);
        let schedule = Schedule::new(&config.schedule, config.optimizer.lr, config.train.steps);
        let mut batcher = Batcher::new(
            data.train.len(),
            config.data.batch_size,
            config.data.shuffle,
            config.seed,
        );
        let mut dropout_rng = rng::stream(config.seed, Stream::Dropout);
        let mut console = Console::new(quiet, config.train.steps);
        run_dir.write_text(run_dir::CONFIG, &config.to_toml())?;
        let mut sinks = open_sinks(config, run_dir)?;

        if batcher.batch_size() < config.data.batch_size {
            console.note(&format!(
                "data.batch_size = {} exceeds the {} training samples: training full-batch",
                config.data.batch_size,
                data.train.len()
            ));
        }
        let parameters: usize = model.params().iter().map(|p| p.tensor().elem_count()).sum();
        console.note(&format!(
            "{}: MLP {widths:?} ({parameters} parameters), {} train / {} val samples, {} classes -> {}",
            config.name,
            data.train.len(),
            data.val.as_ref().map_or(0, Dataset::len),
            data.classes,
            run_dir.path().display()
        ));

        let mut best = BestSoFar::default();
        let mut diverged_at_step = None;
        let mut final_train_loss = None;
        let mut steps_done = 0;
        let train_clock = Instant::now();
        let t = &config.train;
        let histogram_every = config.log.histogram_every.unwrap_or(0);
        for step in 0..t.steps {
            let mut record = Record::new(step);
            if step % t.eval_every == 0 {
                evaluate(&model, data.val.as_ref(), &device, &mut record, &mut best)?;
                sinks.flush()?;
            }
            let lr = schedule.lr(step);
            let probe = Probe {
                measure: step % t.log_every == 0 || step + 1 == t.steps,
                histograms: histogram_every > 0 && step % histogram_every == 0,
            };
            let (x, y) = data.train.batch(batcher.next_batch(), &device)?;
            let batch = (&x, &y);
            let out = train_step(
                &model,
                &mut optimizer,
                batch,
                lr,
                &mut dropout_rng,
                &mut record,
                probe,
            )?;
            final_train_loss = Some(out.loss);
            if record.values.iter().any(|(_, v)| !v.is_finite()) {
                record.push("diverged", 1.0);
            }
            sinks.histograms(step, &out.histograms)?;
            if !out.loss.is_finite() {
                diverged_at_step = Some(step);
                sinks.write(&record)?;
                console.note(&format!(
                    "step {step}: the training loss is {}; the run diverged",
                    out.loss
                ));
                break;
            }
            steps_done = step + 1;
            if !record.is_empty() {
                sinks.write(&record)?;
            }
            let samples_per_sec =
                samples_per_second(steps_done, batcher.batch_size(), &train_clock);
            console.progress(&record, samples_per_sec, false);
            if t.checkpoint_every > 0
                && steps_done % t.checkpoint_every == 0
                && steps_done < t.steps
            {
                checkpoint::save(&run_dir.checkpoint(steps_done), &model.named_tensors())?;
            }
        }

        let train_seconds = train_clock.elapsed().as_secs_f64();
        if diverged_at_step.is_none() {
            let mut record = Record::new(steps_done);
            evaluate(&model, data.val.as_ref(), &device, &mut record, &mut best)?;
            if !record.is_empty() {
                sinks.write(&record)?;
            }
        }
        sinks.finish(diverged_at_step.is_some())?;
        checkpoint::save(&run_dir.checkpoint(steps_done), &model.named_tensors())?;

        let summary = Summary {
            name: config.name.clone(),
            steps: steps_done,
            diverged: diverged_at_step.is_some(),
            diverged_at_step,
            final_train_loss: final_train_loss.filter(|l| l.is_finite()),
            final_val_loss: best.last_loss,
            final_val_accuracy: best.last_accuracy,
            best_val_loss: best.loss,
            best_val_accuracy: best.accuracy,
            best_val_accuracy_step: best.accuracy_step,
            wall_seconds: started.elapsed().as_secs_f64(),
            samples_per_second: steps_done as f64 * batcher.batch_size() as f64
                / train_seconds.max(1e-9),
            parameters,
            train_samples: data.train.len(),
            val_samples: data.val.as_ref().map_or(0, Dataset::len),
            classes: data.classes,
            batch_size: batcher.batch_size(),
        };
        run_dir.write_json(run_dir::SUMMARY, &summary)?;
        Ok(summary)
    }
}

/// What to observe during one update besides the loss.
#[derive(Debug, Clone, Copy, Default)]
pub struct Probe {
    /// Training metrics and per-parameter measurements into the record.
    pub measure: bool,
    /// Every parameter's and gradient's values, for histograms.
    pub histograms: bool,
}

/// What one update produced.
pub struct StepOutput {
    /// The batch loss before the update.
    pub loss: f64,
    /// `params/<name>` and `grads/<name>` values when the probe asked for them.
    pub histograms: Vec<(String, Vec<f32>)>,
}

/// One update of `model` on the batch `(x, y)`: forward (dropout masks from
/// `dropout_rng`), mean cross-entropy, backward, optimizer step, observed as
/// `probe` asks (the loss is recorded also when it is not finite, and then
/// the parameters are left untouched).
pub fn train_step(
    model: &Mlp,
    optimizer: &mut Optimizer,
    (x, y): (&Tensor, &Tensor),
    lr: f64,
    dropout_rng: &mut Rng,
    record: &mut Record,
    probe: Probe,
) -> anyhow::Result<StepOutput> {
    let logits = model.forward(x, Some(dropout_rng))?;
    let loss = candle_nn::loss::cross_entropy(&logits, y)?;
    let loss_value = loss.to_scalar::<f32>()? as f64;
    let mut out = StepOutput {
        loss: loss_value,
        histograms: Vec::new(),
    };
    if probe.measure || !loss_value.is_finite() {
        record.push("loss/train", loss_value);
        record.push("accuracy/train", accuracy(&logits, y)?);
        record.push("lr", lr);
    }
    if !loss_value.is_finite() {
        return Ok(out);
    }
    let grads = loss.backward()?;
    if probe.histograms {
        for param in model.params() {
            let grad = grads
                .get(param.tensor())
                .expect("every parameter has a gradient");
            out.histograms.push((
                format!("params/{}", param.name),
                param.tensor().flatten_all()?.to_vec1()?,
            ));
            out.histograms.push((
                format!("grads/{}", param.name),
                grad.flatten_all()?.to_vec1()?,
            ));
        }
    }
    let before = probe
        .measure
        .then(|| BeforeStep::measure(model.params(), &grads))
        .transpose()?;
    let steps = optimizer.step(model.params(), &grads, lr)?;
    if let Some(before) = before {
        before.complete(&steps, lr, record)?;
    }
    Ok(out)
}

/// metrics.jsonl always; TensorBoard unless `log.tensorboard = false`.
fn open_sinks(config: &Config, run_dir: &RunDir) -> anyhow::Result<Sinks> {
    let path = run_dir.file(run_dir::METRICS);
    let jsonl =
        JsonlSink::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
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

fn samples_per_second(steps: u64, batch_size: usize, since: &Instant) -> f64 {
    steps as f64 * batch_size as f64 / since.elapsed().as_secs_f64().max(1e-9)
}

fn accuracy(logits: &Tensor, labels: &Tensor) -> candle_core::Result<f64> {
    Ok(correct(logits, labels)? as f64 / labels.dim(0)? as f64)
}

fn correct(logits: &Tensor, labels: &Tensor) -> candle_core::Result<u64> {
    let predicted = logits.argmax(D::Minus1)?;
    Ok(predicted
        .eq(labels)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as u64)
}

/// The latest and best validation figures.
#[derive(Debug, Default)]
struct BestSoFar {
    last_loss: Option<f64>,
    last_accuracy: Option<f64>,
    loss: Option<f64>,
    accuracy: Option<f64>,
    accuracy_step: Option<u64>,
}

/// Mean loss and accuracy of the model on the validation split, added to `record`.
fn evaluate(
    model: &Mlp,
    val: Option<&Dataset>,
    device: &Device,
    record: &mut Record,
    best: &mut BestSoFar,
) -> anyhow::Result<()> {
    let Some(val) = val else {
        return Ok(());
    };
    let mut loss_sum = 0.0;
    let mut hits = 0;
    let indices: Vec<usize> = (0..val.len()).collect();
    for chunk in indices.chunks(EVAL_CHUNK) {
        let (x, y) = val.batch(chunk, device)?;
        let logits = model.forward(&x, None)?;
        loss_sum += candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64
            * chunk.len() as f64;
        hits += correct(&logits, &y)?;
    }
    let loss = loss_sum / val.len() as f64;
    let accuracy = hits as f64 / val.len() as f64;
    record.push("loss/val", loss);
    record.push("accuracy/val", accuracy);
    best.last_loss = Some(loss).filter(|l| l.is_finite());
    best.last_accuracy = Some(accuracy);
    if loss.is_finite() && best.loss.is_none_or(|b| loss < b) {
        best.loss = Some(loss);
    }
    if best.accuracy.is_none_or(|b| accuracy > b) {
        best.accuracy = Some(accuracy);
        best.accuracy_step = Some(record.step);
    }
    Ok(())
}
