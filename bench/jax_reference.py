#!/usr/bin/env python3
"""JAX reference for `larslab bench`: the same training step, timed the same way.

What it measures: steps per second of one whole training step (forward,
backward, optimizer update) of the cases of src/bench.rs (the four MLPs and
the two LeNet-style CNNs with BatchNorm), on one fixed random batch, with momentum SGD and with larslab's LARS, in float32 on the
CPU. The step is one `jax.jit`-compiled function (loss and gradients from
`jax.value_and_grad`, then the update), with the parameters and the momentum
buffers donated so XLA can update them in place. Timing follows src/bench.rs:
untimed warm-up steps (compilation happens before them), then `--repeats`
blocks of `--steps` steps, the configurations taking turns block by block;
a block's rate is steps / block time (`block_until_ready` at its end), and the
median rate is reported. GFLOP/s counts what larslab's bench counts
(`Model::step_flops`): per layer from its shapes, 2 FLOPs per multiply-add
for the forward product, for dW and for the input's gradient, which the first
layer does not need (XLA drops it too). There is no "measurements on" configuration: larslab's
per-layer measurements have no counterpart here, so every result says
`"measurements": false`.

Install (optional tooling; neither larslab nor its tests need it):

    python3 -m venv ~/jaxenv
    ~/jaxenv/bin/pip install "jax[cpu]"
    ~/jaxenv/bin/python bench/jax_reference.py --case mlp-256-b128

`bench/compare.py` runs this and `larslab bench` with the same settings and
prints both side by side (see bench/README.md). `--check` verifies the step
against a float64 NumPy computation and tests/vectors/optim_vectors.json.
"""

import argparse
import json
import os
import statistics
import sys
import time

# name -> (inputs, hidden widths, classes, batch), as CASES in src/bench.rs.
CASES = {
    "mlp-1024-b128": (784, [1024, 1024], 10, 128),
    "mlp-1024-b1024": (784, [1024, 1024], 10, 1024),
    "mlp-256-b128": (784, [256, 256], 10, 128),
    "deep30-b128": (784, [256] * 30, 10, 128),
}

# name -> (image side, convolutions [(channels, kernel)], hidden widths, classes,
# batch), as Case::cnn in src/bench.rs: each convolution 'same', stride 1,
# then BatchNorm with the batch's statistics (eps 1e-5, running statistics
# updated with momentum 0.1 and the unbiased variance, as PyTorch and
# larslab), ReLU and 2x2 max pooling; the head reads PyTorch's (channel, row,
# column) order.
CNN_CASES = {
    "cnn-bn-b128": (28, [(16, 5), (32, 5)], [128], 10, 128),
    "cnn-bn-b1024": (28, [(16, 5), (32, 5)], [128], 10, 1024),
}
BN_EPS = 1e-5
BN_MOMENTUM = 0.1

# larslab's bench: OptimizerConfig::default() (src/config.rs) with lr 0.01
# (src/bench.rs). Note that the default weight decay is 0, for LARS too:
# larslab's bench runs LARS with beta = 0, so this does as well; the decay
# term is still implemented (and checked by --check) for other settings.
LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 0.0
TRUST_COEFFICIENT = 0.001
EPS = 0.0

OPTIMIZERS = ("sgd", "lars")

