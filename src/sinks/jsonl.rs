//! `metrics.jsonl`: one JSON object per logged step, `{"step": N, "<tag>": value, ...}`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::{Record, Sink};

pub struct JsonlSink {
    file: BufWriter<File>,
}

impl JsonlSink {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            file: BufWriter::new(File::create(path)?),
        })
    }

    /// Continues `path` at `step`: keeps the records of earlier steps (a
    /// resumed run's history), drops the rest, and appends after them.
    pub fn continue_at(path: &Path, step: u64) -> std::io::Result<Self> {
        if step == 0 || !path.exists() {
            return Self::create(path);
        }
        let kept: String = std::fs::read_to_string(path)?
            .lines()
            .filter(|line| step_of(line).is_some_and(|s| s < step))
            .map(|line| format!("{line}\n"))
            .collect();
        crate::fsutil::atomic_write(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok(Self {
            file: BufWriter::new(file),
        })
    }
}

fn step_of(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get("step")?
        .as_u64()
}

/// One record as a JSON line. Non-finite values are written as `null`, which
/// JSON readers accept (NaN and Infinity are not JSON).
pub fn to_line(record: &Record) -> String {
    let mut line = format!("{{\"step\":{}", record.step);
    for (tag, value) in &record.values {
        let value =
            serde_json::Number::from_f64(*value).map_or("null".to_string(), |n| n.to_string());
        line.push_str(&format!(
            ",{}:{value}",
            serde_json::Value::from(tag.as_str())
        ));
    }
    line.push('}');
    line
}

impl Sink for JsonlSink {
    fn write(&mut self, record: &Record) -> std::io::Result<()> {
        writeln!(self.file, "{}", to_line(record))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        self.file.get_ref().sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuing_keeps_only_earlier_steps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut sink = JsonlSink::create(&path).unwrap();
        for step in 0..5 {
            let mut record = Record::new(step * 10);
            record.push("lr", 0.1);
            sink.write(&record).unwrap();
        }
        sink.flush().unwrap();
        let mut sink = JsonlSink::continue_at(&path, 30).unwrap();
        sink.write(&Record::new(30)).unwrap();
        sink.flush().unwrap();
        let steps: Vec<u64> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| step_of(l).unwrap())
            .collect();
        assert_eq!(steps, [0, 10, 20, 30]);
    }

    #[test]
    fn lines_are_json_with_null_for_non_finite() {
        let mut record = Record::new(7);
        record.push("loss/train", 0.5);
        record.push("grad_norm/fc1.weight", f64::NAN);
        let line = to_line(&record);
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["step"], 7);
        assert_eq!(parsed["loss/train"], 0.5);
        assert!(parsed["grad_norm/fc1.weight"].is_null());
        assert!(line.starts_with("{\"step\":7,\"loss/train\""));
    }
}
