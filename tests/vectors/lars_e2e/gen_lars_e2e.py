#!/usr/bin/env python3
"""End-to-end float64 reference for `larslab train` with the LARS/LARC optimizer.

Writes, next to this script:
  train-images-idx3-ubyte   IDX u8 [48, 6, 6]  (uncompressed)
  train-labels-idx1-ubyte   IDX u8 [48], classes 0..3
  init.safetensors          fc1.weight [16,36], fc1.bias [16], fc2.weight [4,16], fc2.bias [4], float32
  expected.json             per case: the `--set` overrides, the loss before each of the 12
                            updates, the parameters after the 12th, and step 0's trust ratios

The computation (all float64 NumPy, starting from the float32-rounded initial parameters):

  Data     x = pixels / 255, flattened row-major to [n, 36]; y = labels; full batch, file order.
  Model    z1 = x W1^T + b1;  h1 = relu(z1);  logits = h1 W2^T + b2   (weights are [out, in])
  Loss     L = (1/n) sum_i [ logsumexp(logits_i) - logits_i[y_i] ]
  Grads    by hand:  dlogits = (softmax(logits) - onehot(y)) / n
                     dW2 = dlogits^T h1,  db2 = sum_i dlogits_i
                     dz1 = (dlogits W2) * [z1 > 0]
                     dW1 = dz1^T x,       db1 = sum_i dz1_i
  LARS     You, Gitman & Ginsburg 2017 (arXiv:1708.03888), Algorithm 1, learning rate INSIDE
           the momentum, as agreed in tests/vectors/README.md.  Per parameter tensor w with
           gradient g; beta = weight_decay, eta = trust_coefficient, m = momentum; norms are
           Frobenius norms of the raw w and g, taken before anything is modified; v starts at 0.
             paper:   lam = eta*|w| / (|g| + beta*|w| + eps)
             decayed: lam = eta*|w| / (|g + beta*w| + eps)
             lam = 1 if |w| == 0 or the denominator's gradient norm (|g| for paper,
                   |g + beta*w| for decayed) is 0
             d = g + beta*w;  s = lr*lam, or with clip (LARC) s = min(lr, lam)
             v <- m*v + s*d;  step = s*d + m*v (nesterov) or v;  w <- w - step
           Excluded parameters (exclude_1d and 1-D, i.e. the biases): no weight decay,
           lam reported as 1, s = lr:  v <- m*v + lr*g;  step as above;  w <- w - step.
           Constant learning rate.

Checks (the script fails if one does not hold):
  * the IDX and safetensors files read back to exactly the arrays used;
  * with jax: step 0's hand gradient equals jax.grad (x64) to 1e-12 relative, for every case's
    initial point (they share it), and at several later points of every trajectory;
  * with optax: case `lars_decayed_nesterov` (no clip, "decayed" denominator) equals a fully
    independent jax run (jax.grad + optax.lars, x64) to 1e-10 relative;
  * `larc_clip` takes both branches of min(lr, lam) at least once;
  * every case's loss decreases over the 12 steps, and each weight matrix moves by more
    than 1e-2 relative (|w_final - w_init| / |w_init|);
  * no hidden pre-activation z1 (over all samples, units and the 12 forward passes) comes
    within RELU_MARGIN_FLOOR of 0, nor within RELU_MARGIN_OVER_F32 times the largest z1 error
    of a float32 replay of the same case, whose ReLU pattern must equal float64's at every
    step: a float32 implementation cannot land on the other side of a ReLU kink.
The float32 replay (NumPy, float32 throughout except the trust-ratio norms) also prints how far
it lands from float64, as a guide to the tolerance a float32 implementation needs.

Usage:  python3 tests/vectors/lars_e2e/gen_lars_e2e.py
Needs:  numpy, safetensors   (optional, for the cross-checks: jax, optax)
Deterministic: rerunning writes byte-identical files (on the same platform; a different BLAS
or libm may move the float64 results in the last bits).
"""