jax = None  # imported by import_jax(), after the thread settings are in the environment
jnp = None
np = None


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="JAX reference for `larslab bench` (see the module docstring)."
    )
    p.add_argument("--case", choices=[*CASES, *CNN_CASES], help="one case (default: all)")
    p.add_argument("--steps", type=positive, default=20, help="timed steps per repeat (20)")
    p.add_argument("--repeats", type=positive, default=5, help="timed repeats; the median is reported (5)")
    p.add_argument("--warmup", type=non_negative, default=5, help="untimed steps first (5)")
    p.add_argument("--threads", type=positive, default=2, help="XLA:CPU intra-op threads (2)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument(
        "--check",
        action="store_true",
        help="instead of timing: check the step against float64 NumPy and tests/vectors",
    )
    return p.parse_args(argv)


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def non_negative(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 0")
    return value


def configure_threads(n):
    """Limits XLA:CPU to n threads of computation; must run before jax is imported.

    What controls what (checked on jax/jaxlib 0.10.2 by per-thread CPU time
    from /proc/self/task while a jitted 1024x1024 matmul ran):

    - PJRT_NPROC sets the size of the CPU client's intra-op thread pools (the
      "XLAEigen" threads, and a second pool of the same size that the
      runtime's matmuls also split work over). This is the knob that works;
      by default XLA takes every CPU the process may run on.
    - --xla_cpu_multi_thread_eigen (XLA_FLAGS) is the older switch for
      multi-threaded Eigen matmuls. It had no visible effect on this jaxlib
      (matmuls still spread over the pool with it false). It is set anyway,
      true for n > 1 and false for n = 1, to say the same thing.
    - "intra_op_parallelism_threads=N", often quoted for XLA_FLAGS, is not
      an XLA flag: XLA_FLAGS ignores words without a leading "--" (and with
      "--" it aborts on the unknown flag). Not set.
    - --xla_force_host_platform_device_count=N splits the host into N
      devices for pmap/sharding; a single-device jit like this one neither
      uses them nor runs on fewer threads. Not set.

    XLA keeps other threads (compilation, dispatch) besides these; they are
    close to idle while the timed steps run.
    """
    os.environ["PJRT_NPROC"] = str(n)
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_cpu_multi_thread_eigen")]
    if any(f.startswith("--xla_force_host_platform_device_count") for f in flags):
        print(
            "warning: XLA_FLAGS has --xla_force_host_platform_device_count; it does not "
            "limit threads, and this benchmark uses one device",
            file=sys.stderr,
        )
    flags.append(f"--xla_cpu_multi_thread_eigen={'true' if n > 1 else 'false'}")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def import_jax():
    global jax, jnp, np
    try:
        import jax as _jax
        import jax.numpy as _jnp
        import numpy as _np
    except ImportError as e:
        sys.exit(f"jax_reference.py: {e} for {sys.executable}; install jax into a venv (bench/README.md)")

    jax, jnp, np = _jax, _jnp, _np


def xla_pool_threads():
    """How many "XLAEigen" pool threads this process has (Linux; None elsewhere)."""
    try:
        tasks = os.listdir("/proc/self/task")
        names = []
        for t in tasks:
            with open(f"/proc/self/task/{t}/comm") as f:
                names.append(f.read().strip())
    except OSError:
        return None
    return sum("XLAEigen" in name for name in names)


# --- the model: larslab's Mlp, weights [out, in], ReLU after every hidden layer ---


def init_params(case, seed=0):
    """fc1.weight, fc1.bias, fc2.weight, ... : He-normal weights, zero biases."""
    inputs, hidden, classes, _ = CASES[case] if isinstance(case, str) else case
    widths = [inputs, *hidden, classes]
    rng = np.random.default_rng(seed)
    params = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        std = np.float32(np.sqrt(2.0 / fan_in))
        params.append(rng.standard_normal((fan_out, fan_in), dtype=np.float32) * std)
        params.append(np.zeros(fan_out, np.float32))
    return params


def fixed_batch(case, seed=1):
    """x uniform in [0, 1), labels uniform in [0, classes): one batch, reused every step."""
    if isinstance(case, str) and case in CNN_CASES:
        side, _, _, classes, batch = CNN_CASES[case]
        inputs = side * side
    else:
        inputs, _, classes, batch = CASES[case] if isinstance(case, str) else case
    rng = np.random.default_rng(seed)
    x = rng.random((batch, inputs), dtype=np.float32)
    y = rng.integers(0, classes, size=batch).astype(np.int32)
    return x, y


def forward(params, x):
    h = x
    layers = len(params) // 2
    for i in range(layers):
        w, b = params[2 * i], params[2 * i + 1]
        z = h @ w.T + b
        h = jax.nn.relu(z) if i + 1 < layers else z
    return h


def loss_fn(params, x, y):
    """Mean softmax cross-entropy over the batch (candle_nn::loss::cross_entropy)."""
    logp = jax.nn.log_softmax(forward(params, x), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


# --- the CNN: larslab's Model with convolutions, channels-last (NHWC, kernels HWIO) ---


def cnn_init(case, seed=0):
    """Parameters in larslab's order (conv1.weight, conv1.bias, bn1.weight,
    bn1.bias, conv2..., fc1.weight, ...) and BatchNorm's running statistics."""
    side, convs, hidden, classes, _ = CNN_CASES[case]
    rng = np.random.default_rng(seed)
    params, stats = [], []
    channels = 1
    for out, k in convs:
        std = np.float32(np.sqrt(2.0 / (channels * k * k)))
        params.append(rng.standard_normal((k, k, channels, out), dtype=np.float32) * std)
        params += [np.zeros(out, np.float32), np.ones(out, np.float32), np.zeros(out, np.float32)]
        stats += [np.zeros(out, np.float32), np.ones(out, np.float32)]
        channels, side = out, side // 2
    widths = [channels * side * side, *hidden, classes]
    for fan_in, fan_out in zip(widths, widths[1:]):
        std = np.float32(np.sqrt(2.0 / fan_in))
        params.append(rng.standard_normal((fan_out, fan_in), dtype=np.float32) * std)
        params.append(np.zeros(fan_out, np.float32))
    return params, stats


def cnn_forward(case, params, stats, x):
    """Logits and the updated running statistics."""
    side, convs, _, _, _ = CNN_CASES[case]
    n = x.shape[0]
    h = x.reshape(n, side, side, 1)
    new_stats = []
    for i in range(len(convs)):
        w, b, gamma, beta = params[4 * i : 4 * i + 4]
        z = jax.lax.conv_general_dilated(
            h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        ) + b
        mean = jnp.mean(z, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(z - mean), axis=(0, 1, 2))
        z = gamma * ((z - mean) * jax.lax.rsqrt(var + BN_EPS)) + beta
        m = z.shape[0] * z.shape[1] * z.shape[2]
        running_mean, running_var = stats[2 * i], stats[2 * i + 1]
        new_stats.append(jax.lax.stop_gradient((1 - BN_MOMENTUM) * running_mean + BN_MOMENTUM * mean))
        new_stats.append(
            jax.lax.stop_gradient((1 - BN_MOMENTUM) * running_var + BN_MOMENTUM * var * m / (m - 1))
        )
        h = jax.nn.relu(z)
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = jnp.transpose(h, (0, 3, 1, 2)).reshape(n, -1)
    return forward(params[4 * len(convs) :], h), new_stats


def cnn_loss_fn(case):
    def loss(params, stats, x, y):
        logits, new_stats = cnn_forward(case, params, stats, x)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)), new_stats

    return loss


