#!/usr/bin/env bash
# Regenerates docs/tensorboard-trust-ratios.png and docs/tensorboard-hparams.png:
# TensorBoard showing a LARS run's per-layer trust ratios, and the HParams table
# of a small sweep (SGD and LARS, two rates, two seeds), shot with headless Chromium.
#
# Needs: a .venv with tensorboard (`python3 -m venv .venv && .venv/bin/pip install
# tensorboard==2.21.0`), Debian's chromium (`apt-get install chromium`), and the
# MNIST files in ../shared/data/mnist-t10k. Takes about two minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=target/release/larslab
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

exp=experiments/lars-large-batch.toml
short=(--set train.steps=100 --set train.log_every=5 --set train.eval_every=25)
"$bin" train -q --config "$exp" "${short[@]}" --out "$work/lars" --name lars
for kind in sgd lars; do
  for lr in 0.1 3.2; do
    for seed in 0 1; do
      "$bin" train -q --config "$exp" "${short[@]}" --out "$work/sweep" \
        --name "optimizer.kind=$kind,optimizer.lr=$lr,seed=$seed" \
        --set optimizer.kind=$kind --set optimizer.lr=$lr --set seed=$seed
    done
  done
done

shoot() { # logdir port url-fragment png
  .venv/bin/tensorboard --logdir "$1" --port "$2" >/dev/null 2>&1 &
  for _ in $(seq 60); do curl -sf "http://127.0.0.1:$2/data/runs" >/dev/null && break; sleep 1; done
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$work/chrome-$2" --window-size=1500,1100 --hide-scrollbars \
    --virtual-time-budget=30000 --screenshot="$4" "http://127.0.0.1:$2/$3" 2>/dev/null
}
shoot "$work/lars" 6401 "#custom_scalars" docs/tensorboard-trust-ratios.png
shoot "$work/sweep" 6402 "#hparams" docs/tensorboard-hparams.png
echo "wrote docs/tensorboard-trust-ratios.png docs/tensorboard-hparams.png"
