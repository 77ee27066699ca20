"""Every baseline router, the shared-expert mix and the z-loss term against NumPy (float64)
written from the equations, inside the full model with O(1) random params (at init scale the
logits are ~1e-3 and a wrong activation or a transposed kernel hides under the tolerance)."""

import functools
import math

import jax
import ml_collections
import numpy as np
import pytest
from scipy.special import erf

from rmoe_jax.model import build_model
from rmoe_jax.model.moe import MoEBlock

import numpy_reference as ref
from helpers import random_params, small_model

RTOL, ATOL = 2e-4, 2e-5  # float32 against float64; the correct code stays < 3% of this, a
# tanh-approximate GELU in the MLP router is > 15x over it
MAX_SCALE = math.log(100.0)
COSINE_SCALES = {"cosine": [1.3, 5.5, 0.8], "xmoe": [2.0, 0.7, 4.9]}  # one per layer, one > ln 100
AUX = {"moe.balance_coef": 0.1, "moe.z_loss_coef": 0.05}

CASES = {
    "linear": ("linear", {}),
    "linear_bias": ("linear", {"router.bias": True}),
    "mlp": ("mlp", {}),
    "mlp_bias": ("mlp", {"router.bias": True}),
    "random": ("random", {}),
    "cosine": ("cosine", {}),
    "xmoe": ("xmoe", {}),
    "hyper": ("hyper", {}),
}

# The router params each reference reads: all of them (a param the reference ignored could
# hold a bug), and the random / hyper routers' fixed tensors are frozen_* (never trained).
ROUTER_PARAMS = {
    "linear": {"gate/kernel"},
    "linear_bias": {"gate/kernel", "gate/bias"},
    "mlp": {"hidden/kernel", "hidden/bias", "gate/kernel"},
    "mlp_bias": {"hidden/kernel", "hidden/bias", "gate/kernel", "gate/bias"},
    "random": {"frozen_kernel"},
    "cosine": {"head/expert_embedding", "head/logit_scale"},
    "xmoe": {"head/down/kernel", "head/expert_embedding", "head/logit_scale"},
    "hyper": {"embedding", "frozen_hyper_in", "frozen_hyper_out"},
}


