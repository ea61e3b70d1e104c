//! Hand-declared protobuf messages mirroring TensorBoard's `.proto` files.
//!
//! Only the fields this crate writes (or that tests read back) are declared.
//! Field numbers and wire types were taken from the `.proto` files named in
//! each doc comment (and cross-checked against the descriptors compiled into
//! the `tensorboard` Python package). Unknown fields are skipped by prost when
//! decoding, so partial declarations are wire-compatible.

use std::collections::BTreeMap;

/// `tensorboard.DataType` values from `tensorboard/compat/proto/types.proto`
/// (only the ones used here).
pub const DT_FLOAT: i32 = 1;
/// `DT_STRING` from `tensorboard/compat/proto/types.proto`.
pub const DT_STRING: i32 = 7;

/// `tensorboard.DataClass` from `tensorboard/compat/proto/summary.proto`:
/// `DATA_CLASS_TENSOR`.
pub const DATA_CLASS_TENSOR: i32 = 2;

/// `tensorboard.Event` from `tensorboard/compat/proto/event.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Timestamp of the event, seconds since the UNIX epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// Global step of the event.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// The `what` oneof (only `file_version`, `summary` and `session_log` are declared).
    #[prost(oneof = "event::What", tags = "3, 5, 7")]
    pub what: Option<event::What>,
}

/// Nested types of [`Event`].
pub mod event {
    /// `oneof what` of `tensorboard.Event` (`tensorboard/compat/proto/event.proto`).
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum What {
        /// `string file_version = 3`, e.g. `"brain.Event:2"`.
        #[prost(string, tag = "3")]
        FileVersion(String),
        /// `Summary summary = 5`.
        #[prost(message, tag = "5")]
        Summary(super::Summary),
        /// `SessionLog session_log = 7`.
        #[prost(message, tag = "7")]
        SessionLog(super::SessionLog),
    }
}

/// `tensorboard.SessionLog` from `tensorboard/compat/proto/event.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    /// `SessionStatus status = 1`: 1 is `START`.
    #[prost(int32, tag = "1")]
    pub status: i32,
    /// `string checkpoint_path = 2`.
    #[prost(string, tag = "2")]
    pub checkpoint_path: String,
    /// `string msg = 3`.
    #[prost(string, tag = "3")]
    pub msg: String,
}

/// `SessionLog.SessionStatus.START`.
pub const SESSION_LOG_START: i32 = 1;

/// `tensorboard.Summary` from `tensorboard/compat/proto/summary.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// `repeated Value value = 1`.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<summary::Value>,
}

/// Nested types of [`Summary`].
pub mod summary {
    /// `tensorboard.Summary.Value` from `tensorboard/compat/proto/summary.proto`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        /// `string tag = 1`.
        #[prost(string, tag = "1")]
        pub tag: String,
        /// `SummaryMetadata metadata = 9`.
        #[prost(message, optional, tag = "9")]
        pub metadata: Option<super::SummaryMetadata>,
        /// The `value` oneof (`simple_value`, `histo`, `tensor` declared).
        #[prost(oneof = "value::Value", tags = "2, 5, 8")]
        pub value: Option<value::Value>,
    }

    /// Nested types of [`Value`].
    pub mod value {
        /// `oneof value` of `tensorboard.Summary.Value`
        /// (`tensorboard/compat/proto/summary.proto`).
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            /// `float simple_value = 2`.
            #[prost(float, tag = "2")]
            SimpleValue(f32),
            /// `HistogramProto histo = 5`.
            #[prost(message, tag = "5")]
            Histo(super::super::HistogramProto),
            /// `TensorProto tensor = 8`.
            #[prost(message, tag = "8")]
            Tensor(super::super::TensorProto),
        }
    }
}

/// `tensorboard.SummaryMetadata` from `tensorboard/compat/proto/summary.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryMetadata {
    /// `PluginData plugin_data = 1`.
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<summary_metadata::PluginData>,
    /// `string display_name = 2`.
    #[prost(string, tag = "2")]
    pub display_name: String,
    /// `string summary_description = 3`.
    #[prost(string, tag = "3")]
    pub summary_description: String,
    /// `DataClass data_class = 4` (enum as `i32`).
    #[prost(int32, tag = "4")]
    pub data_class: i32,
}

/// Nested types of [`SummaryMetadata`].
pub mod summary_metadata {
    /// `tensorboard.SummaryMetadata.PluginData` from
    /// `tensorboard/compat/proto/summary.proto`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PluginData {
        /// `string plugin_name = 1`.
        #[prost(string, tag = "1")]
        pub plugin_name: String,
        /// `bytes content = 2` (usually a serialized plugin-specific proto).
        #[prost(bytes = "vec", tag = "2")]
        pub content: Vec<u8>,
    }
}