def step_flops(case):
    """larslab's Model::step_flops per sample: 2 FLOPs per multiply-add, for
    the forward product, dW, and the input's gradient of all but the first layer."""
    layers = []
    if case in CNN_CASES:
        side, convs, hidden, classes, _ = CNN_CASES[case]
        channels = 1
        for out, k in convs:
            layers.append(side * side * k * k * channels * out)
            channels, side = out, side // 2
        widths = [channels * side * side, *hidden, classes]
    else:
        inputs, hidden, classes, _ = CASES[case]
        widths = [inputs, *hidden, classes]
    layers += [a * b for a, b in zip(widths, widths[1:])]
    return 2 * (3 * sum(layers) - layers[0])


# --- the optimizers, written out (no optax), one tensor at a time like src/optim ---


def sgd_update(params, grads, velocity, lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY):
    """Momentum SGD in PyTorch's form (larslab's sgd chain: decay, trace, lr).

        d = g + beta*w    (every parameter; skipped when beta = 0, as larslab does)
        v <- m*v + d      (v starts at 0)
        w <- w - lr*v
    """
    new_params, new_velocity = [], []
    for w, g, v in zip(params, grads, velocity):
        d = g + weight_decay * w if weight_decay else g
        v = momentum * v + d
        new_params.append(w - lr * v)
        new_velocity.append(v)
    return new_params, new_velocity