import json
import math
import os
import struct
import sys

import numpy as np
from safetensors.numpy import load_file, save

SEED = 20261129
N_SAMPLES = 48
ROWS = COLS = 6
N_CLASSES = 4
HIDDEN = 16
STEPS = 12
RELU_MARGIN_FLOOR = 1e-5      # smallest |z1| allowed anywhere on a trajectory
RELU_MARGIN_OVER_F32 = 10.0   # ... and it must exceed the float32 replay's z1 error this many times
GRAD_REL_TOL = 1e-12
OPTAX_REL_TOL = 1e-10
MIN_REL_CHANGE = 1e-2

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGES_PATH = os.path.join(HERE, "train-images-idx3-ubyte")
LABELS_PATH = os.path.join(HERE, "train-labels-idx1-ubyte")
INIT_PATH = os.path.join(HERE, "init.safetensors")
EXPECTED_PATH = os.path.join(HERE, "expected.json")
GENERATOR = "tests/vectors/lars_e2e/gen_lars_e2e.py"
PARAM_NAMES = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]

# Optimizer settings of each case, exactly as passed to larslab (`optimizer.<key>=<value>`).
CASES = [
    ("lars_paper", dict(lr=2.0, momentum=0.9, nesterov=False, weight_decay=5e-4,
                        trust_coefficient=0.02, eps=0.0, denominator="paper", clip=False,
                        exclude_1d=True)),
    ("lars_decayed_nesterov", dict(lr=1.0, momentum=0.9, nesterov=True, weight_decay=1e-3,
                                   trust_coefficient=0.01, eps=1e-8, denominator="decayed",
                                   clip=False, exclude_1d=False)),
    ("larc_clip", dict(lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4,
                       trust_coefficient=0.02, eps=0.0, denominator="paper", clip=True,
                       exclude_1d=True)),
]
SET_ORDER = ["lr", "momentum", "nesterov", "weight_decay", "trust_coefficient", "eps",
             "denominator", "clip", "exclude_1d"]


# --------------------------------------------------------------------------
# data and initial parameters
# --------------------------------------------------------------------------

def make_dataset(rng):
    """48 structured 6x6 u8 images: each class has a mean pattern (uniform grey levels in
    [20, 235]); a sample is its class mean plus N(0, 35^2) noise, rounded and clipped to
    [0, 255]. Labels: 12 of each class, in a random order."""
    means = rng.uniform(20.0, 235.0, size=(N_CLASSES, ROWS, COLS))
    labels = rng.permutation(np.arange(N_SAMPLES) % N_CLASSES).astype(np.uint8)
    noise = rng.normal(0.0, 35.0, size=(N_SAMPLES, ROWS, COLS))
    images = np.clip(np.rint(means[labels] + noise), 0, 255).astype(np.uint8)
    return images, labels


def make_init(rng):
    """He-normal weights N(0, 2/fan_in) and N(0, 0.1^2) biases, rounded to float32."""
    sizes = [ROWS * COLS, HIDDEN, N_CLASSES]
    params = {}
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        params[f"fc{layer}.weight"] = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=(fan_out, fan_in))
        params[f"fc{layer}.bias"] = rng.normal(0.0, 0.1, size=(fan_out,))
    return {k: v.astype(np.float32) for k, v in params.items()}


def idx_bytes(array):
    """IDX encoding of a u8 array: 0, 0, 0x08, ndim, big-endian u32 dims, raw bytes."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(struct.pack(">I", d) for d in a.shape)
    return header + a.tobytes()


def read_idx(path):
    """Parse an uncompressed u8 IDX file (to check what was written)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:3] == b"\x00\x00\x08", path
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = np.frombuffer(data[4 + 4 * ndim:], dtype=np.uint8)
    assert body.size == int(np.prod(dims)), path
    return body.reshape(dims)


