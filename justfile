# larslab launcher: every recipe is a plain cargo or shell command underneath.

# Train one experiment: `just train` (built-in default) or `just train experiments/x.toml --set optimizer.lr=0.5`
train config="" *args="":
    cargo run --release -- train {{ if config == "" { "" } else { "--config " + config } }} {{args}}

# The test suite, as CI runs it
test:
    cargo test --release

# TensorBoard over every run (pip install tensorboard)
tb logdir="runs":
    tensorboard --logdir {{logdir}}

# Format and lint
check:
    cargo fmt --check
    cargo clippy --release --all-targets -- -D warnings

# LARS against momentum SGD at batch 4096 on MNIST t10k (experiments/lars-large-batch.toml)
lars-vs-sgd:
    cargo run --release -- train --config experiments/lars-large-batch.toml --name lars-large-batch-lars
    cargo run --release -- train --config experiments/lars-large-batch.toml --name lars-large-batch-sgd --set optimizer.kind=sgd
    cargo run --release -- train --config experiments/lars-large-batch.toml --name lars-large-batch-sgd-unscaled --set optimizer.kind=sgd --set optimizer.lr=0.1

# A diverging SGD run rescued three ways, against LARS from the start (experiments/rescue-after-divergence.toml)
rescue-demo:
    cargo run --release -- train --config experiments/rescue-after-divergence.toml
    cargo run --release -- rescue runs/rescue-after-divergence --set optimizer.kind=lars --set optimizer.trust_coefficient=0.01
    cargo run --release -- rescue runs/rescue-after-divergence --set optimizer.kind=lars --set optimizer.trust_coefficient=0.01 --set optimizer.clip=true
    cargo run --release -- rescue runs/rescue-after-divergence --set optimizer.lr=0.3
    cargo run --release -- train --config experiments/rescue-after-divergence.toml --name lars-from-start --set optimizer.kind=lars --set optimizer.trust_coefficient=0.01

# The isometry grid of experiments/isometry-probe.toml: tanh+orthogonal, tanh+Gaussian, ReLU+Gaussian at depths 8, 32, 64
isometry:
    #!/usr/bin/env bash
    set -euo pipefail
    for depth in 8 32 64; do
      hidden="[$(printf '256,%.0s' $(seq $depth) | sed 's/,$//')]"
      for variant in "tanh orthogonal" "tanh xavier_normal" "relu he_normal"; do
        set -- $variant
        cargo run --release -q -- probe --config experiments/isometry-probe.toml --name "$1-$2-$depth" \
          --set model.activation=$1 --set model.init=$2 --set "model.hidden=$hidden" | tail -2 | head -1
      done
    done

# Fuzz the IDX parser (needs `cargo install cargo-fuzz` and a nightly toolchain)
fuzz-idx seconds="60":
    cargo +nightly fuzz run idx -- -max_total_time={{seconds}}

# Training-step throughput of the bench cases, SGD and LARS, measurements off and on: `just bench --case mlp-256-b128 --steps 10`
bench *args="":
    cargo run --release -- bench {{args}}

# larslab against the JAX reference on this CPU (bench/README.md): `just bench-compare ~/jaxenv/bin/python --case deep30-b128`
bench-compare python="python3" *args="":
    cargo build --release
    {{python}} bench/compare.py --python {{python}} {{args}}

# CNN with and without BatchNorm, SGD and LARS, at batch 4096 and 128 (experiments/cnn-bn-large-batch.toml)
cnn-bn:
    cargo run --release -- sweep --config experiments/cnn-bn-large-batch.toml
    cargo run --release -- sweep --config experiments/cnn-bn-large-batch.toml --name cnn-bn-small-batch --set data.batch_size=128 --set optimizer.lr=0.1 --set train.steps=1560
    cargo run --release -- compare runs/cnn-bn-large-batch-sweep runs/cnn-bn-small-batch --sort final_val_accuracy

# The divergence detector's cases on MNIST t10k (broken runs flagged early, healthy ones not); --rescue: the ladder
divergence-cases *args="":
    cargo build --release
    python3 bench/divergence_cases.py {{args}}
