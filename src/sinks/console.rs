//! The progress line a person watches: every few seconds, on stderr.

use std::time::{Duration, Instant};

use super::Record;

pub struct Console {
    quiet: bool,
    total_steps: u64,
    every: Duration,
    last_print: Option<Instant>,
    last_val_accuracy: Option<f64>,
}

impl Console {
    pub fn new(quiet: bool, total_steps: u64) -> Self {
        Self {
            quiet,
            total_steps,
            every: Duration::from_secs(2),
            last_print: None,
            last_val_accuracy: None,
        }
    }

    /// Prints a progress line when the last one is a few seconds old, or when `force`.
    pub fn progress(&mut self, record: &Record, samples_per_sec: f64, force: bool) {
        if let Some(acc) = record.get("accuracy/val") {
            self.last_val_accuracy = Some(acc);
        }
        let due = self.last_print.is_none_or(|t| t.elapsed() >= self.every);
        let Some(loss) = record.get("loss/train") else {
            return;
        };
        if self.quiet || !(due || force) {
            return;
        }
        self.last_print = Some(Instant::now());
        let lr = record.get("lr").unwrap_or(f64::NAN);
        let val = self
            .last_val_accuracy
            .map_or(String::new(), |a| format!("  val acc {:5.1}%", 100.0 * a));
        eprintln!(
            "step {:>width$}/{}  loss {loss:.4}{val}  lr {lr:.4}  {:.0} samples/s",
            record.step,
            self.total_steps,
            samples_per_sec,
            width = self.total_steps.to_string().len(),
        );
    }

    pub fn note(&self, message: &str) {
        if !self.quiet {
            eprintln!("{message}");
        }
    }
}
