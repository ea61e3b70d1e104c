#!/usr/bin/env bash
# The GPU check: build with `--features cuda`, then on `device = "cuda"`
#   1. a training run that learns (the built-in MNIST-like experiment),
#   2. LARS parity against the CPU: the same short MLP and CNN runs on both,
#      every logged value (losses, gradient norms, trust ratios, ...) within 1e-4,
#   3. resume: a run stopped halfway and resumed equals one that never stopped,
#   4. `larslab bench --device cuda` for the MLP and CNN cases,
# everything written to one file (default gpu-check.txt; --out FILE); exit 1
# when a check fails. Meant to take under 8 minutes on an H200, most of it the
# build (candle's kernels); not yet run on a GPU. The build needs the crates
# (cargo fetch) and a CUDA toolkit on the machine.
#
#   bench/gpu-check.sh [--out FILE]    # on a GPU machine: nvcc on the PATH, in
#                                      # /usr/local/cuda, or .venv (.ci/cuda-env.sh)
#   bench/gpu-check.sh --dry-run       # the same steps on the CPU, tiny: checks the script
#
# LARSLAB_BIN=path skips the build and uses that binary. CUDA_COMPUTE_CAP
# defaults to the GPU's (nvidia-smi), else 90.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0
out=gpu-check.txt
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --out)
            [ $# -ge 2 ] || { echo "error: --out needs a file" >&2; exit 2; }
            out=$2
            shift
            ;;
        -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "error: unknown argument \`$1\` (expected --dry-run, --out FILE)" >&2; exit 2 ;;
    esac
    shift
done
: >"$out" || { echo "error: cannot write $out" >&2; exit 2; }
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")

start=$SECONDS
failures=0
log() { echo "$*" | tee -a "$out"; }
# Runs a command, its output into the file, timed.
step() {
    local t=$SECONDS
    echo "\$ $*" >>"$out"
    if "$@" >>"$out" 2>&1; then
        log "    ($((SECONDS - t)) s)"
    else
        log "    FAILED (exit $?, $((SECONDS - t)) s): $*"
        return 1
    fi
}
verdict() { # name, status
    if [ "$2" = 0 ]; then log "PASS $1"; else log "FAIL $1"; failures=$((failures + 1)); fi
}

if [ "$dry" = 1 ]; then
    device=cpu
    log "== gpu-check --dry-run: device cpu, tiny sizes ($(date -u +%FT%TZ))"
else
    device=cuda
    log "== gpu-check: device cuda ($(date -u +%FT%TZ))"
    { nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || true; } 2>&1 | tee -a "$out"
fi

# ---- build
if [ -n "${LARSLAB_BIN:-}" ]; then
    bin=$LARSLAB_BIN
elif [ "$dry" = 1 ]; then
    log "-- build (cargo build --release)"
    step cargo build --release
    bin=target/release/larslab
else
    if ! command -v nvcc >/dev/null; then
        if [ -x /usr/local/cuda/bin/nvcc ]; then
            export PATH=/usr/local/cuda/bin:$PATH CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
        else
            # shellcheck source=../.ci/cuda-env.sh
            . .ci/cuda-env.sh
        fi
    fi
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ' || true)
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-${cap:-90}}
    log "-- build (cargo build --release --features cuda, CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, $(nvcc --version | tail -n 1))"
    step cargo build --release --features cuda --target-dir target/cuda
    bin=target/cuda/release/larslab
fi
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
train() { step "$bin" train --quiet --out "$work" "$@"; }

