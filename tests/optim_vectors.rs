//! The optimizers against independent float64 references.
//!
//! `tests/vectors/optim_vectors.json` holds parameter trajectories computed by
//! `tests/vectors/gen_optim_vectors.py` straight from the published formulas
//! in NumPy, cross-checked there against optax where optax implements the
//! variant (see tests/vectors/README.md). Here each case is replayed through
//! `Optimizer::step` in f32 (to 1e-5 relative, 1e-7 absolute near zero);
//! gradients reach it through a real backward pass
//! of L = Σ ⟨w, G⟩, whose gradient is exactly G.

use candle_core::{Device, Tensor, Var};
use serde::Deserialize;

use larslab::config::OptimizerConfig;
use larslab::model::Param;
use larslab::optim::Optimizer;

#[derive(Deserialize)]
struct Vectors {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    optimizer: serde_json::Map<String, serde_json::Value>,
    lrs: Vec<f64>,
    params: Vec<ParamCase>,
    expected: Vec<Vec<Vec<f64>>>,
    /// LARS and LAMB: the trust ratio of each parameter at each step.
    trust_ratios: Option<Vec<Vec<f64>>>,
}

#[derive(Deserialize)]
struct ParamCase {
    name: String,
    shape: Vec<usize>,
    init: Vec<f32>,
    grads: Vec<Vec<f32>>,
}

fn load() -> Vectors {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/optim_vectors.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The case's optimizer settings as our config, through the same TOML keys a user writes.
fn config(case: &Case) -> OptimizerConfig {
    let mut table = toml::Table::new();
    for (key, value) in &case.optimizer {
        let value = match value {
            serde_json::Value::String(s) => toml::Value::String(s.clone()),
            serde_json::Value::Bool(b) => toml::Value::Boolean(*b),
            n => toml::Value::Float(n.as_f64().unwrap()),
        };
        table.insert(key.into(), value);
    }
    table.insert("lr".into(), toml::Value::Float(case.lrs[0]));
    table
        .try_into()
        .unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

fn replay(case: &Case) {
    let device = Device::Cpu;
    let params: Vec<Param> = case
        .params
        .iter()
        .map(|p| Param {
            name: p.name.clone(),
            var: Var::from_vec(p.init.clone(), p.shape.as_slice(), &device).unwrap(),
        })
        .collect();
    let mut optimizer = Optimizer::new(&config(case));
    for (step, &lr) in case.lrs.iter().enumerate() {
        let mut loss = Tensor::zeros((), candle_core::DType::F32, &device).unwrap();
        for (param, spec) in params.iter().zip(&case.params) {
            let g =
                Tensor::from_vec(spec.grads[step].clone(), spec.shape.as_slice(), &device).unwrap();
            loss = (loss + (param.tensor() * g).unwrap().sum_all().unwrap()).unwrap();
        }
        let grads = loss.backward().unwrap();
        let steps = optimizer.step(&params, &grads, lr).unwrap();
        if let Some(ratios) = &case.trust_ratios {
            for (i, expected) in ratios[step].iter().enumerate() {
                let got = steps[i].trust_ratio.as_ref().expect("a trust ratio");
                let got = got.to_scalar::<f32>().unwrap() as f64;
                assert!(
                    (got - expected).abs() <= 1e-5 * expected.abs(),
                    "{} step {step} trust ratio of {}: got {got}, expected {expected}",
                    case.name,
                    case.params[i].name
                );
            }
        }
        for (i, param) in params.iter().enumerate() {
            let got = param
                .tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (j, (&g, &e)) in got.iter().zip(&case.expected[step][i]).enumerate() {
                assert!(
                    (g as f64 - e).abs() <= 1e-5 * e.abs() + 1e-7,
                    "{} step {step} {}[{j}]: got {g}, expected {e}",
                    case.name,
                    param.name
                );
            }
        }
    }
}

#[test]
fn every_reference_case_is_replayed_exactly() {
    let vectors = load();
    for case in &vectors.cases {
        replay(case);
    }
    let kinds: std::collections::BTreeSet<&str> = vectors
        .cases
        .iter()
        .map(|c| c.optimizer["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        ["adamw", "lamb", "lars", "sgd"]
    );
}
