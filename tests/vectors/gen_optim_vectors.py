#!/usr/bin/env python3
"""Generate independent reference vectors for larslab's optimizers.

Writes tests/vectors/optim_vectors.json (next to this script).

Every trajectory is computed in float64 NumPy straight from the formulas in
tests/vectors/README.md, on fixed inputs (initial weights and per-step
gradients are *given* numbers, drawn once from a seeded generator and rounded to
6 significant digits; nothing is differentiated).

When jax and optax are importable, every case that optax implements is also run
through the matching optax optimizer in float64 (jax_enable_x64) and the
trajectories must agree to 1e-10 relative; the script prints which cases were
cross-checked. Without optax it warns and still writes the (identical) file.

Usage:  python3 tests/vectors/gen_optim_vectors.py
Needs:  numpy  (optional for the cross-check: jax, optax)
"""

import json
import math
import os
import sys

import numpy as np

SEED = 20261129
REL_TOL = 1e-10
HERE = os.path.dirname(os.path.abspath(__file__))
OUT_PATH = os.path.join(HERE, "optim_vectors.json")

DEFAULTS = {
    "kind": "sgd",
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 0.0,
    "trust_coefficient": 0.001,
    "eps": 0.0,
    "denominator": "paper",
    "clip": False,
    "exclude_1d": True,
    "beta1": 0.9,
    "beta2": 0.999,
    "adam_eps": 1e-8,
}


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def norm(x):
    """Frobenius norm, summed exactly (math.fsum) so the file is platform independent."""
    return math.sqrt(math.fsum(float(v) * float(v) for v in np.asarray(x).ravel()))


def is_excluded(opt, w):
    """A parameter is excluded from weight decay / trust ratio iff exclude_1d and it is 1-D."""
    return opt["exclude_1d"] and w.ndim == 1


def round6(a):
    """Round to 6 significant digits so the JSON inputs are short decimals that
    any reasonable float parser (e.g. serde_json's fast path) reads exactly."""
    a = np.asarray(a, dtype=np.float64)
    return np.array([float(f"{v:.6g}") for v in a.ravel()]).reshape(a.shape)


# --------------------------------------------------------------------------
# the optimizers, one step each: (w, g, state, lr_t, t, opt) -> (w_new, state, ratio)
# `state` is a dict that starts empty (== zero buffers); t is the 0-based step index.
# --------------------------------------------------------------------------

def sgd_step(w, g, state, lr, t, opt):
    """SGD with momentum, PyTorch torch.optim.SGD (dampening=0) semantics, which is
    optax.chain(add_decayed_weights(wd), trace(m, nesterov), scale_by_learning_rate(lr)):
        d = g + wd*w;  v <- m*v + d;  step = d + m*v (nesterov) or v;  w <- w - lr*step.
    Weight decay applies to every parameter (exclude_1d is ignored for sgd)."""
    m, wd = opt["momentum"], opt["weight_decay"]
    d = g + wd * w
    v = m * state.get("v", np.zeros_like(w)) + d
    step = d + m * v if opt["nesterov"] else v
    state["v"] = v
    return w - lr * step, state, None


def lars_step(w, g, state, lr, t, opt, lr_outside_momentum=False):
    """LARS, You, Gitman & Ginsburg 2017 ("Large Batch Training of Convolutional
    Networks", arXiv:1708.03888), Algorithm 1, learning rate INSIDE the momentum:
        paper:   lam = eta*|w| / (|g| + wd*|w| + eps)
        decayed: lam = eta*|w| / (|g + wd*w| + eps)
        lam = 1 if |w| == 0 or |g| == 0     (norms of the raw inputs)
        d = g + wd*w;  s = lr*lam  (clip/LARC: s = min(lr, lam))
        v <- m*v + s*d;  step = s*d + m*v (nesterov) or v;  w <- w - step.
    Excluded params (exclude_1d and 1-D): no weight decay, lam reported as 1,
        v <- m*v + lr*g;  step = lr*g + m*v (nesterov) or v;  w <- w - step.
    `lr_outside_momentum` is only used by the self-check that the lrs make the
    two placements distinguishable (v <- m*v + lam*d; w <- w - lr*step)."""
    m, wd, eta, eps = opt["momentum"], opt["weight_decay"], opt["trust_coefficient"], opt["eps"]
    if is_excluded(opt, w):
        lam = 1.0
        d = g
        s = lr
    else:
        w_norm, g_norm = norm(w), norm(g)
        d = g + wd * w
        if w_norm == 0.0 or g_norm == 0.0:
            lam = 1.0
        elif opt["denominator"] == "paper":
            lam = eta * w_norm / (g_norm + wd * w_norm + eps)
        elif opt["denominator"] == "decayed":
            lam = eta * w_norm / (norm(d) + eps)
        else:
            raise ValueError(opt["denominator"])
        if opt["clip"]:
            s = min(lr, lam)
            state.setdefault("clip_branches", []).append("lr" if lr <= lam else "lambda")
        else:
            s = lr * lam
    if lr_outside_momentum:
        s = s / lr
    u = s * d
    v = m * state.get("v", np.zeros_like(w)) + u
    step = u + m * v if opt["nesterov"] else v
    state["v"] = v
    if lr_outside_momentum:
        step = lr * step
    return w - step, state, lam


