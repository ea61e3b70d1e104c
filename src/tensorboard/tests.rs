use super::proto::{self, event::What, summary::value::Value as V};
use super::record::{masked_crc32c, read_records};
use super::*;

fn decode_all(path: &Path) -> Vec<proto::Event> {
    read_records(path)
        .expect("read_records")
        .iter()
        .map(|r| proto::Event::decode(r.as_slice()).expect("decode Event"))
        .collect()
}

/// The single summary value of an event, or panic (test helper).
fn only_value(e: &proto::Event) -> &proto::summary::Value {
    match &e.what {
        Some(What::Summary(s)) => {
            assert_eq!(s.value.len(), 1);
            &s.value[0]
        }
        other => panic!("expected a summary, got {other:?}"),
    }
}

fn plugin(v: &proto::summary::Value) -> (&str, &[u8]) {
    let pd = v
        .metadata
        .as_ref()
        .and_then(|m| m.plugin_data.as_ref())
        .expect("plugin_data");
    (pd.plugin_name.as_str(), pd.content.as_slice())
}

fn tensor(v: &proto::summary::Value) -> &proto::TensorProto {
    match &v.value {
        Some(V::Tensor(t)) => t,
        other => panic!("expected a tensor, got {other:?}"),
    }
}

fn hparams_data(v: &proto::summary::Value) -> proto::hparams_plugin_data::Data {
    let (name, content) = plugin(v);
    assert_eq!(name, "hparams");
    let t = tensor(v);
    assert_eq!(t.dtype, proto::DT_FLOAT);
    assert_eq!(
        t.tensor_shape.as_ref().unwrap().dim,
        vec![proto::tensor_shape_proto::Dim { size: 0 }]
    );
    let pd = proto::HParamsPluginData::decode(content).unwrap();
    assert_eq!(pd.version, 0);
    pd.data.expect("oneof data set")
}

#[test]
fn create_writes_flushed_file_version_first() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("a/b");
    let w = EventWriter::create(&run).unwrap();
    let name = w.path().file_name().unwrap().to_str().unwrap().to_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    assert!(
        name.ends_with(&format!(".{}.larslab", std::process::id())),
        "{name}"
    );
    let parts: Vec<&str> = name.split('.').collect();
    assert!(parts[3].parse::<u64>().unwrap() > 1_600_000_000);
    assert_eq!(w.path().parent().unwrap(), run);
    // Readable before any explicit flush, while the writer is alive.
    let events = decode_all(w.path());
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].what,
        Some(What::FileVersion("brain.Event:2".into()))
    );
    assert!(events[0].wall_time > 1.6e9);
}

#[test]
fn two_writers_same_dir_get_distinct_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = EventWriter::create(dir.path()).unwrap();
    let b = EventWriter::create(dir.path()).unwrap();
    assert_ne!(a.path(), b.path());
    assert_eq!(decode_all(a.path()).len(), 1);
    assert_eq!(decode_all(b.path()).len(), 1);
}

#[test]
fn create_fails_cleanly_when_dir_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not_a_dir");
    fs::write(&file, b"x").unwrap();
    assert!(EventWriter::create(&file).is_err());
}

