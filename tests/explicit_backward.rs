//! The MLP's hand-written backward passes (candle operations, and the fused
//! CPU passes) against candle's autograd: every parameter's gradient, every
//! pre-activation's, and what the trace keeps of the forward pass, for every
//! activation, with and without dropout, to 1e-5. Layers wider than 32 units
//! make the fused passes split their work between threads; layers of 1024
//! and 512 units at batch 512 make them finish each product block by block
//! and pack the operands every part reads ahead, once. The fused CNN pass
//! likewise, against autograd through candle's operations and larslab's
//! custom ops, with BatchNorm's running statistics; and its bits on 1, 2
//! and 3 threads.

use candle_core::{Device, Tensor};
use rand::Rng as _;

use larslab::config::{Activation, ModelConfig, ModelKind, Padding, Pool};
use larslab::model::Model;
use larslab::ops::Recycled;
use larslab::rng::{self, Stream};
use larslab::train::step::{Backward, Gradients, by_hand, fused_pass, with_autograd};

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
    let (rows, features, classes) = (512, 50, 5);
    let x: Vec<f32> = (0..rows * features)
        .map(|_| data.random::<f32>() * 2.0 - 1.0)
        .collect();
    let y: Vec<u32> = (0..rows)
        .map(|_| data.random_range(0..classes as u32))
        .collect();
    let x = Tensor::from_vec(x, (rows, features), &device).unwrap();
    let y = Tensor::from_vec(y, rows, &device).unwrap();
    for activation in [
        Activation::Relu,
        Activation::LeakyRelu,
        Activation::Tanh,
        Activation::Sigmoid,
        Activation::Gelu,
        Activation::Selu,
        Activation::Identity,
    ] {
        for (n, dropout, hidden) in [
            (16, 0.0, vec![10, 9, 8]),
            (16, 0.3, vec![10, 9, 8]),
            (16, 0.3, vec![40, 33, 17]),
            (512, 0.3, vec![1024, 512]),
        ] {
            let config = ModelConfig {
                hidden,
                activation,
                dropout,
                bias_init: 0.05,
                ..ModelConfig::default()
            };
            let model = Model::new(&config, &[features], classes, 3, &device).unwrap();
            let (x, y) = (x.narrow(0, 0, n).unwrap(), y.narrow(0, 0, n).unwrap());
            let batch = (&x, &y);
            let theirs =
                with_autograd(&model, batch, &mut rng::stream(1, Stream::Dropout), true).unwrap();
            let dropout_rng = || rng::stream(1, Stream::Dropout);
            let candle_ops = by_hand(&model, batch, &mut dropout_rng()).unwrap();
            let fused = fused_pass(&model, batch, &mut dropout_rng(), true).unwrap();
            assert!(fused.grad_norms.is_some(), "the fused pass takes ‖g‖");
            for (way, ours) in [("candle ops", candle_ops), ("fused", fused)] {
                let case = format!(
                    "{way}, {activation:?}, dropout {dropout}, {:?}",
                    config.hidden
                );
                assert_same_pass(&case, &model, ours, &theirs);
            }
        }
    }
}

fn assert_same_pass(case: &str, model: &Model, ours: Gradients, theirs: &Gradients) {
    assert_same_pass_but(case, model, ours, theirs, &[]);
}

