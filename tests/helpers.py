"""Small model configs and params shared by the tests (kept tiny so compiles stay fast)."""

import jax
import jax.numpy as jnp
import numpy as np

from rmoe_jax.config import model_config, set_fields


def small_model(router: str = "recurrent", **overrides):
    """A 3-layer, d=32, 4-expert model; `overrides` use dotted keys, e.g. {'router.cell': 'lstm'}."""
    config = model_config()
    config.vocab_size = 64
    config.d_model = 32
    config.num_layers = 3
    config.num_heads = 4
    config.num_kv_heads = 2
    config.max_seq_len = 16
    config.moe.num_experts = 4
    config.moe.top_k = 2
    config.moe.expert_hidden = 24
    config.router.name = router
    config.router.hidden_size = 8
    config.router.mlp_hidden = 16
    config.router.xmoe_dim = 4
    config.router.hyper_hidden = 16
    config.router.hyper_embed_dim = 8
    return set_fields(config, overrides)


def random_params(cfg, seed=0, scale=0.3):
    """Random values for every param of `cfg`'s model (norm scales around 1), so that nothing
    (a transposition, a dropped tensor) can hide behind an initialiser's zeros or ones."""
    from rmoe_jax.checkpoint import abstract_params

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = rng.normal(size=leaf.shape) * scale
        if str(getattr(path[-1], "key", "")) == "scale":
            x = 1.0 + x
        return jnp.asarray(x.astype(leaf.dtype))

    return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))


def assert_trees_equal(a, b):
    """Two param trees hold the same paths, dtypes and values, exactly."""
    from rmoe_jax.checkpoint import _flat

    flat_a, flat_b = _flat(a), _flat(b)
    assert flat_a.keys() == flat_b.keys()
    for path in flat_a:
        assert flat_a[path].dtype == flat_b[path].dtype, path
        np.testing.assert_array_equal(np.asarray(flat_a[path]), np.asarray(flat_b[path]),
                                      err_msg="/".join(path))