#[test]
fn writes_every_kind_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(dir.path()).unwrap();
    w.scalar("loss", 3, 0.25).unwrap();
    w.histogram(
        "weights",
        4,
        &[-1.0, 0.0, 0.5, 2.0, f32::NAN, f32::INFINITY],
    )
    .unwrap();
    w.histogram("empty", 4, &[]).unwrap();
    w.histogram("all_nan", 4, &[f32::NAN]).unwrap();
    w.text("notes", 5, "# hello\n*world*").unwrap();
    w.hparams_session_start(
        &[
            ("lr".into(), HParam::Num(0.01)),
            ("optimizer".into(), HParam::Str("adam".into())),
            ("nesterov".into(), HParam::Bool(true)),
        ],
        "grp",
        1234.5,
    )
    .unwrap();
    w.hparams_session_end(SessionStatus::Failure, 2345.5)
        .unwrap();
    w.hparams_experiment(
        &[
            HParamInfo {
                name: "lr".into(),
                display_name: Some("learning rate".into()),
                kind: HParamKind::Num,
                description: None,
                differs: true,
            },
            HParamInfo {
                name: "optimizer".into(),
                display_name: None,
                kind: HParamKind::Str,
                description: Some("which optimizer".into()),
                differs: false,
            },
            HParamInfo {
                name: "nesterov".into(),
                display_name: None,
                kind: HParamKind::Bool,
                description: None,
                differs: false,
            },
        ],
        &[MetricInfo {
            tag: "loss".into(),
            display_name: Some("Loss".into()),
            description: Some("val loss".into()),
        }],
    )
    .unwrap();
    w.custom_scalars_layout(&[LayoutCategory {
        title: "losses".into(),
        charts: vec![MultilineChart {
            title: "all losses".into(),
            tag_regexes: vec!["loss.*".into(), "val/.*".into()],
        }],
    }])
    .unwrap();
    w.flush().unwrap();

    let events = decode_all(w.path());
    assert_eq!(
        events.len(),
        8,
        "file_version + 7 summaries (2 histos skipped)"
    );
    let mut it = events.iter().skip(1);

    // scalar
    let e = it.next().unwrap();
    assert_eq!(e.step, 3);
    let v = only_value(e);
    assert_eq!(v.tag, "loss");
    assert_eq!(v.value, Some(V::SimpleValue(0.25)));

    // histogram
    let e = it.next().unwrap();
    assert_eq!(e.step, 4);
    let v = only_value(e);
    assert_eq!(v.tag, "weights");
    let Some(V::Histo(h)) = &v.value else {
        panic!("expected histo")
    };
    assert_eq!((h.min, h.max, h.num), (-1.0, 2.0, 4.0));
    assert_eq!(h.sum, 1.5);
    assert_eq!(h.sum_squares, 1.0 + 0.25 + 4.0);
    assert_eq!(h.bucket.iter().sum::<f64>(), 4.0);

    // text
    let e = it.next().unwrap();
    assert_eq!(e.step, 5);
    let v = only_value(e);
    assert_eq!(v.tag, "notes");
    let (name, content) = plugin(v);
    assert_eq!(name, "text");
    assert_eq!(proto::TextPluginData::decode(content).unwrap().version, 0);
    let t = tensor(v);
    assert_eq!(t.dtype, proto::DT_STRING);
    assert!(t.tensor_shape.as_ref().unwrap().dim.is_empty());
    assert_eq!(t.string_val, vec![b"# hello\n*world*".to_vec()]);

    // hparams session start
    let v = only_value(it.next().unwrap());
    assert_eq!(v.tag, "_hparams_/session_start_info");
    let proto::hparams_plugin_data::Data::SessionStartInfo(s) = hparams_data(v) else {
        panic!("expected session_start_info")
    };
    use proto::protobuf_value::Kind;
    assert_eq!(s.group_name, "grp");
    assert_eq!(s.start_time_secs, 1234.5);
    assert_eq!(s.hparams["lr"].kind, Some(Kind::NumberValue(0.01)));
    assert_eq!(
        s.hparams["optimizer"].kind,
        Some(Kind::StringValue("adam".into()))
    );
    assert_eq!(s.hparams["nesterov"].kind, Some(Kind::BoolValue(true)));

    // hparams session end
    let v = only_value(it.next().unwrap());
    assert_eq!(v.tag, "_hparams_/session_end_info");
    let proto::hparams_plugin_data::Data::SessionEndInfo(s) = hparams_data(v) else {
        panic!("expected session_end_info")
    };
    assert_eq!(s.status, 2, "STATUS_FAILURE = 2");
    assert_eq!(s.end_time_secs, 2345.5);

    // hparams experiment
    let v = only_value(it.next().unwrap());
    assert_eq!(v.tag, "_hparams_/experiment");
    let proto::hparams_plugin_data::Data::Experiment(x) = hparams_data(v) else {
        panic!("expected experiment")
    };
    let names: Vec<_> = x.hparam_infos.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["lr", "optimizer", "nesterov"]);
    let types: Vec<_> = x.hparam_infos.iter().map(|h| h.r#type).collect();
    assert_eq!(types, [3, 1, 2], "FLOAT64, STRING, BOOL");
    assert_eq!(x.hparam_infos[0].display_name, "learning rate");
    assert!(x.hparam_infos[0].differs && !x.hparam_infos[1].differs);
    assert_eq!(x.hparam_infos[1].description, "which optimizer");
    assert_eq!(x.metric_infos.len(), 1);
    let m = &x.metric_infos[0];
    assert_eq!(
        m.name,
        Some(proto::MetricName {
            group: String::new(),
            tag: "loss".into()
        })
    );
    assert_eq!(
        (m.display_name.as_str(), m.description.as_str()),
        ("Loss", "val loss")
    );

    // custom scalars
    let v = only_value(it.next().unwrap());
    assert_eq!(v.tag, "custom_scalars__config__");
    assert_eq!(plugin(v).0, "custom_scalars");
    let t = tensor(v);
    assert_eq!(t.dtype, proto::DT_STRING);
    assert!(t.tensor_shape.as_ref().unwrap().dim.is_empty());
    assert_eq!(t.string_val.len(), 1);
    let layout = proto::Layout::decode(t.string_val[0].as_slice()).unwrap();
    assert_eq!(layout.category.len(), 1);
    assert_eq!(layout.category[0].title, "losses");
    let chart = &layout.category[0].chart[0];
    assert_eq!(chart.title, "all losses");
    assert_eq!(
        chart.content,
        Some(proto::chart::Content::Multiline(
            proto::MultilineChartContent {
                tag: vec!["loss.*".into(), "val/.*".into()]
            }
        ))
    );
    assert!(it.next().is_none());
}