/// `tensorboard.HistogramProto` from `tensorboard/compat/proto/histogram.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HistogramProto {
    /// `double min = 1`.
    #[prost(double, tag = "1")]
    pub min: f64,
    /// `double max = 2`.
    #[prost(double, tag = "2")]
    pub max: f64,
    /// `double num = 3`.
    #[prost(double, tag = "3")]
    pub num: f64,
    /// `double sum = 4`.
    #[prost(double, tag = "4")]
    pub sum: f64,
    /// `double sum_squares = 5`.
    #[prost(double, tag = "5")]
    pub sum_squares: f64,
    /// `repeated double bucket_limit = 6 [packed = true]`; right edge of bucket i.
    #[prost(double, repeated, tag = "6")]
    pub bucket_limit: Vec<f64>,
    /// `repeated double bucket = 7 [packed = true]`; count of bucket i.
    #[prost(double, repeated, tag = "7")]
    pub bucket: Vec<f64>,
}

/// `tensorboard.TensorProto` from `tensorboard/compat/proto/tensor.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    /// `DataType dtype = 1` (enum as `i32`, see [`DT_FLOAT`], [`DT_STRING`]).
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    /// `TensorShapeProto tensor_shape = 2`.
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShapeProto>,
    /// `repeated float float_val = 5 [packed = true]`.
    #[prost(float, repeated, tag = "5")]
    pub float_val: Vec<f32>,
    /// `repeated bytes string_val = 8`.
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// `tensorboard.TensorShapeProto` from `tensorboard/compat/proto/tensor_shape.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeProto {
    /// `repeated Dim dim = 2`; empty means a scalar (rank 0).
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<tensor_shape_proto::Dim>,
}

/// Nested types of [`TensorShapeProto`].
pub mod tensor_shape_proto {
    /// `tensorboard.TensorShapeProto.Dim` from
    /// `tensorboard/compat/proto/tensor_shape.proto`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dim {
        /// `int64 size = 1`.
        #[prost(int64, tag = "1")]
        pub size: i64,
    }
}

/// `tensorboard.TextPluginData` from `tensorboard/plugins/text/plugin_data.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TextPluginData {
    /// `int32 version = 1` (0 is the only version).
    #[prost(int32, tag = "1")]
    pub version: i32,
}

/// `tensorboard.hparams.HParamsPluginData` from
/// `tensorboard/plugins/hparams/plugin_data.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HParamsPluginData {
    /// `int32 version = 1` (must be 0, `metadata.PLUGIN_DATA_VERSION`).
    #[prost(int32, tag = "1")]
    pub version: i32,
    /// `oneof data`.
    #[prost(oneof = "hparams_plugin_data::Data", tags = "2, 3, 4")]
    pub data: Option<hparams_plugin_data::Data>,
}

/// Nested types of [`HParamsPluginData`].
pub mod hparams_plugin_data {
    /// `oneof data` of `tensorboard.hparams.HParamsPluginData`
    /// (`tensorboard/plugins/hparams/plugin_data.proto`).
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Data {
        /// `Experiment experiment = 2`.
        #[prost(message, tag = "2")]
        Experiment(super::Experiment),
        /// `SessionStartInfo session_start_info = 3`.
        #[prost(message, tag = "3")]
        SessionStartInfo(super::SessionStartInfo),
        /// `SessionEndInfo session_end_info = 4`.
        #[prost(message, tag = "4")]
        SessionEndInfo(super::SessionEndInfo),
    }
}

/// `tensorboard.hparams.SessionStartInfo` from
/// `tensorboard/plugins/hparams/plugin_data.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionStartInfo {
    /// `map<string, google.protobuf.Value> hparams = 1`.
    #[prost(btree_map = "string, message", tag = "1")]
    pub hparams: BTreeMap<String, ProtobufValue>,
    /// `string group_name = 4`.
    #[prost(string, tag = "4")]
    pub group_name: String,
    /// `double start_time_secs = 5`.
    #[prost(double, tag = "5")]
    pub start_time_secs: f64,
}

/// `tensorboard.hparams.SessionEndInfo` from
/// `tensorboard/plugins/hparams/plugin_data.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionEndInfo {
    /// `Status status = 1` (enum `tensorboard.hparams.Status` in `api.proto`).
    #[prost(enumeration = "Status", tag = "1")]
    pub status: i32,
    /// `double end_time_secs = 2`.
    #[prost(double, tag = "2")]
    pub end_time_secs: f64,
}

/// `tensorboard.hparams.Status` from `tensorboard/plugins/hparams/api.proto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Status {
    /// `STATUS_UNKNOWN = 0`.
    Unknown = 0,
    /// `STATUS_SUCCESS = 1`.
    Success = 1,
    /// `STATUS_FAILURE = 2`.
    Failure = 2,
    /// `STATUS_RUNNING = 3`.
    Running = 3,
}

/// `tensorboard.hparams.DataType` from `tensorboard/plugins/hparams/api.proto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum HParamDataType {
    /// `DATA_TYPE_UNSET = 0`.
    Unset = 0,
    /// `DATA_TYPE_STRING = 1`.
    String = 1,
    /// `DATA_TYPE_BOOL = 2`.
    Bool = 2,
    /// `DATA_TYPE_FLOAT64 = 3`.
    Float64 = 3,
}

