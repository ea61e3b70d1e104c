//! A small, dependency-light writer for TensorBoard event files.
//!
//! [`EventWriter`] writes `events.out.tfevents.*` files (TFRecord-framed
//! `tensorboard.Event` protos) that TensorBoard reads directly: scalars,
//! histograms, text, the hparams plugin's experiment/session summaries and a
//! custom-scalars layout.
//!
//! Layout conventions TensorBoard expects (one [`EventWriter`] per directory):
//!
//! * Each run is a directory under the logdir (`logdir/run_a`, ...). Scalars,
//!   histograms, text and `hparams_session_start`/`hparams_session_end` for a
//!   session go to that run's directory; the run name is the session name.
//! * `hparams_experiment` should be written **once** per logdir, conventionally
//!   in the logdir itself (the "." run); TensorBoard takes the first
//!   `_hparams_/experiment` tag it finds in any run, so writing it into several
//!   runs makes the choice arbitrary.
//! * `custom_scalars_layout` may be written in any run; layouts from all runs
//!   are merged. Writing it once in the logdir itself is the usual choice.
//!
//! Writes are buffered: call [`EventWriter::flush`] (e.g. after each eval or
//! every few seconds) to make data visible to a running TensorBoard.

pub mod proto;
pub mod record;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use proto::summary::value::Value as ValueKind;

/// File-name suffix identifying event files written by this module.
const FILE_SUFFIX: &str = "larslab";
/// Maximum number of histogram buckets written per histogram.
const MAX_HISTOGRAM_BUCKETS: usize = 30;

const HPARAMS_PLUGIN: &str = "hparams";
const HPARAMS_EXPERIMENT_TAG: &str = "_hparams_/experiment";
const HPARAMS_SESSION_START_TAG: &str = "_hparams_/session_start_info";
const HPARAMS_SESSION_END_TAG: &str = "_hparams_/session_end_info";
const TEXT_PLUGIN: &str = "text";
const CUSTOM_SCALARS_PLUGIN: &str = "custom_scalars";
const CUSTOM_SCALARS_TAG: &str = "custom_scalars__config__";

/// A hyperparameter value of one session.
#[derive(Clone, Debug, PartialEq)]
pub enum HParam {
    /// A string value (`google.protobuf.Value.string_value`).
    Str(String),
    /// A numeric value (`google.protobuf.Value.number_value`).
    Num(f64),
    /// A boolean value (`google.protobuf.Value.bool_value`).
    Bool(bool),
}

/// Final status of a session (`tensorboard.hparams.Status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionStatus {
    /// `STATUS_SUCCESS`.
    Success,
    /// `STATUS_FAILURE`.
    Failure,
    /// `STATUS_RUNNING`.
    Running,
    /// `STATUS_UNKNOWN`.
    Unknown,
}

/// Declared type of a hyperparameter (`tensorboard.hparams.DataType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HParamKind {
    /// `DATA_TYPE_STRING`.
    Str,
    /// `DATA_TYPE_FLOAT64`.
    Num,
    /// `DATA_TYPE_BOOL`.
    Bool,
}

/// Declaration of one hyperparameter of the experiment.
#[derive(Clone, Debug, PartialEq)]
pub struct HParamInfo {
    /// Name; must match the keys passed to [`EventWriter::hparams_session_start`].
    pub name: String,
    /// Name shown in the UI (defaults to `name`).
    pub display_name: Option<String>,
    /// Declared type.
    pub kind: HParamKind,
    /// Description (markdown).
    pub description: Option<String>,
    /// Whether the value differs between the sessions; TensorBoard lists
    /// (and by default shows) those first.
    pub differs: bool,
}

/// Declaration of one metric of the experiment: a scalar tag that every
/// session writes into its own run directory (metric group `""`).
#[derive(Clone, Debug, PartialEq)]
pub struct MetricInfo {
    /// The scalar tag (e.g. `"loss/val"`).
    pub tag: String,
    /// Name shown in the UI (defaults to the tag).
    pub display_name: Option<String>,
    /// Description (markdown).
    pub description: Option<String>,
}

/// A collapsible category of the custom-scalars dashboard.
#[derive(Clone, Debug, PartialEq)]
pub struct LayoutCategory {
    /// Title shown atop the category.
    pub title: String,
    /// Charts in this category.
    pub charts: Vec<MultilineChart>,
}

/// A custom-scalars chart plotting every scalar tag matching any regex.
#[derive(Clone, Debug, PartialEq)]
pub struct MultilineChart {
    /// Title shown atop the chart.
    pub title: String,
    /// Regular expressions of the scalar tags to plot (matched from the start).
    pub tag_regexes: Vec<String>,
}