def inputs_from_images(images):
    """x = pixels / 255, flattened row-major to [n, rows*cols], float64."""
    return images.reshape(images.shape[0], -1).astype(np.float64) / 255.0


# --------------------------------------------------------------------------
# model, loss, gradients
# --------------------------------------------------------------------------

def forward(params, x):
    """z1 = x W1^T + b1, h1 = relu(z1), logits = h1 W2^T + b2."""
    z1 = x @ params["fc1.weight"].T + params["fc1.bias"]
    h1 = np.maximum(z1, 0.0)
    logits = h1 @ params["fc2.weight"].T + params["fc2.bias"]
    return z1, h1, logits


def cross_entropy(logits, y):
    """Mean softmax cross-entropy and the softmax probabilities."""
    shift = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(shift).sum(axis=1))
    loss = float(np.mean(lse - shift[np.arange(len(y)), y]))
    probs = np.exp(shift - lse[:, None])
    return loss, probs


def loss_and_grads(params, x, y):
    """Loss and its gradient with respect to every parameter, by backpropagation.
    Also returns z1, to monitor the distance of the pre-activations from the ReLU kink."""
    n = x.shape[0]
    z1, h1, logits = forward(params, x)
    loss, probs = cross_entropy(logits, y)
    dlogits = probs.copy()
    dlogits[np.arange(n), y] -= 1.0
    dlogits /= n
    dz1 = (dlogits @ params["fc2.weight"]) * (z1 > 0.0)
    grads = {
        "fc1.weight": dz1.T @ x,
        "fc1.bias": dz1.sum(axis=0),
        "fc2.weight": dlogits.T @ h1,
        "fc2.bias": dlogits.sum(axis=0),
    }
    return loss, grads, z1


# --------------------------------------------------------------------------
# LARS / LARC
# --------------------------------------------------------------------------

def norm(a):
    """Frobenius norm, summed exactly (math.fsum)."""
    return math.sqrt(math.fsum(float(v) * float(v) for v in np.asarray(a, dtype=np.float64).ravel()))


def is_excluded(opt, w):
    """Excluded from weight decay and trust ratio iff exclude_1d and the tensor is 1-D."""
    return opt["exclude_1d"] and w.ndim == 1


def trust_ratio(w, g, opt):
    """lam for a non-excluded tensor, from the norms of the raw w and g (see module doc)."""
    beta, eta, eps = opt["weight_decay"], opt["trust_coefficient"], opt["eps"]
    w_norm = norm(w)
    if opt["denominator"] == "paper":
        g_norm = norm(g)
        denom = g_norm + beta * w_norm + eps
    elif opt["denominator"] == "decayed":
        g_norm = norm(g + beta * w)
        denom = g_norm + eps
    else:
        raise ValueError(opt["denominator"])
    if w_norm == 0.0 or g_norm == 0.0:
        return 1.0
    return eta * w_norm / denom


def lars_update(w, g, v, opt):
    """One LARS/LARC update of one tensor. Returns (w_new, v_new, lam, branch), where branch
    is "lr" or "lambda" for the side of min(lr, lam) taken under clip, else None."""
    lr, m = opt["lr"], opt["momentum"]
    branch = None
    if is_excluded(opt, w):
        lam, d, s = 1.0, g, lr
    else:
        lam = trust_ratio(w, g, opt)
        d = g + opt["weight_decay"] * w
        if opt["clip"]:
            s = min(lr, lam)
            branch = "lr" if lr <= lam else "lambda"
        else:
            s = lr * lam
    u = s * d
    v = m * v + u
    step = u + m * v if opt["nesterov"] else v
    return w - step, v, lam, branch


