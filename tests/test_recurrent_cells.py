"""The cross-layer cells against NumPy written from the equations, and against torch's cells."""

import jax
import numpy as np
import pytest
import torch

from rmoe_jax.model import recurrent

import numpy_reference

TOKENS, SIZE = 5, 6
REFERENCES = numpy_reference.CELLS


def random_params(cell, seed=0):
    rng = np.random.default_rng(seed)
    width = recurrent.NUM_GATES[cell] * SIZE
    draw = lambda *shape: (rng.normal(size=shape) * 0.5).astype(np.float32)  # noqa: E731
    return {"input_kernel": draw(SIZE, width), "hidden_kernel": draw(SIZE, width),
            "input_bias": draw(width), "hidden_bias": draw(width)}


@pytest.mark.parametrize("cell", ["gru", "rnn", "lstm"])
def test_cell_matches_numpy_equations(cell):
    rng = np.random.default_rng(1)
    params = random_params(cell)
    x = rng.normal(size=(TOKENS, SIZE)).astype(np.float32)
    state = rng.normal(size=(TOKENS, recurrent.state_size(cell, SIZE))).astype(np.float32)
    ours = recurrent.STEPS[cell](jax.tree.map(np.asarray, params), x, state)
    np.testing.assert_allclose(np.asarray(ours), REFERENCES[cell](params, x, state), rtol=1e-5, atol=1e-6)


def _torch_cell(cell, params):
    module = {"gru": torch.nn.GRUCell, "rnn": torch.nn.RNNCell, "lstm": torch.nn.LSTMCell}[cell](SIZE, SIZE)
    with torch.no_grad():
        # torch stores weight_ih as [gates*p, in] in the same gate order as our fused kernel.
        module.weight_ih.copy_(torch.from_numpy(params["input_kernel"].T.copy()))
        module.weight_hh.copy_(torch.from_numpy(params["hidden_kernel"].T.copy()))
        module.bias_ih.copy_(torch.from_numpy(params["input_bias"]))
        module.bias_hh.copy_(torch.from_numpy(params["hidden_bias"]))
    return module


@pytest.mark.parametrize("cell", ["gru", "rnn", "lstm"])
def test_cell_matches_torch(cell):
    rng = np.random.default_rng(2)
    params = random_params(cell, seed=3)
    x = rng.normal(size=(TOKENS, SIZE)).astype(np.float32)
    state = rng.normal(size=(TOKENS, recurrent.state_size(cell, SIZE))).astype(np.float32)
    module = _torch_cell(cell, params)
    with torch.no_grad():
        if cell == "lstm":
            h, c = module(torch.from_numpy(x), (torch.from_numpy(state[:, :SIZE]), torch.from_numpy(state[:, SIZE:])))
            expected = torch.cat([h, c], dim=1).numpy()
        else:
            expected = module(torch.from_numpy(x), torch.from_numpy(state)).numpy()
    ours = recurrent.STEPS[cell](params, x, state)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-6)


def test_torch_init_bounds():
    cell = recurrent.CellParams("gru", 8, 16, init_scheme="torch")
    params = cell.init_with_output(jax.random.key(0))[0]
    bound = 1.0 / np.sqrt(16)
    for leaf in jax.tree.leaves(params):
        assert np.abs(np.asarray(leaf)).max() <= bound
        assert np.abs(np.asarray(leaf)).max() > 0.5 * bound