def gelu(x):
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2))."""
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def silu(x):
    return x * ref.sigmoid(x)


def cosine_logits(z, experts, logit_scale):
    """cos(z, e_j) * exp(min(s, ln 100))."""
    return ref.l2_normalize(z) @ ref.l2_normalize(experts).T * np.exp(min(float(logit_scale), MAX_SCALE))


def numpy_router(router, p, x, num_experts):
    """One layer's logits `[N, E]` from its router params `p` and MoE input `x` `[N, d]`."""
    if router == "linear":
        return x @ p["gate"]["kernel"] + p["gate"].get("bias", 0.0)
    if router == "mlp":
        h = gelu(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
        return h @ p["gate"]["kernel"] + p["gate"].get("bias", 0.0)
    if router == "random":
        return x @ p["frozen_kernel"]
    if router == "cosine":
        return cosine_logits(x, p["head"]["expert_embedding"], p["head"]["logit_scale"])
    if router == "xmoe":
        return cosine_logits(x @ p["head"]["down"]["kernel"], p["head"]["expert_embedding"],
                             p["head"]["logit_scale"])
    if router == "hyper":
        flat = np.maximum(p["embedding"] @ p["frozen_hyper_in"], 0.0) @ p["frozen_hyper_out"]
        return x @ flat.reshape(x.shape[-1], num_experts)  # row-major [d, E]
    raise ValueError(router)


def _float64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@functools.lru_cache(maxsize=None)
def run(case):
    """(cfg, float64 params, moe inputs [L, N, d], router logits [L, N, E], aux): one compile."""
    router, overrides = CASES[case]
    cfg = small_model(router, **overrides, **AUX)
    params = random_params(cfg, seed=11, scale=0.5)
    if router in COSINE_SCALES:
        head = params["layers"]["moe"]["router"]["head"]
        head["logit_scale"] = np.asarray(COSINE_SCALES[router], np.float32)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    (_, aux), state = build_model(cfg).apply({"params": params}, tokens, mutable=["intermediates"])
    recorded = state["intermediates"]["layers"]["moe"]
    return (cfg, _float64(params), np.asarray(recorded["moe_input"][0], np.float64),
            np.asarray(recorded["router_logits"][0], np.float64), jax.tree.map(np.asarray, aux))


def _param_paths(tree):
    return {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_router_logits_match_numpy(case):
    cfg, params, moe_inputs, logits, _ = run(case)
    router = CASES[case][0]
    routers = params["layers"]["moe"]["router"]
    assert _param_paths(routers) == ROUTER_PARAMS[case]
    assert "router_shared" not in params
    expected = np.stack([numpy_router(router, jax.tree.map(lambda a, i=i: a[i], routers), x,
                                      cfg.moe.num_experts) for i, x in enumerate(moe_inputs)])
    assert np.std(expected) > 0.5  # decisive routing: a wrong term would show
    np.testing.assert_allclose(logits, expected, rtol=RTOL, atol=ATOL)


def _top_k(probs, k):
    """Indices of the k largest probabilities, checking no float32 rounding could flip them."""
    order = np.argsort(-probs, axis=-1)
    ranked = np.take_along_axis(probs, order, axis=-1)
    assert np.all(ranked[..., k - 1] - ranked[..., k] > 1e-4), "near tie: pick another seed"
    return order[..., :k]


def test_z_loss_enters_the_aux_total():
    """aux_loss = balance_coef * sum_l E sum_e f_e P_e + z_coef * mean_l mean_n logsumexp^2."""
    cfg, _, _, logits, aux = run("linear_bias")
    num_experts, k = cfg.moe.num_experts, cfg.moe.top_k
    probs = ref.softmax(logits)  # [L, N, E]
    top = _top_k(probs, k)
    fractions = np.stack([np.bincount(t.ravel(), minlength=num_experts) / t.size for t in top])
    balance = np.sum(num_experts * np.sum(fractions * probs.mean(1), axis=-1))
    peak = logits.max(-1)
    lse = peak + np.log(np.exp(logits - peak[..., None]).sum(-1))
    z = np.mean(np.mean(lse**2, axis=-1))
    assert z > 1.0  # O(1) logits: the term matters
    np.testing.assert_allclose(aux["z_loss"], z, rtol=1e-5)
    np.testing.assert_allclose(aux["balance_loss"], balance, rtol=1e-5)
    np.testing.assert_allclose(aux["aux_loss"], 0.1 * balance + 0.05 * z, rtol=1e-5)


def swiglu(x, w1, w3, w2):
    return (silu(x @ w1) * (x @ w3)) @ w2


def test_shared_expert_mix_matches_numpy():
    """y = routed_weight * sum_top-k w_e SwiGLU_e(x) + shared_weight * SwiGLU_shared(x)."""
    overrides = {"moe.shared_expert": True, "moe.shared_expert_hidden": 12,
                 "moe.routed_weight": 0.7, "moe.shared_weight": 0.3}
    cfg = small_model("linear", **overrides)
    params = jax.tree.map(lambda a: a[0], random_params(cfg, seed=5, scale=0.5)["layers"]["moe"])
    assert _param_paths(params) == {"router/gate/kernel", "w1", "w3", "w2", "shared_expert/w1/kernel",
                                    "shared_expert/w3/kernel", "shared_expert/w2/kernel"}
    block = MoEBlock(ml_collections.FrozenConfigDict(cfg.moe), ml_collections.FrozenConfigDict(cfg.router))
    x = np.random.default_rng(6).normal(size=(2, 8, cfg.d_model)).astype(np.float32)
    y, _, _ = block.apply({"params": params}, x, np.zeros((16, 0), np.float32), {})

    p = _float64(params)
    tokens = x.reshape(-1, cfg.d_model).astype(np.float64)
    probs = ref.softmax(tokens @ p["router"]["gate"]["kernel"])
    top = _top_k(probs, cfg.moe.top_k)
    routed = np.zeros_like(tokens)
    for n, token in enumerate(tokens):
        weights = probs[n, top[n]] / probs[n, top[n]].sum()
        for e, w in zip(top[n], weights):
            routed[n] += w * swiglu(token, p["w1"][e], p["w3"][e], p["w2"][e])
    s = p["shared_expert"]
    shared = swiglu(tokens, s["w1"]["kernel"], s["w3"]["kernel"], s["w2"]["kernel"])
    expected = 0.7 * routed + 0.3 * shared
    assert np.std(routed) > 0.5 and np.std(shared) > 0.5
    np.testing.assert_allclose(np.asarray(y).reshape(tokens.shape), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("init", ["normal", "torch"])
@pytest.mark.parametrize("router", ["linear", "mlp", "random", "cosine", "xmoe", "hyper", "recurrent"])
def test_every_router_initialises_alone(router, init):
    """A router from `build_router` initialises and runs as a module of its own (what `aot
    --steps parts` compiles): it creates the params the model's router has (per layer), and
    `router.init` reaches it (torch's U(+-1/sqrt(fan_in)) is ~5x wider than N(0, 0.02))."""
    from rmoe_jax.model import routers

    cfg = small_model(router, **{"router.init": init})
    model_params = jax.eval_shape(build_model(cfg).init, jax.random.key(0),
                                  np.zeros((2, 8), np.int32))["params"]
    per_layer = jax.tree.map(lambda a: a.shape[1:], model_params["layers"]["moe"]["router"])
    tokens, num_experts = 16, cfg.moe.num_experts
    x = np.random.default_rng(0).normal(size=(tokens, cfg.d_model)).astype(np.float32)
    state = np.zeros((tokens, routers.router_state_size(cfg.router)), np.float32)
    shared = {}
    if router == "recurrent":
        shared_module = routers.SharedRouterParams(cfg.router, cfg.d_model, cfg.init_std)
        shared = shared_module.apply(shared_module.init(jax.random.key(1)))
    module = routers.build_router(cfg.router, num_experts, cfg.init_std)
    params = module.init(jax.random.key(2), x, state, shared)["params"]
    assert jax.tree.map(np.shape, params) == per_layer
    logits, _ = module.apply({"params": params}, x, state, shared)
    assert logits.shape == (tokens, num_experts) and np.all(np.isfinite(logits))
    followers = {"linear": ("gate",), "mlp": ("gate",), "xmoe": ("head", "down")}
    if router in followers:  # the routers whose kernels follow router.init
        kernel = np.asarray(functools.reduce(dict.__getitem__, followers[router], params)["kernel"])
        fan_in = kernel.shape[0]
        if init == "torch":
            assert 0.5 / math.sqrt(fan_in) < np.abs(kernel).max() <= 1 / math.sqrt(fan_in)
        else:
            assert np.abs(kernel).max() < 0.1
