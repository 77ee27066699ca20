"""Cross-layer recurrent cells (GRU, tanh RNN, LSTM) with PyTorch cell semantics.

The RMoE recurrence runs over *layers*, not time: every token is an independent row. One cell is
shared by all layers, so its parameters live outside the scanned layer stack (see
`transformer.py`) and are passed in as a plain dict; the cell itself is a pure function.

Gates are fused into one matmul per input (as PyTorch stores `weight_ih` = [W_ir; W_iz; W_in]),
so a GRU step is two matmuls instead of six. Kernels are stored `[in, gates * hidden]`.

States: GRU and RNN carry `h` `[tokens, p]`; the LSTM carries `concat(h, c)` `[tokens, 2p]` so
that every cell's state is one array and the layer scan's carry has one shape.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]

NUM_GATES = {"gru": 3, "rnn": 1, "lstm": 4}


def state_size(cell: str, hidden_size: int) -> int:
    """Width of the carried router state for `cell`."""
    return 2 * hidden_size if cell == "lstm" else hidden_size


def output_of(cell: str, state: jax.Array) -> jax.Array:
    """The part of a carried state that routers read: `h` `[tokens, p]`."""
    if cell == "lstm":
        return state[..., : state.shape[-1] // 2]
    return state


def _fused(params: Params, x: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    input_part = x @ params["input_kernel"] + params["input_bias"]
    hidden_part = h @ params["hidden_kernel"] + params["hidden_bias"]
    return input_part, hidden_part


def gru_step(params: Params, x: jax.Array, h: jax.Array) -> jax.Array:
    """PyTorch `GRUCell`: `b_hn` sits inside the reset product.

    Args: x `[tokens, in]`, h `[tokens, p]`. Returns h' `[tokens, p]`.
    """
    input_part, hidden_part = _fused(params, x, h)
    i_r, i_z, i_n = jnp.split(input_part, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(hidden_part, 3, axis=-1)
    reset = jax.nn.sigmoid(i_r + h_r)
    update = jax.nn.sigmoid(i_z + h_z)
    candidate = jnp.tanh(i_n + reset * h_n)
    return (1.0 - update) * candidate + update * h


def rnn_step(params: Params, x: jax.Array, h: jax.Array) -> jax.Array:
    """PyTorch `RNNCell` with tanh: h' = tanh(W_ih x + b_ih + W_hh h + b_hh)."""
    input_part, hidden_part = _fused(params, x, h)
    return jnp.tanh(input_part + hidden_part)


def lstm_step(params: Params, x: jax.Array, state: jax.Array) -> jax.Array:
    """PyTorch `LSTMCell` (gate order i, f, g, o). state = concat(h, c) `[tokens, 2p]`."""
    h, c = jnp.split(state, 2, axis=-1)
    input_part, hidden_part = _fused(params, x, h)
    i, f, g, o = jnp.split(input_part + hidden_part, 4, axis=-1)
    c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
    return jnp.concatenate([h_new, c_new], axis=-1)


STEPS: dict[str, Callable[[Params, jax.Array, jax.Array], jax.Array]] = {
    "gru": gru_step,
    "rnn": rnn_step,
    "lstm": lstm_step,
}


def router_step(cell: str) -> Callable[[Params, jax.Array, jax.Array], jax.Array]:
    """The step a router runs: for the GRU, the fused Pallas kernel on TPU where the widths
    allow (`gru_kernel`: XLA's GRU moves ~10x the bytes of the cell's inputs and output), this
    module's `gru_step` elsewhere; `STEPS[cell]` for the other cells."""
    if cell != "gru":
        return STEPS[cell]
    from rmoe_jax.model import gru_kernel

    return functools.partial(gru_kernel.gru_step_per_platform, xla_step=gru_step)


def _torch_uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class CellParams(nn.Module):
    """Creates the one set of cell parameters shared by every layer and returns them.

    init_scheme: 'torch' = PyTorch's default U(-1/sqrt(p), 1/sqrt(p)) for weights and biases (the
    enwik8 code); 'normal' = N(0, init_std) weights and zero biases (the 0.91B run).
    """

    cell: str
    input_size: int
    hidden_size: int
    init_scheme: str = "normal"  # `model.router.init` (`init` would hide Module.init)
    init_std: float = 0.02

    @nn.compact
    def __call__(self) -> Params:
        width = NUM_GATES[self.cell] * self.hidden_size
        if self.init_scheme == "torch":
            weight_init = bias_init = _torch_uniform(1.0 / math.sqrt(self.hidden_size))
        else:
            weight_init, bias_init = nn.initializers.normal(self.init_std), nn.initializers.zeros
        return {
            "input_kernel": self.param("input_kernel", weight_init, (self.input_size, width)),
            "hidden_kernel": self.param("hidden_kernel", weight_init, (self.hidden_size, width)),
            "input_bias": self.param("input_bias", bias_init, (width,)),
            "hidden_bias": self.param("hidden_bias", bias_init, (width,)),
        }