def adam_direction(g, state, t, opt):
    """Bias-corrected Adam direction (Kingma & Ba 2015; optax.scale_by_adam, eps_root=0):
        mu <- b1*mu + (1-b1)*g;  nu <- b2*nu + (1-b2)*g^2
        u = (mu / (1-b1^(t+1))) / (sqrt(nu / (1-b2^(t+1))) + adam_eps)."""
    b1, b2 = opt["beta1"], opt["beta2"]
    mu = b1 * state.get("mu", np.zeros_like(g)) + (1.0 - b1) * g
    nu = b2 * state.get("nu", np.zeros_like(g)) + (1.0 - b2) * (g * g)
    state["mu"], state["nu"] = mu, nu
    mu_hat = mu / (1.0 - b1 ** (t + 1))
    nu_hat = nu / (1.0 - b2 ** (t + 1))
    return mu_hat / (np.sqrt(nu_hat) + opt["adam_eps"])


def lamb_step(w, g, state, lr, t, opt):
    """LAMB, You et al. 2020 ("Large Batch Optimization for Deep Learning: Training
    BERT in 76 minutes", arXiv:1904.00962), as optax.lamb:
        u = adam_direction;  u <- u + wd*w  (not for excluded params)
        r = |w| / |u|, r = 1 if either norm is 0 (excluded params: r = 1)
        w <- w - lr*r*u."""
    u = adam_direction(g, state, t, opt)
    if is_excluded(opt, w):
        r = 1.0
    else:
        u = u + opt["weight_decay"] * w
        w_norm, u_norm = norm(w), norm(u)
        r = 1.0 if (w_norm == 0.0 or u_norm == 0.0) else w_norm / u_norm
    return w - lr * r * u, state, r


def adamw_step(w, g, state, lr, t, opt):
    """AdamW, Loshchilov & Hutter 2019 (arXiv:1711.05101), as optax.adamw and
    torch.optim.AdamW:  w <- w - lr*(u + wd*w), u = adam_direction;
    no weight decay on 1-D params when exclude_1d."""
    u = adam_direction(g, state, t, opt)
    wd = 0.0 if is_excluded(opt, w) else opt["weight_decay"]
    return w - lr * (u + wd * w), state, None


STEP_FNS = {"sgd": sgd_step, "lars": lars_step, "lamb": lamb_step, "adamw": adamw_step}


def run_numpy(case, **kw):
    """Run a case; returns (expected[step][param] arrays, ratios[step][param], states)."""
    opt = case["optimizer"]
    step_fn = STEP_FNS[opt["kind"]]
    ws = [np.array(p["init"], dtype=np.float64).reshape(p["shape"]) for p in case["params"]]
    states = [{} for _ in ws]
    expected, ratios = [], []
    for t, lr in enumerate(case["lrs"]):
        row, rrow = [], []
        for i, p in enumerate(case["params"]):
            g = np.array(p["grads"][t], dtype=np.float64).reshape(p["shape"])
            ws[i], states[i], r = step_fn(ws[i], g, states[i], lr, t, opt, **kw)
            row.append(ws[i].copy())
            rrow.append(r)
        expected.append(row)
        ratios.append(rrow)
    return expected, ratios, states


# --------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------

LRS_SGD = [0.05, 0.1, 0.2, 0.15, 0.1]
LRS_LARS = [0.05, 0.1, 0.2, 0.15, 0.1, 0.05]
LRS_ADAM = [0.01, 0.02, 0.04, 0.03, 0.02]
SHAPES_2 = [("fc1.weight", [3, 4]), ("fc1.bias", [3])]
SHAPES_3 = [("fc1.weight", [3, 4]), ("fc1.bias", [3]), ("fc2.weight", [5, 3])]