def lars_update(
    params,
    grads,
    velocity,
    lr,
    momentum=MOMENTUM,
    weight_decay=WEIGHT_DECAY,
    trust_coefficient=TRUST_COEFFICIENT,
    eps=EPS,
):
    """larslab's LARS (You, Gitman and Ginsburg 2017, Algorithm 1; the "paper"
    denominator, no clip, 1-D parameters excluded), per parameter tensor:

        lambda = eta*|w| / (|g| + beta*|w| + eps)   (Frobenius norms of the raw w and g;
                 lambda = 1 if |w| = 0 or |g| = 0)
        d = g + beta*w
        v <- m*v + lr*lambda*d                      (the local rate enters the buffer)
        w <- w - v
    1-D parameters (biases): no decay and lambda = 1, so v <- m*v + lr*g.
    """
    new_params, new_velocity = [], []
    for w, g, v in zip(params, grads, velocity):
        if w.ndim <= 1:
            u = lr * g
        else:
            w_norm = jnp.sqrt(jnp.sum(w * w))
            g_norm = jnp.sqrt(jnp.sum(g * g))
            ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
            trust = jnp.where(jnp.minimum(w_norm, g_norm) > 0, ratio, 1.0)
            d = g + weight_decay * w if weight_decay else g
            u = (lr * trust) * d
        v = momentum * v + u
        new_params.append(w - v)
        new_velocity.append(v)
    return new_params, new_velocity


UPDATES = {"sgd": sgd_update, "lars": lars_update}


def make_step(optimizer, case=None, lr=LR, **hyper):
    """One whole training step, jit-compiled, parameters, momentum and
    BatchNorm's running statistics (`stats`, empty for an MLP) donated.

    (larslab also skips the update when the loss is not finite; with this
    fixed batch and rate the loss stays finite, so that branch is left out.)
    """
    update = UPDATES[optimizer]
    if case in CNN_CASES:
        loss_and_stats = cnn_loss_fn(case)
    else:

        def loss_and_stats(params, stats, x, y):
            return loss_fn(params, x, y), stats

    def step(params, velocity, stats, x, y):
        (loss, stats), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(params, stats, x, y)
        params, velocity = update(params, grads, velocity, lr, **hyper)
        return params, velocity, stats, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


# --- timing, as src/bench.rs ---


class Setup:
    """One configuration under test: its own parameters, momentum and compiled step."""

    def __init__(self, case, optimizer, x, y):
        self.optimizer = optimizer
        if case in CNN_CASES:
            host_params, host_stats = cnn_init(case)
        else:
            host_params, host_stats = init_params(case), []
        self.parameters = sum(p.size for p in host_params)
        self.params = [jnp.asarray(p) for p in host_params]
        self.stats = [jnp.asarray(s) for s in host_stats]
        self.velocity = [jnp.zeros_like(p) for p in self.params]
        self.x, self.y = x, y
        # Compile ahead, so that compilation is never timed (not even with --warmup 0).
        self.step = (
            make_step(optimizer, case).lower(self.params, self.velocity, self.stats, x, y).compile()
        )
        self.loss = None
        self.rates = []

    def steps(self, n):
        for _ in range(n):
            self.params, self.velocity, self.stats, self.loss = self.step(
                self.params, self.velocity, self.stats, self.x, self.y
            )
        jax.block_until_ready((self.params, self.velocity, self.stats, self.loss))


def run(case, args):
    x, y = (jnp.asarray(a) for a in fixed_batch(case))
    setups = [Setup(case, optimizer, x, y) for optimizer in OPTIMIZERS]
    for setup in setups:
        setup.steps(args.warmup)
    # The configurations take turns, one block each per repeat, so that drift in
    # the machine's speed reaches all of them alike.
    for _ in range(args.repeats):
        for setup in setups:
            start = time.perf_counter()
            setup.steps(args.steps)
            setup.rates.append(args.steps / (time.perf_counter() - start))
    batch = CNN_CASES[case][4] if case in CNN_CASES else CASES[case][3]
    results = []
    for setup in setups:
        steps_per_sec = statistics.median(setup.rates)
        results.append(
            {
                "case": case,
                "optimizer": setup.optimizer,
                "measurements": False,
                "batch": batch,
                "parameters": setup.parameters,
                "steps_per_sec": steps_per_sec,
                "ms_per_step": 1000.0 / steps_per_sec,
                "gflops": step_flops(case) * batch * steps_per_sec / 1e9,
                "repeats": args.repeats,
                "steps_per_repeat": args.steps,
                "threads": args.threads,
                "implementation": f"jax {jax.__version__}",
            }
        )
    return results


