"""rmoe_jax.router_dynamics: it measures the vector the router head really multiplies."""

import jax.numpy as jnp
import numpy as np
import pytest

from rmoe_jax import router_dynamics
from rmoe_jax.model import build_model

from helpers import random_params, small_model


@pytest.mark.parametrize("router,overrides", [("recurrent", {"router.bias": True}),
                                              ("linear", {"router.bias": True})])
def test_head_input_times_head_kernel_gives_the_logits(router, overrides):
    # logits_i = W_i h_i + b_i (RMoE) and x W + b (SMoE): the captured head input, multiplied
    # by the layer's head kernel in NumPy, must reproduce the recorded logits.
    cfg = small_model(router, **overrides)
    params = random_params(cfg, seed=2, scale=0.5)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)).astype(np.int32)
    router_inputs = router_dynamics.router_inputs_fn(build_model(cfg), cfg.router.name)
    logits, head_input = router_inputs(params, jnp.asarray(tokens))
    gate = params["layers"]["moe"]["router"]["gate"]
    expected = np.einsum("lnp,lpe->lne", np.asarray(head_input, np.float64),
                         np.asarray(gate["kernel"], np.float64)) + np.asarray(gate["bias"])[:, None]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    width = cfg.router.hidden_size if router == "recurrent" else cfg.d_model
    assert head_input.shape == (cfg.num_layers, tokens.size, width)


def test_cli_names_a_folder_that_is_not_a_compare_output(tmp_path, capsys):
    assert router_dynamics.main(["--compare_out", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "--compare_out must be" in capsys.readouterr().err