def train(opt, init, x, y, dtype=np.float64):
    """STEPS full-batch updates from `init`. Returns a dict with the loss before each update,
    the final parameters, step 0's trust ratios, the clip branches taken, the parameters at
    every step, and the smallest |z1| seen. `dtype` float32 is only for the sensitivity probe."""
    params = {k: np.asarray(v, dtype=np.float64).astype(dtype) for k, v in init.items()}
    x = x.astype(dtype)
    opt_d = {k: (dtype(v) if isinstance(v, float) else v) for k, v in opt.items()}
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    losses, ratios0, branches, trajectory, z1s = [], {}, [], [], []
    for t in range(STEPS):
        trajectory.append({k: v.copy() for k, v in params.items()})
        loss, grads, z1 = loss_and_grads(params, x, y)
        losses.append(float(loss))
        z1s.append(z1)
        for name in PARAM_NAMES:
            params[name], velocity[name], lam, branch = lars_update(
                params[name], grads[name], velocity[name], opt_d)
            if t == 0:
                ratios0[name] = float(lam)
            if branch is not None:
                branches.append((t, name, branch, float(lam)))
        if dtype is not np.float64:
            params = {k: v.astype(dtype) for k, v in params.items()}
            velocity = {k: v.astype(dtype) for k, v in velocity.items()}
    return {"losses": losses, "final": params, "ratios0": ratios0, "branches": branches,
            "trajectory": trajectory, "z1": z1s,
            "min_margin": min(float(np.min(np.abs(z))) for z in z1s)}


# --------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------