def make_params(rng, shapes, n_steps):
    """Order-1 weights; gradients whose scale varies per (step, param) over ~3.5 decades."""
    params = []
    for name, shape in shapes:
        init = round6(rng.standard_normal(shape))
        grads = []
        for _ in range(n_steps):
            scale = 10.0 ** rng.uniform(-3.0, 0.5)
            grads.append(round6(scale * rng.standard_normal(shape)))
        params.append({"name": name, "shape": list(shape), "init": init, "grads": grads})
    return params


def build_cases():
    rng = np.random.default_rng(SEED)
    specs = [
        # name, optimizer overrides, shapes, lrs
        ("sgd_plain", dict(kind="sgd", momentum=0.0), SHAPES_2, LRS_SGD),
        ("sgd_momentum", dict(kind="sgd"), SHAPES_2, LRS_SGD),
        ("sgd_nesterov", dict(kind="sgd", nesterov=True), SHAPES_2, LRS_SGD),
        ("sgd_momentum_wd", dict(kind="sgd", weight_decay=0.01), SHAPES_3, LRS_SGD),
        ("sgd_nesterov_wd", dict(kind="sgd", nesterov=True, weight_decay=0.01), SHAPES_3, LRS_SGD),
        ("lars_paper", dict(kind="lars", weight_decay=5e-4), SHAPES_3, LRS_LARS),
        ("lars_paper_eta002", dict(kind="lars", weight_decay=5e-4, trust_coefficient=0.02), SHAPES_3, LRS_LARS),
        ("lars_decayed", dict(kind="lars", weight_decay=5e-4, trust_coefficient=0.02, eps=1e-4,
                              denominator="decayed"), SHAPES_3, LRS_LARS),
        ("lars_nesterov", dict(kind="lars", weight_decay=5e-4, trust_coefficient=0.02, nesterov=True),
         SHAPES_3, LRS_LARS),
        ("lars_nesterov_decayed", dict(kind="lars", weight_decay=5e-4, trust_coefficient=0.02, nesterov=True,
                                       denominator="decayed"), SHAPES_3, LRS_LARS),
        ("larc_clip", dict(kind="lars", weight_decay=5e-4, trust_coefficient=0.02, clip=True), SHAPES_3, LRS_LARS),
        ("lars_exclude_1d_false", dict(kind="lars", weight_decay=5e-4, trust_coefficient=0.02,
                                       denominator="decayed", exclude_1d=False), SHAPES_3, LRS_LARS),
        ("lars_exclude_1d_false_paper", dict(kind="lars", weight_decay=5e-4, trust_coefficient=0.02,
                                             exclude_1d=False), SHAPES_3, LRS_LARS),
        ("lars_zero_weight", dict(kind="lars", weight_decay=5e-4, trust_coefficient=0.02), SHAPES_3, LRS_LARS),
        ("lars_zero_weight_decayed", dict(kind="lars", weight_decay=5e-4, trust_coefficient=0.02,
                                          denominator="decayed"), SHAPES_3, LRS_LARS),
        ("lars_zero_grad", dict(kind="lars", weight_decay=5e-4, trust_coefficient=0.02), SHAPES_3, LRS_LARS),
        ("lars_zero_grad_nowd", dict(kind="lars", trust_coefficient=0.02, denominator="decayed"),
         SHAPES_3, LRS_LARS),
        ("lamb", dict(kind="lamb"), SHAPES_3, LRS_ADAM),
        ("lamb_wd", dict(kind="lamb", weight_decay=0.01), SHAPES_3, LRS_ADAM),
        ("lamb_exclude_1d_false", dict(kind="lamb", weight_decay=0.01, exclude_1d=False), SHAPES_3, LRS_ADAM),
        ("adamw", dict(kind="adamw", weight_decay=0.01, exclude_1d=False), SHAPES_3, LRS_ADAM),
        ("adamw_exclude_1d", dict(kind="adamw", weight_decay=0.01), SHAPES_3, LRS_ADAM),
    ]
    cases = []
    for name, overrides, shapes, lrs in specs:
        opt = dict(DEFAULTS)
        opt.update(overrides)
        assert set(opt) == set(DEFAULTS), name
        params = make_params(rng, shapes, len(lrs))
        if name.startswith("lars_zero_weight"):
            # fc2.weight starts at all zeros -> ratio 1 at step 0 (guard |w| == 0)
            params[2]["init"] = np.zeros(params[2]["shape"])
        if name.startswith("lars_zero_grad"):
            # fc1.weight gets an all-zero gradient at step 2 -> ratio 1 (guard |g| == 0);
            # with wd > 0 ("paper") the step is then lr*1*wd*w, not lr*(eta/wd)*wd*w
            params[0]["grads"][2] = np.zeros(params[0]["shape"])
        cases.append({"name": name, "optimizer": opt, "lrs": list(lrs), "params": params})
    return cases