#[test]
fn histogram_buckets_are_tf_limits_and_at_most_30() {
    // Wide, zero-crossing data exercises bucket merging.
    let values: Vec<f32> = (0..10_000)
        .map(|i| ((i as f32) * 0.731).sin() * (1.0 + i as f32 / 100.0))
        .collect();
    let h = histogram_proto(&values).unwrap();
    assert!(
        h.bucket.len() <= 30 && h.bucket.len() >= 20,
        "{}",
        h.bucket.len()
    );
    assert_eq!(h.bucket.len(), h.bucket_limit.len());
    assert_eq!(h.num, 10_000.0);
    assert_eq!(h.bucket.iter().sum::<f64>(), h.num);
    assert!(h.bucket_limit.windows(2).all(|w| w[0] < w[1]));
    assert!(*h.bucket_limit.last().unwrap() > h.max);
    assert!(h.bucket[0] > 0.0 && *h.bucket.last().unwrap() > 0.0);
    // Every limit is one of TF's default limits.
    let tf = default_bucket_limits();
    assert!(h.bucket_limit.iter().all(|l| tf.contains(l)));
    // Sanity of TF's ladder itself: symmetric around 0, ±DBL_MAX at the ends.
    assert_eq!(tf[0], -f64::MAX);
    assert_eq!(*tf.last().unwrap(), f64::MAX);
    assert_eq!(tf[tf.len() / 2], 0.0);
    assert_eq!(tf.len() % 2, 1);

    // A single repeated value: one bucket containing it.
    let h = histogram_proto(&[0.5; 7]).unwrap();
    assert_eq!(h.bucket, vec![7.0]);
    assert!(h.bucket_limit[0] > 0.5 && h.bucket_limit[0] <= 0.5 * 1.1 + 1e-12);

    assert!(histogram_proto(&[]).is_none());
    assert!(histogram_proto(&[f32::NAN, f32::NEG_INFINITY]).is_none());
}

fn write_small_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(dir.path()).unwrap();
    w.scalar("x", 1, 1.0).unwrap();
    w.flush().unwrap();
    let path = w.path().to_owned();
    (dir, path)
}

#[test]
fn corrupted_byte_is_an_error_not_a_panic() {
    let (_dir, path) = write_small_file();
    let good = fs::read(&path).unwrap();
    assert_eq!(read_records(&path).unwrap().len(), 2);
    // Flip every byte in turn: each corruption must be reported as an error.
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x40;
        fs::write(&path, &bad).unwrap();
        let err = read_records(&path).expect_err(&format!("byte {i} corrupted"));
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
            ),
            "byte {i}: {err}"
        );
    }
}

#[test]
fn truncated_file_is_an_error() {
    let (_dir, path) = write_small_file();
    let good = fs::read(&path).unwrap();
    let first_len = 8 + 4 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize + 4;
    for cut in 1..good.len() {
        fs::write(&path, &good[..cut]).unwrap();
        let r = read_records(&path);
        if cut == first_len {
            assert_eq!(r.unwrap().len(), 1, "cut at a record boundary");
        } else {
            let e = r.expect_err(&format!("cut at {cut}"));
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "cut {cut}: {e}");
        }
    }
}

#[test]
fn huge_declared_length_does_not_allocate_or_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let len = u64::MAX.to_le_bytes();
    let mut bytes = len.to_vec();
    bytes.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    bytes.extend_from_slice(b"short");
    fs::write(&path, bytes).unwrap();
    assert_eq!(
        read_records(&path).unwrap_err().kind(),
        io::ErrorKind::UnexpectedEof
    );
}