/// Writes one TensorBoard event file. Not thread-safe by itself; no
/// background thread; every fallible call returns an [`io::Result`].
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` if needed and a new file
    /// `events.out.tfevents.<unix secs>.<hostname>.<pid>.larslab` in it.
    ///
    /// The first record (`file_version = "brain.Event:2"`) is written and
    /// flushed immediately, so the file is a valid event file at once. An
    /// existing file is never overwritten: if the name is taken (two writers
    /// created within the same second in one process), `.1`, `.2`, ... is
    /// appended.
    pub fn create(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let wall_time = now_secs();
        let base = format!(
            "events.out.tfevents.{}.{}.{}.{}",
            wall_time as u64,
            hostname(),
            std::process::id(),
            FILE_SUFFIX
        );
        let (path, file) = create_new_file(dir, &base)?;
        let mut writer = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        writer.write_event(&proto::Event {
            wall_time,
            step: 0,
            what: Some(proto::event::What::FileVersion("brain.Event:2".into())),
        })?;
        writer.flush()?;
        Ok(writer)
    }

    /// Path of the event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a scalar (`Summary.Value.simple_value`) for `tag` at `step`.
    pub fn scalar(&mut self, tag: &str, step: i64, value: f32) -> io::Result<()> {
        self.write_value(step, tag, None, ValueKind::SimpleValue(value))
    }

    /// Writes a histogram (`Summary.Value.histo`, a `HistogramProto`) of
    /// `values` for `tag` at `step`.
    ///
    /// Buckets follow TensorFlow's default exponential bucket limits
    /// (±1e-12·1.1^k, and 0), restricted to the occupied range and merged
    /// `k` at a time so that at most 30 buckets are written. Non-finite values
    /// are skipped; if nothing finite remains (or `values` is empty), nothing
    /// is written.
    pub fn histogram(&mut self, tag: &str, step: i64, values: &[f32]) -> io::Result<()> {
        match histogram_proto(values) {
            Some(h) => self.write_value(step, tag, None, ValueKind::Histo(h)),
            None => Ok(()),
        }
    }

    /// Writes a markdown text summary for the text plugin: a scalar `DT_STRING`
    /// tensor with metadata `plugin_name = "text"`.
    pub fn text(&mut self, tag: &str, step: i64, markdown: &str) -> io::Result<()> {
        let content = proto::TextPluginData { version: 0 }.encode_to_vec();
        let metadata = plugin_metadata(TEXT_PLUGIN, content);
        self.write_value(
            step,
            tag,
            Some(metadata),
            ValueKind::Tensor(string_tensor(markdown.as_bytes().to_vec())),
        )
    }

    /// Records the start of an hparams session (`_hparams_/session_start_info`).
    ///
    /// Write it into the run directory of the session; the run name is the
    /// session name. `group_name` groups repeated sessions with the same
    /// hparams (empty: the session is its own group). Duplicate names: the
    /// last value wins.
    pub fn hparams_session_start(
        &mut self,
        hparams: &[(String, HParam)],
        group_name: &str,
        start_time_secs: f64,
    ) -> io::Result<()> {
        let hparams: BTreeMap<String, proto::ProtobufValue> = hparams
            .iter()
            .map(|(name, v)| (name.clone(), protobuf_value(v)))
            .collect();
        let info = proto::SessionStartInfo {
            hparams,
            group_name: group_name.to_owned(),
            start_time_secs,
        };
        self.write_hparams(
            HPARAMS_SESSION_START_TAG,
            proto::hparams_plugin_data::Data::SessionStartInfo(info),
        )
    }

    /// Records the end of an hparams session (`_hparams_/session_end_info`).
    pub fn hparams_session_end(
        &mut self,
        status: SessionStatus,
        end_time_secs: f64,
    ) -> io::Result<()> {
        let status = match status {
            SessionStatus::Success => proto::Status::Success,
            SessionStatus::Failure => proto::Status::Failure,
            SessionStatus::Running => proto::Status::Running,
            SessionStatus::Unknown => proto::Status::Unknown,
        };
        let info = proto::SessionEndInfo {
            status: status as i32,
            end_time_secs,
        };
        self.write_hparams(
            HPARAMS_SESSION_END_TAG,
            proto::hparams_plugin_data::Data::SessionEndInfo(info),
        )
    }

    /// Declares the experiment (`_hparams_/experiment`): its hyperparameters
    /// and metrics. Write it once per logdir, preferably with a writer on the
    /// logdir itself (see the module docs).
    pub fn hparams_experiment(
        &mut self,
        hparams: &[HParamInfo],
        metrics: &[MetricInfo],
    ) -> io::Result<()> {
        let hparam_infos = hparams
            .iter()
            .map(|h| proto::HParamInfo {
                name: h.name.clone(),
                display_name: h.display_name.clone().unwrap_or_default(),
                description: h.description.clone().unwrap_or_default(),
                r#type: match h.kind {
                    HParamKind::Str => proto::HParamDataType::String,
                    HParamKind::Num => proto::HParamDataType::Float64,
                    HParamKind::Bool => proto::HParamDataType::Bool,
                } as i32,
                differs: h.differs,
            })
            .collect();
        let metric_infos = metrics
            .iter()
            .map(|m| proto::MetricInfo {
                name: Some(proto::MetricName {
                    group: String::new(),
                    tag: m.tag.clone(),
                }),
                display_name: m.display_name.clone().unwrap_or_default(),
                description: m.description.clone().unwrap_or_default(),
            })
            .collect();
        let experiment = proto::Experiment {
            description: String::new(),
            time_created_secs: now_secs(),
            hparam_infos,
            metric_infos,
        };
        self.write_hparams(
            HPARAMS_EXPERIMENT_TAG,
            proto::hparams_plugin_data::Data::Experiment(experiment),
        )
    }

    /// Writes the custom-scalars dashboard layout (`custom_scalars__config__`):
    /// a scalar `DT_STRING` tensor holding a serialized `tensorboard.Layout`.
    pub fn custom_scalars_layout(&mut self, categories: &[LayoutCategory]) -> io::Result<()> {
        let layout = proto::Layout {
            version: 0,
            category: categories
                .iter()
                .map(|c| proto::Category {
                    title: c.title.clone(),
                    chart: c
                        .charts
                        .iter()
                        .map(|ch| proto::Chart {
                            title: ch.title.clone(),
                            content: Some(proto::chart::Content::Multiline(
                                proto::MultilineChartContent {
                                    tag: ch.tag_regexes.clone(),
                                },
                            )),
                        })
                        .collect(),
                    closed: false,
                })
                .collect(),
        };
        let metadata = plugin_metadata(CUSTOM_SCALARS_PLUGIN, Vec::new());
        self.write_value(
            0,
            CUSTOM_SCALARS_TAG,
            Some(metadata),
            ValueKind::Tensor(string_tensor(layout.encode_to_vec())),
        )
    }

    /// Writes `SessionLog { status: START }` at `step`: TensorBoard then drops
    /// every event of this run at `step` or later that earlier files hold
    /// (its `purge_orphaned_data`, on by default), so a run resumed or rolled
    /// back to `step` draws no loops.
    pub fn session_start(&mut self, step: i64) -> io::Result<()> {
        self.write_event(&proto::Event {
            wall_time: now_secs(),
            step,
            what: Some(proto::event::What::SessionLog(proto::SessionLog {
                status: proto::SESSION_LOG_START,
                checkpoint_path: String::new(),
                msg: String::new(),
            })),
        })
    }

    /// Flushes buffered events to the file and syncs its data to disk.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()
    }

    fn write_hparams(
        &mut self,
        tag: &str,
        data: proto::hparams_plugin_data::Data,
    ) -> io::Result<()> {
        let content = proto::HParamsPluginData {
            version: 0,
            data: Some(data),
        }
        .encode_to_vec();
        // Like `tensorboard.plugins.hparams.metadata.NULL_TENSOR`: an empty
        // DT_FLOAT tensor of shape [0].
        let null_tensor = proto::TensorProto {
            dtype: proto::DT_FLOAT,
            tensor_shape: Some(proto::TensorShapeProto {
                dim: vec![proto::tensor_shape_proto::Dim { size: 0 }],
            }),
            float_val: Vec::new(),
            string_val: Vec::new(),
        };
        self.write_value(
            0,
            tag,
            Some(plugin_metadata(HPARAMS_PLUGIN, content)),
            ValueKind::Tensor(null_tensor),
        )
    }

    fn write_value(
        &mut self,
        step: i64,
        tag: &str,
        metadata: Option<proto::SummaryMetadata>,
        value: ValueKind,
    ) -> io::Result<()> {
        self.write_event(&proto::Event {
            wall_time: now_secs(),
            step,
            what: Some(proto::event::What::Summary(proto::Summary {
                value: vec![proto::summary::Value {
                    tag: tag.to_owned(),
                    metadata,
                    value: Some(value),
                }],
            })),
        })
    }

    fn write_event(&mut self, event: &proto::Event) -> io::Result<()> {
        record::write_record(&mut self.out, &event.encode_to_vec())
    }
}

/// `SummaryMetadata` for a tensor-based plugin summary.
fn plugin_metadata(plugin_name: &str, content: Vec<u8>) -> proto::SummaryMetadata {
    proto::SummaryMetadata {
        plugin_data: Some(proto::summary_metadata::PluginData {
            plugin_name: plugin_name.to_owned(),
            content,
        }),
        display_name: String::new(),
        summary_description: String::new(),
        // What TensorBoard's `dataclass_compat` would infer for these plugins.
        data_class: proto::DATA_CLASS_TENSOR,
    }
}

/// A rank-0 (`shape []`) `DT_STRING` tensor holding `bytes`.
fn string_tensor(bytes: Vec<u8>) -> proto::TensorProto {
    proto::TensorProto {
        dtype: proto::DT_STRING,
        tensor_shape: Some(proto::TensorShapeProto { dim: Vec::new() }),
        float_val: Vec::new(),
        string_val: vec![bytes],
    }
}

fn protobuf_value(v: &HParam) -> proto::ProtobufValue {
    use proto::protobuf_value::Kind;
    proto::ProtobufValue {
        kind: Some(match v {
            HParam::Str(s) => Kind::StringValue(s.clone()),
            HParam::Num(x) => Kind::NumberValue(*x),
            HParam::Bool(b) => Kind::BoolValue(*b),
        }),
    }
}

/// TensorFlow's default histogram bucket limits
/// (`tsl/lib/histogram/histogram.cc`, `InitDefaultBucketsInner`):
/// `-DBL_MAX, ..., -1e-12, 0, 1e-12, ..., 1e-12*1.1^k < 1e20, DBL_MAX`.
fn default_bucket_limits() -> &'static [f64] {
    static LIMITS: OnceLock<Vec<f64>> = OnceLock::new();
    LIMITS.get_or_init(|| {
        let mut pos = Vec::new();
        let mut v = 1.0e-12;
        while v < 1.0e20 {
            pos.push(v);
            v *= 1.1;
        }
        pos.push(f64::MAX);
        let mut limits: Vec<f64> = pos.iter().rev().map(|x| -x).collect();
        limits.push(0.0);
        limits.extend_from_slice(&pos);
        limits
    })
}

/// Builds the `HistogramProto` written by [`EventWriter::histogram`]; `None`
/// if `values` has no finite value.
pub(crate) fn histogram_proto(values: &[f32]) -> Option<proto::HistogramProto> {
    let limits = default_bucket_limits();
    let mut counts = vec![0.0f64; limits.len()];
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut num, mut sum, mut sum_squares) = (0.0f64, 0.0f64, 0.0f64);
    for v in values
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| f64::from(v))
    {
        // Bucket i covers [limits[i-1], limits[i]) as in TF (upper_bound).
        let b = limits.partition_point(|&l| l <= v).min(limits.len() - 1);
        counts[b] += 1.0;
        min = min.min(v);
        max = max.max(v);
        num += 1.0;
        sum += v;
        sum_squares += v * v;
    }
    if num == 0.0 {
        return None;
    }
    let lo = counts.iter().position(|&c| c > 0.0)?;
    let hi = counts.iter().rposition(|&c| c > 0.0)?;
    let stride = (hi - lo + 1).div_ceil(MAX_HISTOGRAM_BUCKETS);
    let mut bucket_limit = Vec::with_capacity(MAX_HISTOGRAM_BUCKETS);
    let mut bucket = Vec::with_capacity(MAX_HISTOGRAM_BUCKETS);
    let mut start = lo;
    while start <= hi {
        let end = (start + stride - 1).min(hi);
        bucket_limit.push(limits[end]);
        bucket.push(counts[start..=end].iter().sum());
        start = end + 1;
    }
    Some(proto::HistogramProto {
        min,
        max,
        num,
        sum,
        sum_squares,
        bucket_limit,
        bucket,
    })
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Best-effort host name without libc: kernel's, `/etc/hostname`, `$HOSTNAME`,
/// else `localhost`; reduced to characters that are safe in a file name.
fn hostname() -> String {
    let raw = fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "localhost".to_owned()
    } else {
        clean
    }
}

/// Creates `dir/base`, or `dir/base.N` for the first free N, never truncating
/// an existing file.
fn create_new_file(dir: &Path, base: &str) -> io::Result<(PathBuf, File)> {
    let mut last_err = None;
    for n in 0..1000u32 {
        let name = if n == 0 {
            base.to_owned()
        } else {
            format!("{base}.{n}")
        };
        let path = dir.join(name);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("no free event file name")))
}

#[cfg(test)]
mod tests;
