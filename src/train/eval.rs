//! Evaluation on the validation split, and the best figures so far.

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::step::correct;
use crate::data::Dataset;
use crate::model::Model;
use crate::sinks::Record;

/// Evaluations are done in chunks of this many samples to bound memory.
const EVAL_CHUNK: usize = 2048;

/// The latest and best validation figures (part of every checkpoint).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BestSoFar {
    pub last_loss: Option<f64>,
    pub last_accuracy: Option<f64>,
    pub loss: Option<f64>,
    pub accuracy: Option<f64>,
    pub accuracy_step: Option<u64>,
}

/// Mean loss and accuracy of the model on a whole split.
pub fn loss_and_accuracy(
    model: &Model,
    data: &Dataset,
    device: &Device,
) -> anyhow::Result<(f64, f64)> {
    let mut loss_sum = 0.0;
    let mut hits = 0;
    let indices: Vec<usize> = (0..data.len()).collect();
    for chunk in indices.chunks(EVAL_CHUNK) {
        let (x, y) = data.batch(chunk, device)?;
        let logits = model.forward(&x, None)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64;
        loss_sum += loss * chunk.len() as f64;
        hits += correct(&logits, &y)?;
    }
    Ok((
        loss_sum / data.len() as f64,
        hits as f64 / data.len() as f64,
    ))
}

/// Validation loss and accuracy, added to `record` and to the best figures.
pub fn evaluate(
    model: &Model,
    val: Option<&Dataset>,
    device: &Device,
    record: &mut Record,
    best: &mut BestSoFar,
) -> anyhow::Result<()> {
    let Some(val) = val else {
        return Ok(());
    };
    let (loss, accuracy) = loss_and_accuracy(model, val, device)?;
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
