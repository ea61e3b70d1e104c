#!/usr/bin/env python3
"""The runs that chose the divergence detector's defaults, and that check them.

Each case is a short `larslab train` on the real MNIST test set
(../shared/data/mnist-t10k, 8,000 training images) with the detector's
defaults. Broken runs must be flagged within 15 steps of the point where their
loss passes 2·ln(10) or turns non-finite (or, for a collapse without a spike,
soon after every unit of a layer died); healthy runs must not be flagged.

    python3 bench/divergence_cases.py [--larslab target/release/larslab] [--only NAME,...]
        [--set KEY=VALUE]... [--rescue]

`--rescue` runs the broken cases with `divergence.action = "rescue"` and
reports which rung of the ladder recovered each. Prints one line per case
and a markdown table at the end.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "mnist-t10k"))

BASE = [
    'data.kind="idx"',
    f'data.images="{MNIST}/t10k-images-idx3-ubyte.gz"',
    f'data.labels="{MNIST}/t10k-labels-idx1-ubyte.gz"',
    "data.val_fraction=0.2",
    "data.batch_size=128",
    "model.hidden=[256,256]",
    "model.activation=relu",
    "model.init=he_normal",
    "optimizer.kind=sgd",
    "optimizer.lr=0.1",
    "optimizer.momentum=0.9",
    'schedule.kind="constant"',
    "train.log_every=1",
    "train.eval_every=1000000",
]

DEEP30 = "model.hidden=[" + ",".join(["256"] * 30) + "]"
DEEP_TANH = "model.hidden=[" + ",".join(["256"] * 10) + "]"

# name, broken?, overrides, what it shows
CASES = [
    ("sgd-lr60", True, ["optimizer.lr=60", "train.steps=100"],
     "momentum SGD at lr 60: loss 464 at step 4"),
    ("sgd-lr1e4-nan", True, ["optimizer.lr=1e4", "train.steps=100"],
     "a rate so high the loss turns non-finite"),
    ("rescue-demo-sgd-lr1", True,
     ["optimizer.lr=1.0", "schedule.warmup_steps=100", "train.steps=300"],
     "experiments/rescue-after-divergence.toml: warm-up to lr 1.0"),
    ("sgd-b4096-linear", True,
     ["data.batch_size=4096", "optimizer.lr=3.2", "schedule.kind=poly", "schedule.power=2.0",
      "schedule.warmup_steps=10", "train.steps=120"],
     "SGD at the linearly scaled rate at batch 4096: every ReLU dies, loss stays at ln 10"),
    ("lars-constant-late", True,
     ["optimizer.kind=lars", "optimizer.lr=2.0", "optimizer.trust_coefficient=0.01",
      "schedule.warmup_steps=100", "train.steps=600"],
     "LARS at a constant rate: the loss creeps from 0.4 back to chance after step 150"),
    ("sigmoid-lr20", True, ["model.activation=sigmoid", "optimizer.lr=20", "train.steps=200"],
     "sigmoid at lr 20: the units saturate and the loss sits at chance, no lasting spike"),
    ("lamb-lr1", True, ["optimizer.kind=lamb", "optimizer.lr=1.0", "optimizer.momentum=0.9",
                        "train.steps=300"],
     "LAMB at lr 1"),
    ("deep-tanh-lr", True,
     ["model.activation=tanh", "model.init=xavier_normal", DEEP_TANH, "optimizer.lr=2.0",
      "train.steps=300"],
     "a 10-layer tanh net at lr 2"),
    ("adamw-lr1", True, ["optimizer.kind=adamw", "optimizer.lr=1.0", "train.steps=300"],
     "AdamW at lr 1"),
    # healthy
    ("sgd-good", False, ["train.steps=1000"], "momentum SGD at lr 0.1"),
    ("batch-8", False, ["data.batch_size=8", "optimizer.lr=0.02", "train.steps=2000"],
     "batch 8: a very noisy loss"),
    ("tiny-set-zero-loss", False,
     ['data.kind="mnist-like"', "data.n_train=250", "data.val_fraction=0.2",
      "data.batch_size=50", "train.steps=1500"],
     "200 training digits driven to a near-zero loss"),
    ("adamw-high", False, ["optimizer.kind=adamw", "optimizer.lr=0.005", "train.steps=1000"],
     "AdamW at a high but workable rate, with bumps"),
    ("lars-recipe", False,
     ["data.batch_size=4096", "optimizer.kind=lars", "optimizer.lr=3.2",
      "optimizer.trust_coefficient=0.01", 'optimizer.denominator="paper"',
      "optimizer.exclude_1d=true", "schedule.kind=poly", "schedule.power=2.0",
      "schedule.warmup_steps=10", "train.steps=200"],
     "LARS's own large-batch recipe (experiments/lars-large-batch.toml)"),
    ("xavier-relu-30", False,
     [DEEP30, "model.init=xavier_normal", "optimizer.lr=0.01", "train.steps=600"],
     "30 Xavier ReLU layers: at chance with tiny gradients for hundreds of steps"),
]


def first_step_over(metrics, threshold):
    for m in metrics:
        loss = m.get("loss/train")
        if loss is None:
            continue
        if not math.isfinite(loss) or loss > threshold:
            return m["step"]
    return None


def margins(metrics, early_steps=10):
    """How close a run came to each step-0 rule: the largest loss over
    max(ln 10, first loss), the largest global gradient norm over its early
    median, and the smallest layer gradient norm over its early median while
    the loss was above ln(10)/2."""
    losses = [m["loss/train"] for m in metrics if "loss/train" in m]
    grads = [m["grad_norm/global"] for m in metrics if "grad_norm/global" in m]
    if not losses:
        return {}
    reference = max(math.log(10), losses[0])
    out = {"loss/ref": max(losses) / reference}
    if len(grads) > early_steps:
        early = sorted(grads[:early_steps])[early_steps // 2]
        out["grad/early"] = max(grads[early_steps:]) / early
    layers = sorted({k.split("/")[1].split(".")[0] for m in metrics for k in m
                     if k.startswith("grad_norm/") and k != "grad_norm/global"})
    def layer_norm(m, layer):
        parts = [v for k, v in m.items() if k.startswith(f"grad_norm/{layer}.")]
        return math.sqrt(sum(v * v for v in parts)) if parts else None
    lowest = None
    for layer in layers:
        series = [(m.get("loss/train"), layer_norm(m, layer)) for m in metrics]
        series = [(l, g) for l, g in series if l is not None and g is not None]
        if len(series) <= early_steps:
            continue
        early = sorted(g for _, g in series[:early_steps])[early_steps // 2]
        if early <= 0:
            continue
        for loss, g in series[early_steps:]:
            if loss > 0.5 * math.log(10):
                ratio = g / early
                lowest = ratio if lowest is None else min(lowest, ratio)
    if lowest is not None:
        out["layer/early"] = lowest
    return out


def run(larslab, out, name, overrides, extra):
    args = [larslab, "train", "--quiet", "--out", out, "--name", name]
    for o in BASE + overrides + extra:
        args += ["--set", o]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name}: larslab exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def read_run(path):
    with open(os.path.join(path, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(path, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    return summary, metrics


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--larslab", default=os.path.join(ROOT, "target/release/larslab"))
    parser.add_argument("--only", default="")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--rescue", action="store_true")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    out = tempfile.mkdtemp(prefix="larslab-divergence-")
    threshold = 2 * math.log(10)
    rows = []
    for name, broken, overrides, what in CASES:
        if only and name not in only:
            continue
        if args.rescue and not broken:
            continue
        extra = list(args.set)
        if args.rescue:
            extra.append('divergence.action="rescue"')
        stdout = run(args.larslab, out, name, overrides, extra)
        summary, metrics = read_run(os.path.join(out, name))
        v = summary.get("divergence") or {}
        passed = first_step_over(metrics, threshold)
        flagged = v.get("step")
        lag = flagged - passed if (flagged is not None and passed is not None) else None
        if broken:
            ok = flagged is not None and (lag is None or lag <= 15)
        else:
            ok = flagged is None
        rescue = ""
        if args.rescue:
            tried = summary.get("rescued_by", [])
            rescue = "; ".join(
                f"{t['rung']} from {t['from_step']}: "
                + ("recovered" if t["recovered"] else
                   f"diverged at {t['diverged_at_step']}" if t["diverged_at_step"] is not None
                   else "not recovered")
                for t in tried)
            ok = any(t["recovered"] for t in tried)
            last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
            acc = last.split("final val accuracy ")[-1].split(",")[0] if "final val" in last else ""
            rescue += f" [{acc}]"
        row = dict(case=name, broken=broken, rule=v.get("rule", "-"), flagged=flagged,
                   onset=v.get("onset_step"), passed_2lnC=passed, lag=lag,
                   layer=",".join(v.get("layers", [])) or "-", signal=v.get("layer_signal") or "",
                   ok=ok, rescue=rescue, what=what,
                   margins={k: float(f"{v:.3g}") for k, v in margins(metrics).items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    if args.rescue:
        print("| case | rule | flagged at | rescues (rung from step: result) [final val acc] | ok |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['case']} | {r['rule']} | {r['flagged']} | {r['rescue']} | "
                  f"{'yes' if r['ok'] else '**no**'} |")
    else:
        print("| case | broken | rule | flagged at | onset | loss > 2 ln 10 at | lag | first layer | ok "
              "| max loss / ref | max ‖g‖ / early | min layer ‖g‖ / early |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['case']} | {'yes' if r['broken'] else 'no'} | {r['rule']} | "
                  f"{r['flagged'] if r['flagged'] is not None else '-'} | "
                  f"{r['onset'] if r['onset'] is not None else '-'} | "
                  f"{r['passed_2lnC'] if r['passed_2lnC'] is not None else '-'} | "
                  f"{r['lag'] if r['lag'] is not None else '-'} | {r['layer']} | "
                  f"{'yes' if r['ok'] else '**no**'} | {r['margins'].get('loss/ref', '-')} | "
                  f"{r['margins'].get('grad/early', '-')} | {r['margins'].get('layer/early', '-')} |")
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
