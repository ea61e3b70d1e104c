//! Per-layer measurements and `larslab probe` against analytic results and a
//! hand computation.

mod common;
use common::succeed;

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use larslab::config::{Activation, Config, InitScheme};
use larslab::diagnostics::layer_stats;
use larslab::model::Model;
use larslab::probe::probe;
use larslab::sinks::Record;

fn config(overrides: &[&str]) -> Config {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Config::load(None, &overrides).unwrap()
}

#[test]
fn linear_orthogonal_networks_are_isometries() {
    let c = config(&[
        "model.activation=identity",
        "model.init=orthogonal",
        "model.hidden=[64,64,64,64,64]",
        "data.n_train=200",
    ]);
    let report = probe(&c, 4).unwrap();
    let j = report.jacobian.unwrap();
    assert_eq!(j.singular_values.len(), 4 * 64);
    for s in &j.singular_values {
        assert!((s - 1.0).abs() < 1e-4, "singular value {s}");
    }
}

/// The ratio of successive hidden layers' activation variance at init, for a
/// deep ReLU net: He keeps it at 1, Xavier halves it every layer.
fn relu_variance_ratios(init: &str) -> Vec<f64> {
    let c = config(&[
        "model.activation=relu",
        &format!("model.init={init}"),
        "model.hidden=[512,512,512,512,512,512]",
        "data.n_train=2000",
        "data.batch_size=1024",
    ]);
    let report = probe(&c, 1).unwrap();
    let stds: Vec<f64> = report.layers.iter().filter_map(|l| l.act_std).collect();
    stds.windows(2)
        .skip(1)
        .map(|w| (w[1] / w[0]).powi(2))
        .collect()
}

#[test]
fn he_keeps_relu_variance_and_xavier_halves_it() {
    for ratio in relu_variance_ratios("he_normal") {
        assert!((ratio - 1.0).abs() < 0.15, "He: {ratio}");
    }
    for ratio in relu_variance_ratios("xavier_normal") {
        assert!((ratio - 0.5).abs() < 0.08, "Xavier: {ratio}");
    }
}

fn train_symmetry(dropout: &str) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let dropout = format!("model.dropout={dropout}");
    succeed(
        dir.path(),
        &[
            "train",
            "--quiet",
            "--out",
            "runs",
            "--name",
            "sym",
            "--set",
            "model.init=constant",
            "--set",
            "model.init_scale=0.05",
            "--set",
            "model.hidden=[32,32]",
            "--set",
            "data.n_train=2000",
            "--set",
            "train.steps=300",
            "--set",
            "diagnostics.every=20",
            // Without dropout the symmetric net's loss climbs to 5 and its
            // ReLUs die (the detector says so); symmetry is measured throughout.
            "--set",
            "divergence.action=\"continue\"",
            "--set",
            &dropout,
        ],
    );
    std::fs::read_to_string(dir.path().join("runs/sym/metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["symmetry/fc2"].as_f64()
        })
        .collect()
}

#[test]
fn constant_init_stays_symmetric_under_sgd_and_dropout_breaks_it() {
    let plain = train_symmetry("0.0");
    assert!(plain.len() >= 10);
    for s in &plain {
        assert!((s - 1.0).abs() < 1e-6, "symmetry without dropout: {s}");
    }
    let dropped = train_symmetry("0.3");
    let last = *dropped.last().unwrap();
    assert!(last < 0.99, "symmetry with dropout ends at {last}");
}