/// `tensorboard.hparams.Experiment` from `tensorboard/plugins/hparams/api.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Experiment {
    /// `string description = 1`.
    #[prost(string, tag = "1")]
    pub description: String,
    /// `double time_created_secs = 3`.
    #[prost(double, tag = "3")]
    pub time_created_secs: f64,
    /// `repeated HParamInfo hparam_infos = 4`.
    #[prost(message, repeated, tag = "4")]
    pub hparam_infos: Vec<HParamInfo>,
    /// `repeated MetricInfo metric_infos = 5`.
    #[prost(message, repeated, tag = "5")]
    pub metric_infos: Vec<MetricInfo>,
}

/// `tensorboard.hparams.HParamInfo` from `tensorboard/plugins/hparams/api.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HParamInfo {
    /// `string name = 1`.
    #[prost(string, tag = "1")]
    pub name: String,
    /// `string display_name = 2`.
    #[prost(string, tag = "2")]
    pub display_name: String,
    /// `string description = 3`.
    #[prost(string, tag = "3")]
    pub description: String,
    /// `DataType type = 4`.
    #[prost(enumeration = "HParamDataType", tag = "4")]
    pub r#type: i32,
    /// `bool differs = 7`: TensorBoard lists hparams that differ first.
    #[prost(bool, tag = "7")]
    pub differs: bool,
}

/// `tensorboard.hparams.MetricName` from `tensorboard/plugins/hparams/api.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MetricName {
    /// `string group = 1` (sub-directory of the session's run; "" = the run itself).
    #[prost(string, tag = "1")]
    pub group: String,
    /// `string tag = 2` (the scalar tag).
    #[prost(string, tag = "2")]
    pub tag: String,
}

/// `tensorboard.hparams.MetricInfo` from `tensorboard/plugins/hparams/api.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MetricInfo {
    /// `MetricName name = 1`.
    #[prost(message, optional, tag = "1")]
    pub name: Option<MetricName>,
    /// `string display_name = 3`.
    #[prost(string, tag = "3")]
    pub display_name: String,
    /// `string description = 4`.
    #[prost(string, tag = "4")]
    pub description: String,
}

/// `google.protobuf.Value` from `google/protobuf/struct.proto` (scalar kinds only).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProtobufValue {
    /// `oneof kind` (`number_value`, `string_value`, `bool_value` declared).
    #[prost(oneof = "protobuf_value::Kind", tags = "2, 3, 4")]
    pub kind: Option<protobuf_value::Kind>,
}

/// Nested types of [`ProtobufValue`].
pub mod protobuf_value {
    /// `oneof kind` of `google.protobuf.Value` (`google/protobuf/struct.proto`).
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// `double number_value = 2`.
        #[prost(double, tag = "2")]
        NumberValue(f64),
        /// `string string_value = 3`.
        #[prost(string, tag = "3")]
        StringValue(String),
        /// `bool bool_value = 4`.
        #[prost(bool, tag = "4")]
        BoolValue(bool),
    }
}

/// `tensorboard.Layout` from `tensorboard/plugins/custom_scalar/layout.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Layout {
    /// `int32 version = 1` (0 is the only supported version).
    #[prost(int32, tag = "1")]
    pub version: i32,
    /// `repeated Category category = 2`.
    #[prost(message, repeated, tag = "2")]
    pub category: Vec<Category>,
}

/// `tensorboard.Category` from `tensorboard/plugins/custom_scalar/layout.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Category {
    /// `string title = 1`.
    #[prost(string, tag = "1")]
    pub title: String,
    /// `repeated Chart chart = 2`.
    #[prost(message, repeated, tag = "2")]
    pub chart: Vec<Chart>,
    /// `bool closed = 3`.
    #[prost(bool, tag = "3")]
    pub closed: bool,
}

/// `tensorboard.Chart` from `tensorboard/plugins/custom_scalar/layout.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Chart {
    /// `string title = 1`.
    #[prost(string, tag = "1")]
    pub title: String,
    /// `oneof content { MultilineChartContent multiline = 2; ... }`
    /// (only `multiline` declared; `margin = 3` is not used here).
    #[prost(oneof = "chart::Content", tags = "2")]
    pub content: Option<chart::Content>,
}

/// Nested types of [`Chart`].
pub mod chart {
    /// `oneof content` of `tensorboard.Chart`
    /// (`tensorboard/plugins/custom_scalar/layout.proto`).
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Content {
        /// `MultilineChartContent multiline = 2`.
        #[prost(message, tag = "2")]
        Multiline(super::MultilineChartContent),
    }
}

/// `tensorboard.MultilineChartContent` from
/// `tensorboard/plugins/custom_scalar/layout.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MultilineChartContent {
    /// `repeated string tag = 1`: regular expressions of scalar tags.
    #[prost(string, repeated, tag = "1")]
    pub tag: Vec<String>,
}
