//! Where measurements go: one [`Record`] per logged step, to every sink.

pub mod console;
pub mod jsonl;

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
    /// Makes everything written so far durable (called at evaluations and at the end).
    fn flush(&mut self) -> std::io::Result<()>;
}
