"""Full-model gradients of the recurrent router against an independent autograd (PyTorch).

The JAX model (layer `nn.scan`, router state in the carry) and the PyTorch RMoE of
`torch_rmoe_reference.py` (transformers' Mixtral with its gates replaced by one shared
`torch.nn.GRUCell`) get the same random O(1) weights through an export; the gradients of the
next-token loss with respect to every layer's projector (`weight1`), router head (`weight2`), the
shared GRU, the embedding and the LM head must agree. This is what guards the gradient through
the recurrence inside the scan: a `stop_gradient` on the carried router state changes the earlier
layers' projector and the GRU gradients and fails here.

RMoE-detach has the same forward as RMoE, so its gradients must differ from RMoE's exactly where
gradient flows back through a step h_{j-1} -> h_j of the recurrence (the paper, Table 5):
layer i's projector reaches h_i, which feeds layer i+1's cell, so it differs for i < L-1; layer
i's head changes layer i+1's input and so h_{i+1}, which feeds a later cell for i < L-2. The LM
head, the last layer's projector and the last two heads see the same gradient. RMoE-NP's cell
never sees a state, so its hidden-to-hidden weights get no gradient at all.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from rmoe_jax import export
from rmoe_jax.model import build_model

from helpers import random_params, small_model
from torch_rmoe_reference import load_torch_rmoe

NUM_LAYERS = 4
VARIANTS = {
    "rmoe": {},
    "rmoe_np": {"router.no_recurrence": True},
    "rmoe_detach": {"router.detach": True},
}


def config_for(variant):
    return small_model("recurrent", num_layers=NUM_LAYERS, **VARIANTS[variant])


@functools.lru_cache(maxsize=None)
def tokens():
    return np.random.default_rng(11).integers(0, 64, (3, 13)).astype(np.int64)


def jax_gradients(cfg, params) -> dict[str, np.ndarray]:
    """d(mean next-token cross-entropy)/d(params), as {export name: array in torch layout}."""
    model = build_model(cfg)
    inputs, targets = jnp.asarray(tokens()[:, :-1], jnp.int32), jnp.asarray(tokens()[:, 1:], jnp.int32)

    def loss(p):
        logits, _ = model.apply({"params": p}, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    grads = jax.jit(jax.grad(loss))(params)
    # The export mapping is linear (transposes, splits), so it maps gradients like params.
    return export.to_torch_tensors(cfg, grads)


def torch_gradients(folder: str, variant: str) -> dict[str, np.ndarray]:
    """The same gradients from PyTorch autograd on the reference model, by export name."""
    overrides = VARIANTS[variant]
    model = load_torch_rmoe(folder, detach=bool(overrides.get("router.detach")),
                            no_recurrence=bool(overrides.get("router.no_recurrence")))
    ids = torch.as_tensor(tokens())
    logits = model(ids[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    out = {"model.embed_tokens.weight": model.model.embed_tokens.weight.grad,
           "lm_head.weight": model.lm_head.weight.grad}
    for i, layer in enumerate(model.model.layers):
        gate = layer.mlp.gate
        out[f"model.layers.{i}.block_sparse_moe.weight1"] = gate.weight1.grad
        out[f"model.layers.{i}.block_sparse_moe.weight2"] = gate.weight2.grad
    cell = model.rnn_router.cell
    for ours, grad in (("weight_i", cell.weight_ih.grad), ("weight_h", cell.weight_hh.grad),
                       ("bias_i", cell.bias_ih.grad), ("bias_h", cell.bias_hh.grad)):
        for gate_name, block in zip("rzn", grad.chunk(3)):  # torch stacks r, z, n
            out[f"model.rnn_router.{ours}{gate_name}"] = block
    return {name: g.detach().numpy().astype(np.float64) for name, g in out.items()}


@functools.lru_cache(maxsize=None)
def both_gradients(variant: str, folder_root: str):
    cfg = config_for(variant)
    params = random_params(cfg, seed=3, scale=0.4)  # O(1) weights: routing is decisive
    folder = export.export_model(cfg, params, f"{folder_root}/{variant}")
    return jax_gradients(cfg, params), torch_gradients(folder, variant)


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("router_gradients"))


def assert_close(ours, theirs, name):
    scale = float(np.abs(theirs).max())
    assert scale > 1e-6, f"{name}: no gradient at all in the reference"
    np.testing.assert_allclose(ours, theirs, rtol=2e-3, atol=2e-4 * scale, err_msg=name)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_router_gradients_match_torch_autograd(variant, folder_root):
    ours, theirs = both_gradients(variant, folder_root)
    for name, reference in theirs.items():
        if variant == "rmoe_np" and name.startswith("model.rnn_router.weight_h"):
            assert not np.any(reference) and not np.any(ours[name]), name  # h_{i-1} = 0 always
            continue
        assert_close(ours[name], reference, name)


def test_detach_differs_from_rmoe_only_where_the_state_carries_gradient(folder_root):
    rmoe, _ = both_gradients("rmoe", folder_root)
    detach, _ = both_gradients("rmoe_detach", folder_root)
    B = "model.layers.{}.block_sparse_moe."

    def differs(name):
        return float(np.abs(rmoe[name] - detach[name]).max()) > 1e-2 * float(np.abs(rmoe[name]).max())

    last = NUM_LAYERS - 1
    assert not differs("lm_head.weight")
    for i in range(NUM_LAYERS):
        assert differs(B.format(i) + "weight1") == (i < last), i
        assert differs(B.format(i) + "weight2") == (i < last - 1), i
    for gate in "rzn":
        assert differs(f"model.rnn_router.weight_h{gate}"), gate
    assert differs("model.embed_tokens.weight")
