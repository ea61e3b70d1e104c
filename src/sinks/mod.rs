//! Where measurements go: one [`Record`] per logged step, to every sink.

pub mod console;
pub mod jsonl;
pub mod tensorboard;

/// The measurements of one step, tags in the order they were added.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub step: u64,
    pub values: Vec<(String, f64)>,
}

impl Record {
    pub fn new(step: u64) -> Self {
        Self {
            step,
            values: Vec::new(),
        }
    }

    pub fn push(&mut self, tag: impl Into<String>, value: f64) {
        self.values.push((tag.into(), value));
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn get(&self, tag: &str) -> Option<f64> {
        self.values.iter().find(|(t, _)| t == tag).map(|&(_, v)| v)
    }
}

/// A destination for records. Errors are returned, never swallowed: a run
/// that cannot write its measurements stops.
pub trait Sink {
    fn write(&mut self, record: &Record) -> std::io::Result<()>;
    /// Distributions (`params/<name>`, `grads/<name>`); sinks that cannot show them ignore them.
    fn histograms(
        &mut self,
        _step: u64,
        _histograms: &[(String, Vec<f32>)],
    ) -> std::io::Result<()> {
        Ok(())
    }
    /// A note in words at `step` (the divergence's description); sinks without text ignore it.
    fn text(&mut self, _step: u64, _tag: &str, _markdown: &str) -> std::io::Result<()> {
        Ok(())
    }
    /// Makes everything written so far durable (called at evaluations and at the end).
    fn flush(&mut self) -> std::io::Result<()>;
    /// The run is over; `diverged` says how it ended.
    fn finish(&mut self, _diverged: bool) -> std::io::Result<()> {
        self.flush()
    }
}

/// Every sink of a run, written to together.
#[derive(Default)]
pub struct Sinks(pub Vec<Box<dyn Sink>>);

impl Sinks {
    pub fn write(&mut self, record: &Record) -> std::io::Result<()> {
        self.0.iter_mut().try_for_each(|s| s.write(record))
    }

    pub fn histograms(
        &mut self,
        step: u64,
        histograms: &[(String, Vec<f32>)],
    ) -> std::io::Result<()> {
        self.0
            .iter_mut()
            .try_for_each(|s| s.histograms(step, histograms))
    }

    pub fn text(&mut self, step: u64, tag: &str, markdown: &str) -> std::io::Result<()> {
        self.0
            .iter_mut()
            .try_for_each(|s| s.text(step, tag, markdown))
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.0.iter_mut().try_for_each(|s| s.flush())
    }

    pub fn finish(&mut self, diverged: bool) -> std::io::Result<()> {
        self.0.iter_mut().try_for_each(|s| s.finish(diverged))
    }
}