def rel_diff(a, b):
    """max |a - b| / max |b| over a tensor (0 when both are 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = float(np.max(np.abs(b)))
    return float(np.max(np.abs(a - b))) / scale if scale > 0 else float(np.max(np.abs(a - b)))


def check_files(images, labels, init):
    """The written files read back to exactly the arrays the reference uses."""
    assert np.array_equal(read_idx(IMAGES_PATH), images)
    assert np.array_equal(read_idx(LABELS_PATH), labels)
    back = load_file(INIT_PATH)
    assert sorted(back) == sorted(PARAM_NAMES)
    for k in PARAM_NAMES:
        assert back[k].dtype == np.float32 and back[k].shape == init[k].shape, k
        assert np.array_equal(back[k], init[k]), k


def check_case(name, opt, init, res):
    """Loss decreases, weights visibly move, LARC takes both branches, ReLU margin holds."""
    l0, l_last = res["losses"][0], res["losses"][-1]
    assert l_last < l0, (name, res["losses"])
    changes = {k: norm(res["final"][k] - init[k]) / norm(init[k]) for k in PARAM_NAMES}
    for k in ("fc1.weight", "fc2.weight"):
        assert changes[k] > MIN_REL_CHANGE, (name, k, changes[k])
    if opt["clip"]:
        taken = {b for _, _, b, _ in res["branches"]}
        assert taken == {"lr", "lambda"}, (name, taken)
    assert res["min_margin"] > RELU_MARGIN_FLOOR, (name, res["min_margin"])
    return changes


def jax_checks(x, y, init, results):
    """Hand gradients vs jax.grad (x64), and lars_decayed_nesterov vs jax.grad + optax.lars."""
    try:
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
    except ImportError as e:  # pragma: no cover
        print(f"WARNING: jax not importable ({e}); gradients NOT cross-checked", file=sys.stderr)
        return
    xj, yj = jnp.asarray(x), jnp.asarray(y.astype(np.int64))

    def loss_fn(p):
        z1 = xj @ p["fc1.weight"].T + p["fc1.bias"]
        logits = jax.nn.relu(z1) @ p["fc2.weight"].T + p["fc2.bias"]
        logp = jax.nn.log_softmax(logits, axis=1)
        return -jnp.mean(logp[jnp.arange(xj.shape[0]), yj])

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))

    def compare(params):
        loss, grads, _ = loss_and_grads(params, x, y)
        jl, jg = grad_fn({k: jnp.asarray(v) for k, v in params.items()})
        worst = max(rel_diff(grads[k], np.asarray(jg[k])) for k in PARAM_NAMES)
        return abs(loss - float(jl)) / abs(float(jl)), worst

    p0 = {k: v.astype(np.float64) for k, v in init.items()}
    dl, dg = compare(p0)
    print(f"jax {jax.__version__} (x64) vs hand backprop at step 0: loss rel diff {dl:.2e}, "
          f"max gradient rel diff {dg:.2e} (tolerance {GRAD_REL_TOL:.0e})")
    assert dl <= GRAD_REL_TOL and dg <= GRAD_REL_TOL
    worst = 0.0
    for name, res in results.items():
        for t in (3, 7, STEPS - 1):
            worst = max(worst, *compare(res["trajectory"][t]))
    print(f"  ... and at steps 3, 7, 11 of every case: max rel diff {worst:.2e}")
    assert worst <= GRAD_REL_TOL

    try:
        import optax
    except ImportError as e:  # pragma: no cover
        print(f"WARNING: optax not importable ({e}); trajectory NOT cross-checked", file=sys.stderr)
        return
    name, opt = "lars_decayed_nesterov", dict(CASES[1][1])
    assert CASES[1][0] == name and opt["denominator"] == "decayed" and not opt["clip"]
    assert not opt["exclude_1d"]  # optax.lars's default masks (all True) then match
    tx = optax.lars(learning_rate=opt["lr"], weight_decay=opt["weight_decay"],
                    trust_coefficient=opt["trust_coefficient"], eps=opt["eps"],
                    momentum=opt["momentum"], nesterov=opt["nesterov"])
    params = {k: jnp.asarray(v.astype(np.float64)) for k, v in init.items()}
    state = tx.init(params)
    losses = []
    for _ in range(STEPS):
        loss, grads = grad_fn(params)
        losses.append(float(loss))
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    ours = results[name]
    d_loss = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"], losses))
    d_par = max(rel_diff(ours["final"][k], np.asarray(params[k])) for k in PARAM_NAMES)
    print(f"optax {optax.__version__}: {name} via jax.grad + optax.lars: losses rel diff "
          f"{d_loss:.2e}, final params rel diff {d_par:.2e} (tolerance {OPTAX_REL_TOL:.0e})")
    assert d_loss <= OPTAX_REL_TOL and d_par <= OPTAX_REL_TOL
    print("  (lars_paper and larc_clip are not in optax: 'paper' denominator with weight decay, clip)")


def float32_probe(name, opt, init, x, y, res64):
    """Replay a case in float32: report its distance from float64, and check that its ReLU
    pattern equals float64's at every step with a wide margin."""
    res32 = train(opt, init, x, y, dtype=np.float32)
    d_par = max(rel_diff(res32["final"][k], res64["final"][k]) for k in PARAM_NAMES)
    d_loss = max(abs(a - b) / abs(b) for a, b in zip(res32["losses"], res64["losses"]))
    d_z1 = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(res32["z1"], res64["z1"]))
    same_pattern = all(np.array_equal(a > 0, b > 0) for a, b in zip(res32["z1"], res64["z1"]))
    print(f"  float32 replay: final params max rel diff {d_par:.2e} (per tensor, vs max |w|), "
          f"losses {d_loss:.2e}, z1 max abs diff {d_z1:.2e}, same ReLU pattern: {same_pattern}")
    assert same_pattern, name
    assert res64["min_margin"] > RELU_MARGIN_OVER_F32 * d_z1, (name, res64["min_margin"], d_z1)
    return d_par, d_loss


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------