# Compares two runs' metrics.jsonl: every numeric value at every step within
# rel (relative, plus 1e-6 absolute); prints the largest difference.
compare_metrics() { # a b rel
    python3 - "$1" "$2" "$3" >>"$out" 2>&1 <<'PY'
import json, sys
a, b, rel = sys.argv[1], sys.argv[2], float(sys.argv[3])
load = lambda run: [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
ra, rb = load(a), load(b)
if [r["step"] for r in ra] != [r["step"] for r in rb]:
    sys.exit(f"the runs logged different steps: {len(ra)} and {len(rb)} records")
worst, where, n, bad = 0.0, "all equal", 0, 0
for x, y in zip(ra, rb):
    if x.keys() != y.keys():
        sys.exit(f"step {x['step']}: different tags")
    for k, u in x.items():
        v = y[k]
        if not isinstance(u, (int, float)) or not isinstance(v, (int, float)):
            if u != v:
                bad += 1
            continue
        n += 1
        d = abs(u - v) / (max(abs(u), abs(v)) + 1e-6 / rel)
        if d > worst:
            worst, where = d, f"step {x['step']} {k}: {u!r} vs {v!r}"
        if not abs(u - v) <= rel * max(abs(u), abs(v)) + 1e-6:
            bad += 1
print(f"    {n} values compared, {bad} outside {rel:g}; largest relative difference {worst:.3g} ({where})")
sys.exit(1 if bad else 0)
PY
}

# ---- 1. a training run that learns
if [ "$dry" = 1 ]; then
    learn=(--set data.n_train=2000 --set train.steps=150 --set train.eval_every=50)
    want=0.5
else
    learn=(--set train.steps=1000)
    want=0.95
fi
log "-- 1. the built-in experiment learns on $device (${learn[*]})"
status=0
train --name learns --set "device=\"$device\"" "${learn[@]}" || status=1
if [ $status = 0 ]; then
    acc=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["final_val_accuracy"])' "$work/learns/summary.json")
    log "    final validation accuracy $acc (needs >= $want)"
    python3 -c "import sys; sys.exit(0 if float('$acc') >= $want else 1)" || status=1
fi
verdict "learns: validation accuracy >= $want" $status

# ---- 2. LARS parity against the CPU
mlp=(--set data.kind=teacher --set data.n_train=2000 --set 'model.hidden=[256,256]'
    --set optimizer.kind=lars --set optimizer.lr=1.0 --set optimizer.weight_decay=0.0005
    --set train.steps=30 --set train.log_every=1 --set train.eval_every=10
    --set diagnostics.every=10 --set log.tensorboard=false)
cnn=(--set data.kind=mnist-like --set data.n_train=1000 --set model.kind=cnn
    --set 'model.conv=[[8,5],[16,5]]' --set model.batch_norm=true --set 'model.hidden=[64]'
    --set optimizer.kind=lars --set optimizer.lr=1.0 --set data.batch_size=64
    --set train.steps=15 --set train.log_every=1 --set train.eval_every=5
    --set log.tensorboard=false)
for model in mlp cnn; do
    declare -n opts=$model
    log "-- 2. LARS parity, $model: cpu against $device, every step's metrics within 1e-4"
    status=0
    train --name "$model-cpu" --set 'device="cpu"' "${opts[@]}" || status=1
    train --name "$model-$device" --set "device=\"$device\"" "${opts[@]}" || status=1
    [ $status = 0 ] && { compare_metrics "$work/$model-cpu" "$work/$model-$device" 1e-4 || status=1; }
    tail -n 1 "$out"
    verdict "LARS parity ($model, cpu vs $device, 1e-4)" $status
done

# ---- 3. resume
log "-- 3. resume on $device: 40 steps, against 20 resumed to 40"
res=(--set "device=\"$device\"" --set data.kind=teacher --set data.n_train=2000
    --set 'model.hidden=[128]' --set model.dropout=0.1 --set optimizer.kind=lars
    --set optimizer.lr=1.0 --set train.log_every=1 --set train.eval_every=10
    --set log.tensorboard=false)
status=0
train --name whole "${res[@]}" --set train.steps=40 || status=1
train --name halves "${res[@]}" --set train.steps=20 || status=1
step "$bin" train --quiet --resume "$work/halves" --set train.steps=40 || status=1
if [ $status = 0 ]; then
    if cmp -s "$work/whole/metrics.jsonl" "$work/halves/metrics.jsonl"; then
        log "    metrics.jsonl identical, byte for byte"
    else
        compare_metrics "$work/whole" "$work/halves" 1e-6 || status=1
        tail -n 1 "$out"
    fi
fi
verdict "resume (40 steps = 20 + resumed 20)" $status

# ---- 4. bench
if [ "$dry" = 1 ]; then
    cases=(mlp-256-b128 cnn-bn-b128)
    plan=(--steps 2 --repeats 1 --warmup 1)
else
    cases=(mlp-1024-b128 mlp-1024-b1024 mlp-256-b128 deep30-b128 cnn-bn-b128 cnn-bn-b1024)
    plan=()
fi
log "-- 4. larslab bench --device $device (${cases[*]})"
status=0
for c in "${cases[@]}"; do
    step "$bin" bench --device "$device" --case "$c" "${plan[@]}" || status=1
done
grep -E '^(case|mlp|deep|cnn)' "$out" | grep -v '^\$' | tail -n $((5 * ${#cases[@]})) || true
verdict "bench ($device)" $status

log "== $((SECONDS - start)) s, $failures failed; everything in $out"
[ $failures = 0 ]
