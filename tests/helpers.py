"""Small model configs shared by the tests (kept tiny so compiles stay fast on 2 cores)."""

from rmoe_jax.config import model_config


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
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config