def self_checks(case, expected, ratios, states):
    """Sanity checks on the numpy results (independent of optax)."""
    opt = case["optimizer"]
    name = case["name"]
    for row in expected:
        for a in row:
            assert np.all(np.isfinite(a)), name
    if opt["kind"] == "lars" and opt["clip"]:
        branches = set(b for s in states for b in s.get("clip_branches", []))
        assert branches == {"lr", "lambda"}, (name, branches)
    if name == "lars_zero_weight" or name == "lars_zero_weight_decayed":
        assert ratios[0][2] == 1.0 and ratios[1][2] != 1.0, (name, ratios)
    if name.startswith("lars_zero_grad"):
        assert ratios[2][0] == 1.0 and ratios[1][0] != 1.0, (name, ratios)
    if opt["kind"] == "lars" and opt["denominator"] == "decayed":
        # The issue guards "decayed" on |g| == 0, optax on |g + wd*w| == 0; make sure
        # no case distinguishes them (g == 0 while wd*w != 0 on a non-excluded param).
        for p in case["params"]:
            excluded = opt["exclude_1d"] and len(p["shape"]) == 1
            for g in p["grads"]:
                if not excluded and norm(g) == 0.0:
                    assert opt["weight_decay"] == 0.0, name
    if opt["kind"] == "lars" and opt["momentum"] != 0.0:
        # The lrs must make "lr inside momentum" differ from "lr outside momentum".
        alt, _, _ = run_numpy(case, lr_outside_momentum=True)
        diff = max(rel_diff(a, b) for ra, rb in zip(expected, alt) for a, b in zip(ra, rb))
        assert diff > 1e-6, (name, diff)