/// [`assert_same_pass`], where the parameters `vanishing` have a gradient
/// that is zero but for rounding (a convolution's bias before BatchNorm):
/// both passes' must be below 1e-5 of the largest gradient.
fn assert_same_pass_but(
    case: &str,
    model: &Model,
    ours: Gradients,
    theirs: &Gradients,
    vanishing: &[String],
) {
    assert!(
        (ours.loss - theirs.loss).abs() <= 1e-6 * theirs.loss,
        "{case}: loss {} vs {}",
        ours.loss,
        theirs.loss
    );
    assert_close(&format!("{case}: logits"), &ours.logits, &theirs.logits);
    let (g_ours, g_theirs) = (ours.grads.unwrap(), theirs.grads.as_ref().unwrap());
    let largest = model
        .params()
        .iter()
        .map(|p| {
            let g = g_theirs.get(p.tensor()).unwrap();
            g.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0f32, f32::max);
    for (i, param) in model.params().iter().enumerate() {
        let (a, b) = (
            g_ours.get(param.tensor()).unwrap(),
            g_theirs.get(param.tensor()).unwrap(),
        );
        if vanishing.contains(&param.name) {
            for g in [a, b] {
                let g = g
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(g <= 1e-5 * largest, "{case}: ∂{} = {g}", param.name);
            }
            continue;
        }
        assert_close(&format!("{case}: {}", param.name), a, b);
        // The norms the fused pass takes on the way, for LARS.
        if let Some(norms) = &ours.grad_norms {
            let exact = b.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
            let exact = exact.to_scalar::<f32>().unwrap();
            assert!(
                (norms[i] - exact).abs() <= 1e-5 * exact.max(1e-12),
                "{case}: ‖∂{}‖ {} vs {exact}",
                param.name,
                norms[i]
            );
        }
    }
    let (t_ours, t_theirs) = (ours.trace.unwrap(), theirs.trace.as_ref().unwrap());
    assert_eq!(t_ours.layers, t_theirs.layers, "{case}");
    assert_eq!(t_ours.preact_grads.len(), model.layers(), "{case}");
    let pairs = [
        ("dL/dz", &t_ours.preact_grads, &t_theirs.preact_grads),
        ("z", &t_ours.preacts, &t_theirs.preacts),
        ("h", &t_ours.acts, &t_theirs.acts),
        ("input", &t_ours.inputs, &t_theirs.inputs),
    ];
    for (what, a, b) in pairs {
        assert_eq!(a.len(), b.len(), "{case}: {what}");
        for (i, (a, b)) in a.iter().zip(b).enumerate() {
            assert_close(&format!("{case}: {what}{}", i + 1), a, b);
        }
    }
    assert_eq!(t_ours.masks.len(), t_theirs.masks.len(), "{case}: masks");
    for (a, b) in t_ours.masks.iter().zip(&t_theirs.masks) {
        match (a, b) {
            (Some(a), Some(b)) => assert_close(&format!("{case}: mask"), a, b),
            (None, None) => {}
            _ => panic!("{case}: one pass has a dropout mask, the other not"),
        }
    }
}

fn random_batch(rows: usize, features: usize, classes: usize) -> (Tensor, Tensor) {
    let mut data = rng::stream(7, Stream::Data);
    let x: Vec<f32> = (0..rows * features)
        .map(|_| data.random::<f32>() * 2.0 - 1.0)
        .collect();
    let y: Vec<u32> = (0..rows)
        .map(|_| data.random_range(0..classes as u32))
        .collect();
    (
        Tensor::from_vec(x, (rows, features), &Device::Cpu).unwrap(),
        Tensor::from_vec(y, rows, &Device::Cpu).unwrap(),
    )
}

fn cnn(conv: Vec<[usize; 2]>, activation: Activation, pool: Pool, padding: Padding) -> ModelConfig {
    ModelConfig {
        kind: ModelKind::Cnn,
        conv,
        hidden: vec![24],
        activation,
        pool,
        padding,
        dropout: 0.2,
        bias_init: 0.05,
        ..ModelConfig::default()
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The fused CNN pass against autograd: gradients, the trace, ‖g‖ and the
/// running statistics, for BatchNorm on and off, every pooling, both
/// paddings, four activations. 25 images of 16×16 with 'same' padding are
/// five tasks of conv1 (6 images each, the last short) and two of conv2.
#[test]
fn fused_cnn_gradients_equal_autograd() {
    let _alone = RECYCLED.lock().unwrap_or_else(|e| e.into_inner());
    let (side, classes) = (16, 4);
    let (x, y) = random_batch(25, side * side, classes);
    // 6 and 8 channels take the pass's loops whose length is read at run
    // time; 16 and 32, those compiled for a constant channel count.
    let (narrow, wide) = (vec![[6, 3], [8, 5]], vec![[16, 3], [32, 3]]);
    let cases = [
        (&narrow, Activation::Relu, Pool::Max, Padding::Same, true),
        (&narrow, Activation::Relu, Pool::Max, Padding::Same, false),
        (&narrow, Activation::Tanh, Pool::Avg, Padding::Valid, true),
        (&narrow, Activation::Gelu, Pool::None, Padding::Valid, true),
        (
            &narrow,
            Activation::LeakyRelu,
            Pool::Max,
            Padding::Valid,
            false,
        ),
        (&wide, Activation::Relu, Pool::Max, Padding::Same, true),
        (&wide, Activation::Tanh, Pool::Avg, Padding::Valid, false),
        (&wide, Activation::Gelu, Pool::None, Padding::Same, true),
    ];
    for (conv, activation, pool, padding, batch_norm) in cases {
        let config = ModelConfig {
            batch_norm,
            ..cnn(conv.clone(), activation, pool, padding)
        };
        let case =
            format!("{conv:?}, {activation:?}, {pool:?}, {padding:?}, batch norm {batch_norm}");
        let model = Model::new(&config, &[side, side], classes, 3, &Device::Cpu).unwrap();
        let start: Vec<Vec<f32>> = model.buffers().iter().map(|b| values(b.tensor())).collect();
        let dropout_rng = || rng::stream(1, Stream::Dropout);
        let theirs = with_autograd(&model, (&x, &y), &mut dropout_rng(), true).unwrap();
        let running: Vec<Vec<f32>> = model.buffers().iter().map(|b| values(b.tensor())).collect();
        for (buffer, start) in model.buffers().iter().zip(&start) {
            let start = Tensor::from_slice(start, buffer.tensor().dims(), &Device::Cpu).unwrap();
            buffer.var.set(&start).unwrap();
        }
        // The reused buffers hold NaN: a value the pass does not write shows.
        Recycled::poison_free_buffers();
        let ours = fused_pass(&model, (&x, &y), &mut dropout_rng(), true).unwrap();
        for (buffer, theirs) in model.buffers().iter().zip(&running) {
            let theirs = Tensor::from_slice(theirs, buffer.tensor().dims(), &Device::Cpu).unwrap();
            assert_close(
                &format!("{case}: {}", buffer.name),
                buffer.tensor(),
                &theirs,
            );
        }
        let vanishing: Vec<String> = (1..=2)
            .filter(|_| batch_norm)
            .map(|n| format!("conv{n}.bias"))
            .collect();
        assert_same_pass_but(&case, &model, ours, &theirs, &vanishing);
    }
}

/// Held by the tests that poison the free buffers of [`Recycled`] (which
/// the tests of this file share), so that each reuses the buffers it poisoned.
static RECYCLED: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The fused CNN pass gives the same bits on 1, 2 and 3 threads, and
/// reads no value of its reused buffers that it did not write: each pass
/// runs on buffers set to NaN.
#[test]
fn fused_cnn_bits_do_not_depend_on_the_thread_count() {
    let _alone = RECYCLED.lock().unwrap_or_else(|e| e.into_inner());
    let (side, classes) = (28, 10);
    let (x, y) = random_batch(9, side * side, classes);
    let config = ModelConfig {
        batch_norm: true,
        ..cnn(
            vec![[16, 5], [32, 5]],
            Activation::Relu,
            Pool::Max,
            Padding::Same,
        )
    };
    let model = Model::new(&config, &[side, side], classes, 3, &Device::Cpu).unwrap();
    let grads = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            Recycled::poison_free_buffers();
            let pass = fused_pass(
                &model,
                (&x, &y),
                &mut rng::stream(1, Stream::Dropout),
                false,
            );
            let pass = pass.unwrap();
            let grads = pass.grads.unwrap();
            let mut all: Vec<Vec<f32>> = model
                .params()
                .iter()
                .map(|p| values(grads.get(p.tensor()).unwrap()))
                .collect();
            all.push(pass.grad_norms.unwrap());
            all
        })
    };
    // A first pass leaves its buffers on the free list, so that the passes
    // compared below all run on reused, poisoned ones.
    grads(1);
    let one = grads(1);
    for threads in [2, 3] {
        assert!(one == grads(threads), "{threads} threads differ from 1");
    }
}

/// A model on the CPU takes the fused pass, an MLP's and a CNN's alike; the
/// choice is the model's, made once (the trainer keeps it).
#[test]
fn models_on_the_cpu_take_the_fused_pass() {
    let mlp = Model::new(&ModelConfig::default(), &[28, 28], 10, 1, &Device::Cpu).unwrap();
    let conv = cnn(vec![[4, 3]], Activation::Relu, Pool::Max, Padding::Same);
    let cnn = Model::new(&conv, &[16, 16], 4, 1, &Device::Cpu).unwrap();
    for model in [&mlp, &cnn] {
        assert_eq!(Backward::for_model(model), Backward::Fused);
    }
}
