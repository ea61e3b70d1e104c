//! The MLP's hand-written backward pass against candle's autograd: every
//! parameter's gradient and every pre-activation's, for every activation,
//! with and without dropout, to 1e-5.

use candle_core::{Device, Tensor};
use rand::Rng as _;

use larslab::config::{Activation, ModelConfig};
use larslab::model::Model;
use larslab::rng::{self, Stream};
use larslab::train::step::{by_hand, with_autograd};

fn assert_close(what: &str, a: &Tensor, b: &Tensor) {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * scale.max(1e-12),
            "{what}[{i}]: {x} by hand, {y} by autograd (largest {scale})"
        );
    }
}

#[test]
fn hand_gradients_equal_autograd() {
    let device = Device::Cpu;
    let mut data = rng::stream(7, Stream::Data);
    let (n, features, classes) = (16, 12, 5);
    let x: Vec<f32> = (0..n * features)
        .map(|_| data.random::<f32>() * 2.0 - 1.0)
        .collect();
    let y: Vec<u32> = (0..n)
        .map(|_| data.random_range(0..classes as u32))
        .collect();
    let x = Tensor::from_vec(x, (n, features), &device).unwrap();
    let y = Tensor::from_vec(y, n, &device).unwrap();
    for activation in [
        Activation::Relu,
        Activation::LeakyRelu,
        Activation::Tanh,
        Activation::Sigmoid,
        Activation::Gelu,
        Activation::Selu,
        Activation::Identity,
    ] {
        for dropout in [0.0, 0.3] {
            let config = ModelConfig {
                hidden: vec![10, 9, 8],
                activation,
                dropout,
                bias_init: 0.05,
                ..ModelConfig::default()
            };
            let model = Model::new(&config, &[features], classes, 3, &device).unwrap();
            let batch = (&x, &y);
            let ours = by_hand(&model, batch, &mut rng::stream(1, Stream::Dropout)).unwrap();
            let theirs =
                with_autograd(&model, batch, &mut rng::stream(1, Stream::Dropout), true).unwrap();
            let case = format!("{activation:?}, dropout {dropout}");
            assert!(
                (ours.loss - theirs.loss).abs() <= 1e-6 * theirs.loss,
                "{case}: loss"
            );
            let (g_ours, g_theirs) = (ours.grads.unwrap(), theirs.grads.unwrap());
            for param in model.params() {
                assert_close(
                    &format!("{case}: {}", param.name),
                    g_ours.get(param.tensor()).unwrap(),
                    g_theirs.get(param.tensor()).unwrap(),
                );
            }
            let (t_ours, t_theirs) = (ours.trace.unwrap(), theirs.trace.unwrap());
            assert_eq!(t_ours.preact_grads.len(), 4);
            for (i, (a, b)) in t_ours
                .preact_grads
                .iter()
                .zip(&t_theirs.preact_grads)
                .enumerate()
            {
                assert_close(&format!("{case}: dL/dz{}", i + 1), a, b);
            }
        }
    }
}