def table(results):
    """larslab's table: cost relative to SGD on the same case."""
    out = "{:<16} {:<9} {:<12} {:>10} {:>9} {:>8} {:>9}\n".format(
        "case", "optimizer", "measurements", "steps/s", "ms/step", "GFLOP/s", "vs sgd"
    )
    for r in results:
        base = next(
            (b for b in results if b["case"] == r["case"] and b["optimizer"] == "sgd" and not b["measurements"]),
            None,
        )
        vs = "-" if base is None else f"{100.0 * (r['ms_per_step'] / base['ms_per_step'] - 1.0):+.1f}%"
        out += "{:<16} {:<9} {:<12} {:>10.2f} {:>9.2f} {:>8.1f} {:>9}\n".format(
            r["case"],
            r["optimizer"],
            "on" if r["measurements"] else "off",
            r["steps_per_sec"],
            r["ms_per_step"],
            r["gflops"],
            vs,
        )
    return out


# --- --check: the jitted step against float64 NumPy, the update against tests/vectors ---


def numpy_step(optimizer, params, velocity, x, y, lr, momentum, weight_decay, trust_coefficient, eps):
    """The same step in float64 NumPy, backward pass by hand, formulas as in
    tests/vectors/README.md; returns new params, new velocity, loss, trust ratios."""
    params = [p.astype(np.float64) for p in params]
    velocity = [v.astype(np.float64) for v in velocity]
    x = x.astype(np.float64)
    layers = len(params) // 2
    hs, zs = [x], []
    for i in range(layers):
        z = hs[-1] @ params[2 * i].T + params[2 * i + 1]
        zs.append(z)
        if i + 1 < layers:
            hs.append(np.maximum(z, 0.0))
    logits = zs[-1]
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = x.shape[0]
    loss = -logp[np.arange(n), y].mean()
    dz = np.exp(logp)
    dz[np.arange(n), y] -= 1.0
    dz /= n
    grads = [None] * len(params)
    for i in reversed(range(layers)):
        grads[2 * i] = dz.T @ hs[i]
        grads[2 * i + 1] = dz.sum(axis=0)
        if i > 0:
            dz = (dz @ params[2 * i]) * (zs[i - 1] > 0)
    new_params, new_velocity, trusts = [], [], []
    for w, g, v in zip(params, grads, velocity):
        if optimizer == "sgd":
            v = momentum * v + (g + weight_decay * w)
            w = w - lr * v
            trusts.append(None)
        else:
            if w.ndim <= 1:
                trust, d = 1.0, g
            else:
                wn, gn = np.linalg.norm(w), np.linalg.norm(g)
                trust = trust_coefficient * wn / (gn + weight_decay * wn + eps) if wn > 0 and gn > 0 else 1.0
                d = g + weight_decay * w
            v = momentum * v + lr * trust * d
            w = w - v
            trusts.append(trust)
        new_params.append(w)
        new_velocity.append(v)
    return new_params, new_velocity, loss, trusts


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def check():
    """Exits non-zero when the JAX step and the float64 references disagree."""
    failures = 0

    def report(name, err, tol):
        nonlocal failures
        ok = err <= tol
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: max relative error {err:.2e} (tolerance {tol:.0e})")

    # 1. The benchmark's jitted step (with donation) against float64 NumPy,
    #    3 steps, on a small MLP; the default (beta = 0) and beta = 5e-4 with a
    #    larger eta so that lambda is far from both 1 and 0; then with the last
    #    layer zeroed, so that |w| = 0 there and |g| = 0 in every layer below
    #    (both guards: lambda = 1).
    shape = (784, [64, 32], 10, 16)
    x, y = fixed_batch(shape)
    settings = [
        ("defaults", dict(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, trust_coefficient=TRUST_COEFFICIENT, eps=EPS), False),
        ("beta=5e-4 eta=0.02", dict(momentum=MOMENTUM, weight_decay=5e-4, trust_coefficient=0.02, eps=EPS), False),
        ("beta=5e-4, last layer zero", dict(momentum=MOMENTUM, weight_decay=5e-4, trust_coefficient=0.001, eps=EPS), True),
    ]
    for optimizer in OPTIMIZERS:
        for label, hyper, zero_last in settings:
            params = init_params(shape)
            if zero_last:
                params[-2] = np.zeros_like(params[-2])
            params = [p.copy() for p in params]  # kept apart from the donated buffers
            velocity = [np.zeros_like(p) for p in params]
            ref_p, ref_v = params, velocity
            kwargs = hyper if optimizer == "lars" else dict(momentum=hyper["momentum"], weight_decay=hyper["weight_decay"])
            step = make_step(optimizer, lr=LR, **kwargs)
            jp = [jnp.array(p) for p in params]
            jv = [jnp.array(v) for v in velocity]
            jx, jy = jnp.asarray(x), jnp.asarray(y)
            worst_p = worst_v = worst_l = 0.0
            trusts = None
            for _ in range(3):
                jp, jv, _, jloss = step(jp, jv, [], jx, jy)
                ref_p, ref_v, ref_loss, trusts = numpy_step(optimizer, ref_p, ref_v, x, y, LR, **hyper)
                # The momentum buffers are the steps (lars: w <- w - v; sgd:
                # w <- w - lr*v), so they are compared at full relative
                # precision. A step is ~1e-5 of its weight, below float32's
                # resolution of the weight, so the weights themselves can only
                # agree to float32 rounding of their own size.
                worst_v = max(worst_v, max(rel_err(a, b) for a, b in zip(jv, ref_v) if np.any(b != 0)))
                worst_p = max(worst_p, max(rel_err(a, b) for a, b in zip(jp, ref_p)))
                worst_l = max(worst_l, abs(float(jloss) - ref_loss) / abs(ref_loss))
            report(f"{optimizer} {label}: momentum buffers (the steps), 3 steps", worst_v, 1e-5)
            report(f"{optimizer} {label}: parameters, 3 steps", worst_p, 1e-6)
            report(f"{optimizer} {label}: loss, 3 steps", worst_l, 1e-6)
            if optimizer == "lars":
                print(f"     trust ratios at step 3: {', '.join(f'{t:.3g}' for t in trusts)}")

    # 2. The update functions against larslab's own reference vectors (float64
    #    NumPy, independent of larslab's code), for the cases they cover:
    #    sgd and lars without Nesterov, paper denominator, no clip, 1-D excluded.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "vectors", "optim_vectors.json")
    try:
        with open(path) as f:
            vectors = json.load(f)["cases"]
    except OSError as e:
        print(f"skip tests/vectors: {e}")
        vectors = []
    for case in vectors:
        o = case["optimizer"]
        if o["kind"] not in OPTIMIZERS or o["nesterov"] or o["clip"] or o["denominator"] != "paper" or not o["exclude_1d"]:
            continue
        params = [jnp.asarray(np.reshape(p["init"], p["shape"]), jnp.float32) for p in case["params"]]
        velocity = [jnp.zeros_like(p) for p in params]
        worst = 0.0
        for t, lr in enumerate(case["lrs"]):
            grads = [jnp.asarray(np.reshape(p["grads"][t], p["shape"]), jnp.float32) for p in case["params"]]
            if o["kind"] == "sgd":
                params, velocity = sgd_update(params, grads, velocity, lr, o["momentum"], o["weight_decay"])
            else:
                params, velocity = lars_update(
                    params, grads, velocity, lr, o["momentum"], o["weight_decay"], o["trust_coefficient"], o["eps"]
                )
            expected = [np.reshape(e, p["shape"]) for e, p in zip(case["expected"][t], case["params"])]
            worst = max(worst, max(rel_err(a, b) for a, b in zip(params, expected)))
        report(f"tests/vectors {case['name']}: parameters over {len(case['lrs'])} steps", worst, 1e-5)

    print("all checks passed" if failures == 0 else f"{failures} check(s) FAILED")
    return 1 if failures else 0


def main(argv=None):
    args = parse_args(argv)
    configure_threads(args.threads)
    import_jax()
    if args.check:
        return check()
    if args.format == "table":
        print(
            f"jax {jax.__version__}, {args.threads} threads "
            f"(PJRT_NPROC={os.environ['PJRT_NPROC']}, XLA_FLAGS={os.environ['XLA_FLAGS']!r})",
            file=sys.stderr,
        )
    results = []
    for case in [args.case] if args.case else [*CASES, *CNN_CASES]:
        if args.format == "table":
            print(f"timing {case} ...", file=sys.stderr)
        results.extend(run(case, args))
    pool = xla_pool_threads()
    if pool is not None and pool != args.threads:
        print(f"warning: XLA has {pool} XLAEigen pool threads, not {args.threads}", file=sys.stderr)
    if args.format == "table":
        print(table(results), end="")
    else:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