def toml_value(v):
    """A TOML literal: strings quoted, booleans lowercase, floats always with '.' or 'e'."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    assert isinstance(v, float), v
    text = repr(v)
    if "e" in text:
        mant, exp = text.split("e")
        text = f"{mant}e{int(exp)}"
    elif "." not in text:
        text += ".0"
    return text


def set_args(opt):
    return ['optimizer.kind="lars"'] + [f"optimizer.{k}={toml_value(opt[k])}" for k in SET_ORDER]


def is_flat(x):
    return isinstance(x, list) and not any(isinstance(y, (list, dict)) for y in x)


def dumps(obj, indent=0):
    """JSON with objects and nested lists spread over lines, flat lists on one line."""
    pad = "  " * indent
    if isinstance(obj, dict):
        items = [f"{pad}  {json.dumps(k)}: {dumps(v, indent + 1).lstrip()}" for k, v in obj.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and not is_flat(obj):
        return pad + "[\n" + ",\n".join(dumps(x, indent + 1) for x in obj) + "\n" + pad + "]"
    return pad + json.dumps(obj, allow_nan=False)


def case_json(name, opt, res):
    return {
        "name": name,
        "set": set_args(opt),
        "losses": [float(v) for v in res["losses"]],
        "final": {k: [float(v) for v in res["final"][k].ravel()] for k in PARAM_NAMES},
        "trust_ratios_step0": {k: res["ratios0"][k] for k in PARAM_NAMES},
    }


def main():
    rng = np.random.default_rng(SEED)
    images, labels = make_dataset(rng)
    init = make_init(rng)
    assert sorted(set(labels.tolist())) == list(range(N_CLASSES))

    with open(IMAGES_PATH, "wb") as f:
        f.write(idx_bytes(images))
    with open(LABELS_PATH, "wb") as f:
        f.write(idx_bytes(labels))
    with open(INIT_PATH, "wb") as f:
        f.write(save(init))
    check_files(images, labels, init)

    x = inputs_from_images(read_idx(IMAGES_PATH))
    y = read_idx(LABELS_PATH).astype(np.int64)
    init64 = {k: v.astype(np.float64) for k, v in init.items()}

    results = {}
    for name, opt in CASES:
        res = train(opt, init, x, y)
        changes = check_case(name, opt, init64, res)
        results[name] = res
        print(f"{name}: loss {res['losses'][0]:.6f} (step 0) -> {res['losses'][-1]:.6f} (step {STEPS - 1}); "
              f"relative change " + ", ".join(f"{k} {c:.3g}" for k, c in changes.items()))
        print("  losses: " + " ".join(f"{v:.4f}" for v in res["losses"]))
        print(f"  trust ratios at step 0: " + ", ".join(f"{k} {v:.6g}" for k, v in res["ratios0"].items()))
        print(f"  smallest |z1| along the trajectory: {res['min_margin']:.3g}")
        if opt["clip"]:
            n_lr = sum(b == "lr" for _, _, b, _ in res["branches"])
            n_lam = sum(b == "lambda" for _, _, b, _ in res["branches"])
            lam_steps = [f"{n} at step {t} (lam {lam:.4g})" for t, n, b, lam in res["branches"] if b == "lambda"]
            closest = min(abs(lam / opt["lr"] - 1.0) for _, _, _, lam in res["branches"])
            print(f"  min(lr={opt['lr']}, lam): lr branch {n_lr} times, lambda branch {n_lam} times: "
                  + "; ".join(lam_steps) + f"; closest |lam/lr - 1| = {closest:.3g}")
            assert closest > 1e-3, closest  # no float32 rounding can flip a branch
            for k in ("fc1.weight", "fc2.weight"):
                lams = [lam for _, n, _, lam in res["branches"] if n == k]
                print(f"    {k}: lam over the steps in [{min(lams):.4g}, {max(lams):.4g}]")
        float32_probe(name, opt, init, x, y, res)

    jax_checks(x, y, init, results)

    doc = {"generator": GENERATOR, "steps": STEPS,
           "cases": [case_json(name, opt, results[name]) for name, opt in CASES]}
    text = dumps(doc) + "\n"
    json.loads(text)
    with open(EXPECTED_PATH, "w") as f:
        f.write(text)
    print(f"wrote {IMAGES_PATH}, {LABELS_PATH}, {INIT_PATH}, {EXPECTED_PATH}")


if __name__ == "__main__":
    main()
