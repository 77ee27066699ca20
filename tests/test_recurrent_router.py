"""The recurrent router across layers against a NumPy loop written from the paper's section 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmoe_jax.model import build_model
from rmoe_jax.model.routers import RecurrentRouter, SharedRouterParams

import numpy_reference as ref
from helpers import random_params, small_model

VARIANTS = {
    "gru_biases": {"router.bias": True, "router.projector_bias": True, "router.init": "torch"},
    "gru_no_bias": {},
    "lstm": {"router.cell": "lstm"},
    "rnn": {"router.cell": "rnn"},
    "no_recurrence": {"router.no_recurrence": True},
    "shared_projector": {"router.shared_projector": True, "router.projector_bias": True},
    "residual_alpha": {"router.no_recurrence": True, "router.residual_alpha": 0.5,
                       "router.bias": True},
    "xmoe_head": {"router.head": "xmoe"},
    "cosine_head": {"router.head": "cosine"},
}


def numpy_head(params, h, head):
    if head == "linear":
        return h @ params["kernel"] + params.get("bias", 0.0)
    if head == "xmoe":
        h = h @ params["down"]["kernel"]
    scale = np.exp(min(float(params["logit_scale"]), np.log(100.0)))
    return ref.l2_normalize(h) @ ref.l2_normalize(params["expert_embedding"]).T * scale


def numpy_router_logits(params, moe_inputs, cfg):
    """x'_i = Proj_i(x_i); h_i = Cell(x'_i, h_{i-1}); logits_i = W_i h_i (+ alpha W_i h_{i-1})."""
    cell = params["router_shared"]["cell"]
    routers = params["layers"]["moe"]["router"]
    size = cfg.router.hidden_size * (2 if cfg.router.cell == "lstm" else 1)
    state = np.zeros((moe_inputs.shape[1], size))
    all_logits = []
    for layer, x in enumerate(moe_inputs):
        layer_params = jax.tree.map(lambda a: np.asarray(a[layer]), routers)
        if cfg.router.shared_projector:
            shared = params["router_shared"]
            projected = x @ shared["projector_kernel"] + shared.get("projector_bias", 0.0)
        else:
            projected = x @ layer_params["projector"]["kernel"] + layer_params["projector"].get("bias", 0.0)
        cell_state = np.zeros_like(state) if cfg.router.no_recurrence else state
        new_state = ref.CELLS[cfg.router.cell](cell, projected, cell_state)
        h = new_state[:, :cfg.router.hidden_size]
        logits = numpy_head(layer_params["gate"], h, cfg.router.head)
        if cfg.router.residual_alpha:
            logits = logits + cfg.router.residual_alpha * numpy_head(
                layer_params["gate"], state[:, :cfg.router.hidden_size], cfg.router.head)
        all_logits.append(logits)
        state = new_state
    return np.stack(all_logits)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_per_layer_logits_match_numpy_loop(variant):
    cfg = small_model("recurrent", **VARIANTS[variant])
    model = build_model(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    # O(1) random params (cosine heads: a random logit_scale per layer): at init scale the
    # logits are ~1e-3 and e.g. a GRU with r and z swapped would pass.
    params = random_params(cfg, seed=2, scale=0.5)
    _, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
    recorded = state["intermediates"]["layers"]["moe"]
    moe_inputs = np.asarray(recorded["moe_input"][0], np.float64)  # [L, N, d]
    logits = np.asarray(recorded["router_logits"][0])  # [L, N, E]
    numpy_params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    np.testing.assert_allclose(logits, numpy_router_logits(numpy_params, moe_inputs, cfg),
                               rtol=2e-4, atol=2e-5)
    # One cell for all layers: stored once, with no leading layer axis.
    cell = params["router_shared"]["cell"]
    gates = {"gru": 3, "rnn": 1, "lstm": 4}[cfg.router.cell]
    assert cell["hidden_kernel"].shape == (cfg.router.hidden_size, gates * cfg.router.hidden_size)
    assert "cell" not in params["layers"]["moe"]["router"]


def _router_chain(cfg, num_layers=4, tokens=6):
    """The recurrent router applied over layers with fixed inputs: (params, fn(params) -> logits)."""
    router = RecurrentRouter(cfg.router, cfg.moe.num_experts)
    shared_module = SharedRouterParams(cfg.router, cfg.d_model)
    xs = jax.random.normal(jax.random.key(5), (num_layers, tokens, cfg.d_model))
    state0 = jnp.zeros((tokens, cfg.router.hidden_size))
    shared_vars = shared_module.init(jax.random.key(7))
    shared = shared_module.apply(shared_vars)
    layer_vars = [router.init(jax.random.key(10 + i), xs[i], state0, shared) for i in range(num_layers)]

    def all_logits(layer_params, shared_params):
        shared = shared_module.apply(shared_params)
        state, outs = state0, []
        for i in range(num_layers):
            logits, state = router.apply(layer_params[i], xs[i], state, shared)
            outs.append(logits)
        return outs

    return layer_vars, shared_vars, all_logits


def _projector_grad(layer_params, shared_params, fn, source, target):
    grads = jax.grad(lambda lp: jnp.sum(fn(lp, shared_params)[target] ** 2))(layer_params)
    return float(jnp.abs(grads[source]["params"]["projector"]["kernel"]).max())


@pytest.mark.parametrize("option,flows", [({}, True), ({"router.detach": True}, False),
                                          ({"router.no_recurrence": True}, False)])
def test_gradient_through_recurrence(option, flows):
    cfg = small_model("recurrent", **option)
    layer_params, shared_params, fn = _router_chain(cfg)
    grad = _projector_grad(layer_params, shared_params, fn, source=1, target=2)
    assert (grad > 1e-6) == flows, grad
    # Layer i's own projector always gets gradient from layer i's logits.
    assert _projector_grad(layer_params, shared_params, fn, source=2, target=2) > 1e-6


def test_shared_cell_gets_gradient_from_every_layer():
    cfg = small_model("recurrent")
    layer_params, shared_params, fn = _router_chain(cfg)
    for layer in range(4):
        grads = jax.grad(lambda sp: jnp.sum(fn(layer_params, sp)[layer] ** 2))(shared_params)
        cell_grad = grads["params"]["cell"]["input_kernel"]
        assert float(jnp.abs(cell_grad).max()) > 1e-6, layer


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "save_moe", "save_moe_attention"])
def test_every_remat_policy_keeps_the_router_state(policy, capsys):
    """Under each remat policy the backward reuses the router's new state `[tokens, p]` (and,
    where no dot is saved, its cell input x') instead of rerunning the cell (on TPU a Pallas
    call, which no dot policy would save) and the projector."""
    from rmoe_jax.model.transformer import REMAT_POLICIES

    cfg = small_model("recurrent")
    router = RecurrentRouter(cfg.router, cfg.moe.num_experts)
    shared_module = SharedRouterParams(cfg.router, cfg.d_model)
    tokens, width = 6, cfg.router.hidden_size
    x = jax.random.normal(jax.random.key(1), (tokens, cfg.d_model))
    state0 = jax.random.normal(jax.random.key(2), (tokens, width))
    shared = shared_module.apply(shared_module.init(jax.random.key(3)))
    params = router.init(jax.random.key(4), x, state0, shared)

    def objective(params, x, state):
        logits, new_state = router.apply(params, x, state, shared)
        return jnp.sum(jnp.tanh(logits)) + jnp.sum(new_state ** 2)

    remat = jax.checkpoint(objective, policy=REMAT_POLICIES[policy])
    jax.ad_checkpoint.print_saved_residuals(remat, params, x, state0)
    named = [line for line in capsys.readouterr().out.splitlines() if "named '" in line]
    names = sorted(line.split("named ")[1].split()[0].strip("'") for line in named)
    # The dot policies save x' by what it is, a matmul output, or its consumers' outputs.
    assert names == (["router_state"] if policy.startswith("dots") else
                     ["router_cell_input", "router_state"])
    assert all(line.startswith(f"f32[{tokens},{width}]") for line in named)
