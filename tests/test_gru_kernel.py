"""The fused Pallas GRU kernel (`rmoe_jax.model.gru_kernel`, the router's cell on TPU), run by the
Pallas interpreter on CPU, against torch's `GRUCell` and its autograd: the output and the
gradients of x, h and all four weights, with padded rows and several row blocks, alone and
inside a shard_map over an 8-device mesh; and when the router picks it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import tiny
from rmoe_jax import parallel
from rmoe_jax.model import gru_kernel, recurrent

SIZE = 128  # the kernel's lane width: the smallest hidden size it takes


def _problem(rows, seed=0):
    rng = np.random.default_rng(seed)
    draw = lambda *shape, scale=0.1: (rng.normal(size=shape) * scale).astype(np.float32)  # noqa: E731
    params = {"input_kernel": draw(SIZE, 3 * SIZE), "hidden_kernel": draw(SIZE, 3 * SIZE),
              "input_bias": draw(3 * SIZE, scale=0.5), "hidden_bias": draw(3 * SIZE, scale=0.5)}
    return params, draw(rows, SIZE, scale=1.0), draw(rows, SIZE, scale=1.0), draw(rows, SIZE, scale=1.0)


def _torch_reference(params, x, h, probe):
    """torch GRUCell: h' and the gradients of sum(h' * probe), in our parameter layout."""
    cell = torch.nn.GRUCell(SIZE, SIZE)
    with torch.no_grad():  # torch stores [3p, in]; ours is [in, 3p], same gate order
        cell.weight_ih.copy_(torch.from_numpy(params["input_kernel"].T.copy()))
        cell.weight_hh.copy_(torch.from_numpy(params["hidden_kernel"].T.copy()))
        cell.bias_ih.copy_(torch.from_numpy(params["input_bias"]))
        cell.bias_hh.copy_(torch.from_numpy(params["hidden_bias"]))
    x_t, h_t = torch.tensor(x, requires_grad=True), torch.tensor(h, requires_grad=True)
    out = cell(x_t, h_t)
    (out * torch.from_numpy(probe)).sum().backward()
    grads = {"input_kernel": cell.weight_ih.grad.numpy().T, "hidden_kernel": cell.weight_hh.grad.numpy().T,
             "input_bias": cell.bias_ih.grad.numpy(), "hidden_bias": cell.bias_hh.grad.numpy()}
    return out.detach().numpy(), grads, x_t.grad.numpy(), h_t.grad.numpy()


def _kernel_output_and_grads(params, x, h, probe):
    def objective(params, x, h):
        out = gru_kernel.fused_gru_step(params, x, h, interpret=True)
        return jnp.sum(out * probe), out

    (_, out), grads = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)(params, x, h)
    return (out,) + tuple(grads)


def _assert_matches_torch(ours, expected):
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


# 37 rows: padded to 40, 5 blocks of 8 (one sum); 48: 3 blocks of 16; 32 rows in blocks of at
# most 8: 4 blocks, two weight-gradient sums of 2 blocks each (the megacore split).
@pytest.mark.parametrize("rows, max_block", [(37, 1024), (48, 1024), (32, 8)])
def test_kernel_matches_torch_gru_cell(rows, max_block, monkeypatch):
    monkeypatch.setattr(gru_kernel, "MAX_BLOCK_ROWS", max_block)
    params, x, h, probe = _problem(rows)
    with jax.default_matmul_precision("highest"):
        ours = _kernel_output_and_grads(params, x, h, probe)
    _assert_matches_torch(ours, _torch_reference(params, x, h, probe))


def test_kernel_under_an_eight_device_mesh(monkeypatch):
    """Rows sharded over data x expert (4 shards), replicated over tensor (2): each shard runs
    the kernel on its rows (2 blocks of 8); the weights' gradients are summed over row shards
    exactly once."""
    monkeypatch.setattr(gru_kernel, "MAX_BLOCK_ROWS", 8)
    config = tiny.get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.expert, config.mesh.tensor = 2, 1, 2, 2
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:8])
    params, x, h, probe = _problem(64, seed=1)
    rows = NamedSharding(mesh, P(parallel.BATCH_AXES, None))
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES), \
            jax.default_matmul_precision("highest"):
        ours = jax.jit(_kernel_output_and_grads)(params, jax.device_put(x, rows),
                                                 jax.device_put(h, rows), probe)
    _assert_matches_torch(ours, _torch_reference(params, x, h, probe))


def test_block_rows():
    assert gru_kernel.block_rows_for(20480) == 1024
    assert gru_kernel.block_rows_for(48) == 16
    assert gru_kernel.block_rows_for(40) == 8
    assert gru_kernel.gru_kernel_supported(128, 256)
    assert not gru_kernel.gru_kernel_supported(128, 64)


def test_router_step_is_the_xla_cell_off_tpu():
    """On CPU the router's GRU is `recurrent.gru_step` whatever the width (the kernel is
    TPU-only); the compiled CPU program has no Pallas call in it."""
    params, x, h, _ = _problem(16)
    step = recurrent.router_step("gru")
    text = jax.jit(step).lower(params, x, h).as_text()
    assert "rmoe_gru" not in text and "tpu_custom_call" not in text
    np.testing.assert_allclose(np.asarray(jax.jit(step)(params, x, h)),
                               np.asarray(jax.jit(recurrent.gru_step)(params, x, h)), rtol=0, atol=0)
    assert recurrent.router_step("lstm") is recurrent.STEPS["lstm"]
