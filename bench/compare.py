#!/usr/bin/env python3
"""larslab's training-step throughput against the JAX reference, as a markdown table.

Runs `target/release/larslab bench --format json` and
`bench/jax_reference.py --format json` one after the other with the same
settings (cases, steps, repeats, warm-up, threads), or reads their JSON
from files (`--larslab FILE`, `--jax FILE`), and prints, per case and
optimizer, larslab's steps/s with measurements off and on, JAX's steps/s,
and larslab / JAX for each (>= 1.00: larslab is at least as fast).

JAX usually lives in a virtual environment: pass its interpreter with
`--python ~/jaxenv/bin/python` (see bench/README.md). Standard library only;
larslab itself must already be built (`cargo build --release`).
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The cases bench/jax_reference.py implements.
JAX_CASES = ["mlp-1024-b128", "mlp-1024-b1024", "mlp-256-b128", "deep30-b128", "cnn-bn-b128", "cnn-bn-b1024"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--larslab", metavar="FILE", help="read larslab's results (`larslab bench --format json`) instead of running it")
    p.add_argument("--jax", metavar="FILE", help="read the JAX results (`jax_reference.py --format json`) instead of running it")
    p.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "larslab"), help="the larslab binary (target/release/larslab)")
    p.add_argument("--python", default=sys.executable, help="the interpreter that has jax (default: this one)")
    p.add_argument("--case", help="one case (default: all)")
    p.add_argument("--steps", type=int, help="timed steps per repeat (the benchmarks' default: 20)")
    p.add_argument("--repeats", type=int, help="timed repeats, median reported (default: 5)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: 5)")
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="threads for both: RAYON_NUM_THREADS for larslab (the pool of its training step), --threads for JAX (2)",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds of (larslab, JAX) per case, median reported (3)")
    p.add_argument("--save", metavar="DIR", help="also write the raw results to DIR/larslab.json and DIR/jax.json")
    return p.parse_args(argv)


def shared_options(args, names=("case", "steps", "repeats", "warmup")):
    out = []
    for name in names:
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name}", str(value)]
    return out


def run_json(command, env, what, hint):
    print(f"running {what}: {' '.join(command)}", file=sys.stderr)
    try:
        done = subprocess.run(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    except OSError as e:
        sys.exit(f"compare.py: cannot run {what} ({e}); {hint}")
    if done.returncode != 0:
        sys.exit(f"compare.py: {what} failed with exit status {done.returncode}; {hint}")
    return parse_results(done.stdout, what)


def parse_results(text, what):
    try:
        results = json.loads(text[text.index("[") :])
    except ValueError as e:
        sys.exit(f"compare.py: {what} did not give a JSON list of results ({e})")
    return results


def read_json(path, what):
    try:
        with open(path) as f:
            return parse_results(f.read(), what)
    except OSError as e:
        sys.exit(f"compare.py: cannot read {what} results: {e}")


def larslab_run(args, case):
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    timing = shared_options(args, ("steps", "repeats", "warmup"))
    command = [args.binary, "bench", "--format", "json", *timing, "--case", case]
    return run_json(command, env, "larslab", "build it first with `cargo build --release`, or pass --binary")


def jax_run(args, case):
    script = os.path.join(ROOT, "bench", "jax_reference.py")
    timing = shared_options(args, ("steps", "repeats", "warmup"))
    command = [args.python, script, "--format", "json", "--threads", str(args.threads), *timing, "--case", case]
    return run_json(command, dict(os.environ), "the JAX reference", "is jax installed for --python (bench/README.md)?")


def median_over_rounds(rounds):
    """One result per configuration: the median steps/s over the rounds."""
    merged = {}
    for results in rounds:
        for r in results:
            merged.setdefault((r["case"], r["optimizer"], bool(r["measurements"])), []).append(r)
    out = []
    for runs in merged.values():
        rates = sorted(r["steps_per_sec"] for r in runs)
        n = len(rates)
        rate = rates[n // 2] if n % 2 else (rates[n // 2 - 1] + rates[n // 2]) / 2
        first = dict(runs[0])
        first.update(steps_per_sec=rate, ms_per_step=1000.0 / rate, rounds=n)
        first["round_rates"] = [r["steps_per_sec"] for r in runs]
        first["gflops"] = runs[0]["gflops"] * rate / runs[0]["steps_per_sec"]
        out.append(first)
    return out


def measure(args):
    """Both programs, case by case, taking turns for `--rounds` rounds so
    that drift in the machine's speed reaches both alike (the reference VM
    drifts by ±30% from minute to minute); never both at once. The order
    alternates (larslab first, then JAX first, ...), so that a steady drift
    does not favour the program that always runs first."""
    # The JAX reference has the MLP cases only; larslab's CNN cases would take minutes for nothing.
    cases = [args.case] if args.case else JAX_CASES
    larslab, jax = [], []
    for case in cases:
        rounds_l, rounds_j = [], []
        for round in range(args.rounds):
            turns = [
                lambda: rounds_l.append(larslab_run(args, case) if not args.larslab else []),
                lambda: rounds_j.append(jax_run(args, case) if not args.jax else []),
            ]
            for turn in turns if round % 2 == 0 else reversed(turns):
                turn()
        larslab += median_over_rounds(rounds_l)
        jax += median_over_rounds(rounds_j)
    return larslab, jax


def fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def paired_ratio(mine, ref):
    """larslab / JAX as the median of the rounds' own ratios (each round ran
    both programs back to back), with the lowest and highest round: "1.04
    (0.97-1.10)". The ratio of the medians where the rounds are unknown."""
    if mine is None or ref is None:
        return "-"
    a, b = mine.get("round_rates"), ref.get("round_rates")
    if not a or not b or len(a) != len(b):
        return fmt(ratio(mine["steps_per_sec"], ref["steps_per_sec"]))
    ratios = sorted(x / y for x, y in zip(a, b))
    n = len(ratios)
    mid = ratios[n // 2] if n % 2 else (ratios[n // 2 - 1] + ratios[n // 2]) / 2
    return f"{mid:.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})" if n > 1 else f"{mid:.2f}"


def table(larslab, jax):
    """The markdown table, and warnings about settings that differ between the two."""
    warnings = []

    def find(results, case, optimizer, measurements):
        return next(
            (r for r in results if r["case"] == case and r["optimizer"] == optimizer and bool(r["measurements"]) == measurements),
            None,
        )

    keys = []
    for r in larslab + jax:
        if (r["case"], r["optimizer"]) not in keys:
            keys.append((r["case"], r["optimizer"]))
    lines = [
        "| case | optimizer | larslab, measurements off (steps/s) | larslab, measurements on (steps/s) "
        "| JAX (steps/s) | off / JAX | on / JAX |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case, optimizer in keys:
        off = find(larslab, case, optimizer, False)
        on = find(larslab, case, optimizer, True)
        ref = find(jax, case, optimizer, False)
        for mine in (off, on):
            if mine is None or ref is None:
                continue
            for field in ("batch", "parameters", "threads", "steps_per_repeat", "repeats"):
                if mine.get(field) != ref.get(field):
                    warning = f"{case} {optimizer}: {field} differs (larslab {mine.get(field)}, JAX {ref.get(field)})"
                    if warning not in warnings:
                        warnings.append(warning)
        rate = lambda r: None if r is None else r["steps_per_sec"]  # noqa: E731
        lines.append(
            f"| {case} | {optimizer} | {fmt(rate(off))} | {fmt(rate(on))} | {fmt(rate(ref))} "
            f"| {paired_ratio(off, ref)} | {paired_ratio(on, ref)} |"
        )
    return "\n".join(lines) + "\n", warnings


def describe(results):
    """One line on how the results were taken."""
    if not results:
        return "no results"
    r = results[0]
    implementation = r.get("implementation", "larslab (candle, CPU)")
    rounds = f", median over {r['rounds']} interleaved rounds" if r.get("rounds") else ""
    return f"{implementation}: {r['threads']} threads, median of {r['repeats']} repeats of {r['steps_per_repeat']} steps{rounds}"


def main(argv=None):
    args = parse_args(argv)
    larslab = read_json(args.larslab, "larslab") if args.larslab else None
    jax = read_json(args.jax, "JAX") if args.jax else None
    if larslab is None or jax is None:
        measured_l, measured_j = measure(args)
        larslab = larslab if larslab is not None else measured_l
        jax = jax if jax is not None else measured_j
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        for name, results in (("larslab", larslab), ("jax", jax)):
            with open(os.path.join(args.save, f"{name}.json"), "w") as f:
                json.dump(results, f, indent=2)
                f.write("\n")
    text, warnings = table(larslab, jax)
    print(f"- larslab: {describe(larslab)}")
    print(f"- JAX: {describe(jax)}")
    print(
        "- ratios are larslab / JAX steps per second, the median of the rounds' ratios "
        "(lowest-highest round): 1.00 or more means larslab is at least as fast"
    )
    print()
    print(text, end="")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