/// A 3-2-2 ReLU net on a batch of 3, measured by `layer_stats` and by hand in f64.
#[test]
fn measurements_of_a_small_net_equal_a_hand_computation() {
    let w1 = [[0.5, -1.0, 0.25], [-0.75, 0.5, 1.0]];
    let b1 = [0.1, -0.2];
    let w2 = [[1.0, -0.5], [0.25, 0.75]];
    let b2 = [0.0, 0.3];
    let x = [[1.0, 2.0, -1.0], [0.5, -0.5, 2.0], [-1.0, 0.0, 0.5]];
    let labels = [0usize, 1, 1];

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("init.safetensors");
    let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
    let flat = |m: &[[f64; 3]]| m.iter().flatten().map(|&v| v as f32).collect::<Vec<_>>();
    let tensors = HashMap::from([
        ("fc1.weight".to_string(), t(flat(&w1), &[2, 3])),
        (
            "fc1.bias".to_string(),
            t(b1.map(|v| v as f32).to_vec(), &[2]),
        ),
        (
            "fc2.weight".to_string(),
            t(w2.iter().flatten().map(|&v| v as f32).collect(), &[2, 2]),
        ),
        (
            "fc2.bias".to_string(),
            t(b2.map(|v| v as f32).to_vec(), &[2]),
        ),
    ]);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let mut c = Config::default();
    c.model.hidden = vec![2];
    c.model.activation = Activation::Relu;
    c.model.init = InitScheme::Zeros;
    c.model.init_from = Some(path);
    let model = Model::new(&c.model, &[3], 2, 0, &Device::Cpu).unwrap();
    let xt = t(flat(&x), &[3, 3]);
    let yt = Tensor::from_vec(labels.map(|l| l as u32).to_vec(), 3, &Device::Cpu).unwrap();
    let (logits, mut trace) = model.forward_traced(&xt, None, true).unwrap();
    let grads = candle_nn::loss::cross_entropy(&logits, &yt)
        .unwrap()
        .backward()
        .unwrap();
    trace.read_probes(&grads);
    let mut record = Record::new(0);
    layer_stats(&model, &trace, &mut record).unwrap();

    // By hand.
    let mut z1 = [[0.0; 2]; 3];
    let mut h1 = [[0.0; 2]; 3];
    let mut dz2 = [[0.0; 2]; 3];
    let mut dz1 = [[0.0; 2]; 3];
    for n in 0..3 {
        for u in 0..2 {
            z1[n][u] = b1[u] + (0..3).map(|k| w1[u][k] * x[n][k]).sum::<f64>();
            h1[n][u] = z1[n][u].max(0.0);
        }
        let z2: Vec<f64> = (0..2)
            .map(|o| b2[o] + (0..2).map(|u| w2[o][u] * h1[n][u]).sum::<f64>())
            .collect();
        let max = z2[0].max(z2[1]);
        let e: Vec<f64> = z2.iter().map(|z| (z - max).exp()).collect();
        for o in 0..2 {
            dz2[n][o] = (e[o] / (e[0] + e[1]) - if labels[n] == o { 1.0 } else { 0.0 }) / 3.0;
        }
        for u in 0..2 {
            let back: f64 = (0..2).map(|o| dz2[n][o] * w2[o][u]).sum();
            dz1[n][u] = if z1[n][u] > 0.0 { back } else { 0.0 };
        }
    }
    let stats = |v: Vec<f64>| {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        (
            m,
            (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt(),
        )
    };
    let (act_mean, act_std) = stats(h1.iter().flatten().copied().collect());
    let (_, grad1_std) = stats(dz1.iter().flatten().copied().collect());
    let (_, grad2_std) = stats(dz2.iter().flatten().copied().collect());
    let dead = (0..2).filter(|&u| (0..3).all(|n| z1[n][u] <= 0.0)).count() as f64 / 2.0;
    let norm = |r: &[f64]| r.iter().map(|v| v * v).sum::<f64>().sqrt();
    let cos = |a: &[f64], b: &[f64]| {
        a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (norm(a) * norm(b))
    };
    let expected = [
        ("act_mean/fc1", act_mean),
        ("act_std/fc1", act_std),
        ("dead_frac/fc1", dead),
        ("preact_grad_std/fc1", grad1_std),
        ("preact_grad_std/fc2", grad2_std),
        ("symmetry/fc1", cos(&w1[0], &w1[1])),
        ("symmetry/fc2", cos(&w2[0], &w2[1])),
    ];
    for (tag, want) in expected {
        let got = record.get(tag).unwrap_or_else(|| panic!("no {tag}"));
        assert!(
            (got - want).abs() < 1e-5 * (1.0 + want.abs()),
            "{tag}: {got} vs {want}"
        );
    }
}