def rel_diff(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.maximum(np.abs(a), np.abs(b))
    d = np.abs(a - b)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(scale > 0, d / np.where(scale > 0, scale, 1.0), 0.0)
    return float(np.max(r)) if r.size else 0.0


# --------------------------------------------------------------------------
# optax cross-check
# --------------------------------------------------------------------------

def optax_transform(case, optax, jnp):
    """The optax optimizer matching `case`, or (None, reason) when optax has none."""
    opt = case["optimizer"]
    lrs = jnp.asarray(case["lrs"], dtype=jnp.float64)

    def schedule(count):
        return lrs[count]

    mask = {p["name"]: (not opt["exclude_1d"]) or len(p["shape"]) > 1 for p in case["params"]}
    kind = opt["kind"]
    if kind == "sgd":
        return optax.chain(
            optax.add_decayed_weights(opt["weight_decay"]),
            optax.sgd(learning_rate=schedule, momentum=opt["momentum"], nesterov=opt["nesterov"]),
        ), "optax.chain(add_decayed_weights(wd), optax.sgd(lr, momentum, nesterov))"
    if kind == "lars":
        if opt["clip"]:
            return None, "clip (LARC) is not in optax"
        if opt["denominator"] != "decayed" and opt["weight_decay"] != 0.0:
            return None, "optax.lars uses the 'decayed' denominator |g + wd*w|"
        return optax.lars(
            learning_rate=schedule,
            weight_decay=opt["weight_decay"],
            weight_decay_mask=mask,
            trust_coefficient=opt["trust_coefficient"],
            eps=opt["eps"],
            trust_ratio_mask=mask,
            momentum=opt["momentum"],
            nesterov=opt["nesterov"],
        ), "optax.lars(lr, wd, weight_decay_mask=ndim>1 mask, trust_coefficient, eps, trust_ratio_mask=same, momentum, nesterov)"
    if kind == "lamb":
        if not opt["exclude_1d"]:
            return optax.lamb(
                learning_rate=schedule, b1=opt["beta1"], b2=opt["beta2"], eps=opt["adam_eps"],
                weight_decay=opt["weight_decay"],
            ), "optax.lamb(lr, b1, b2, eps, weight_decay)"
        # optax.lamb's mask only masks weight decay; build the chain with a masked trust ratio.
        return optax.chain(
            optax.scale_by_adam(b1=opt["beta1"], b2=opt["beta2"], eps=opt["adam_eps"]),
            optax.add_decayed_weights(opt["weight_decay"], mask=mask),
            optax.masked(optax.scale_by_trust_ratio(), mask),
            optax.scale_by_learning_rate(schedule),
        ), ("optax.chain(scale_by_adam, add_decayed_weights(wd, mask), "
            "masked(scale_by_trust_ratio(), mask), scale_by_learning_rate(lr))")
    if kind == "adamw":
        return optax.adamw(
            learning_rate=schedule, b1=opt["beta1"], b2=opt["beta2"], eps=opt["adam_eps"],
            weight_decay=opt["weight_decay"], mask=mask,
        ), "optax.adamw(lr, b1, b2, eps, weight_decay, mask=ndim>1 mask or all True)"
    raise ValueError(kind)


def run_optax(case, tx, optax, jnp):
    params = {p["name"]: jnp.asarray(np.array(p["init"]).reshape(p["shape"]), dtype=jnp.float64)
              for p in case["params"]}
    state = tx.init(params)
    out = []
    for t in range(len(case["lrs"])):
        grads = {p["name"]: jnp.asarray(np.array(p["grads"][t]).reshape(p["shape"]), dtype=jnp.float64)
                 for p in case["params"]}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append([np.asarray(params[p["name"]], dtype=np.float64) for p in case["params"]])
    return out


def cross_check(cases, results):
    try:
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        import optax
    except ImportError as e:  # pragma: no cover
        print(f"WARNING: jax/optax not importable ({e}); NOT cross-checking against optax. "
              f"The file is still written from the numpy formulas.", file=sys.stderr)
        return None
    print(f"cross-checking against optax {optax.__version__} (jax {jax.__version__}, x64)")
    summary = []
    for case in cases:
        tx, how = optax_transform(case, optax, jnp)
        if tx is None:
            print(f"  {case['name']:30s} not cross-checked: {how}")
            continue
        ref = run_optax(case, tx, optax, jnp)
        ours = results[case["name"]][0]
        diff = max(rel_diff(a, b) for ra, rb in zip(ours, ref) for a, b in zip(ra, rb))
        ok = diff <= REL_TOL
        print(f"  {case['name']:30s} {'OK  ' if ok else 'FAIL'} max rel diff {diff:.3e}  via {how}")
        assert ok, f"{case['name']}: numpy and optax differ by {diff:.3e} relative"
        summary.append((case["name"], diff))
    print(f"{len(summary)} cases cross-checked, max rel diff overall "
          f"{max(d for _, d in summary):.3e}")
    return summary


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------

def to_json_case(case, expected, ratios):
    out = {
        "name": case["name"],
        "optimizer": case["optimizer"],
        "lrs": [float(x) for x in case["lrs"]],
        "params": [{
            "name": p["name"],
            "shape": p["shape"],
            "init": [float(x) for x in np.asarray(p["init"]).ravel()],
            "grads": [[float(x) for x in np.asarray(g).ravel()] for g in p["grads"]],
        } for p in case["params"]],
        "expected": [[[float(x) for x in a.ravel()] for a in row] for row in expected],
    }
    if case["optimizer"]["kind"] in ("lars", "lamb"):
        out["trust_ratios"] = [[float(r) for r in row] for row in ratios]
    return out


def is_flat(x):
    return isinstance(x, list) and not any(isinstance(y, (list, dict)) for y in x)


def dumps(obj, indent=0):
    """JSON with objects and nested lists spread over lines, flat number lists on one line."""
    pad = "  " * indent
    if isinstance(obj, dict):
        items = [f"{pad}  {json.dumps(k)}: {dumps(v, indent + 1).lstrip()}" for k, v in obj.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and not is_flat(obj):
        return pad + "[\n" + ",\n".join(dumps(x, indent + 1) for x in obj) + "\n" + pad + "]"
    return pad + json.dumps(obj, allow_nan=False)


def main():
    cases = build_cases()
    results = {}
    for case in cases:
        expected, ratios, states = run_numpy(case)
        self_checks(case, expected, ratios, states)
        results[case["name"]] = (expected, ratios)
    cross_check(cases, results)
    doc = {
        "generator": "tests/vectors/gen_optim_vectors.py",
        "cases": [to_json_case(c, *results[c["name"]]) for c in cases],
    }
    text = dumps(doc) + "\n"
    json.loads(text)  # well-formed
    with open(OUT_PATH, "w") as f:
        f.write(text)
    print(f"wrote {OUT_PATH} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
