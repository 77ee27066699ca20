"""The experiment configs: they validate, carry the paper's settings, and bad values are
reported together, each naming its field."""

from __future__ import annotations

import pytest

from rmoe_jax.config import ConfigError, default_config, set_fields, validate
from rmoe_jax.model import count_params
from rmoe_jax.train import validate_all
from train_helpers import REPO, load_config_module

CONFIG_NAMES = sorted(p.stem for p in (REPO / "configs").glob("*.py"))


def test_expected_configs_exist():
    assert {"tiny", "enwik8_medium", "enwik8_small", "llama_0p91b"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_validates(name):
    config = load_config_module(name).get_config()
    validate(config)
    assert set(config) == set(default_config())  # built from the default schema, nothing dropped


def test_enwik8_medium_has_the_paper_settings():
    c = load_config_module("enwik8_medium").get_config()
    m, t = c.model, c.train
    assert (m.num_layers, m.d_model, m.num_heads, m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden) == \
        (8, 352, 8, 16, 2, 352)
    assert (c.data.dataset, c.data.tokenizer, c.data.seq_len, m.vocab_size) == ("enwik8", "byte", 512, 256)
    assert (m.dropout_rate, m.moe.balance_coef, m.moe.balance_aggregation) == (0.1, 0.01, "sum")
    assert (m.router.name, m.router.hidden_size, m.router.bias, m.router.projector_bias, m.router.init) == \
        ("recurrent", 128, True, True, "torch")
    assert (t.learning_rate, t.warmup_steps, t.schedule, t.batch_size, t.num_steps, t.weight_decay) == \
        (7e-4, 4000, "constant", 48, 80_000, 0.0)


def test_enwik8_small_has_the_paper_settings():
    c = load_config_module("enwik8_small").get_config()
    assert (c.model.d_model, c.model.num_layers, c.train.num_steps, c.train.warmup_steps) == (264, 6, 60_000, 3000)
    assert c.model.num_heads * c.model.head_dim == 256 and c.model.head_dim % 2 == 0
    assert load_config_module("enwik8_small").get_config("smoe").model.router.name == "linear"


def test_llama_has_the_paper_settings():
    c = load_config_module("llama_0p91b").get_config()
    m, t = c.model, c.train
    assert (m.num_layers, m.d_model, m.num_heads, m.max_seq_len, c.data.seq_len) == (24, 1280, 20, 4096, 4096)
    assert (m.moe.num_experts, m.moe.expert_hidden, m.moe.top_k, m.router.hidden_size, m.vocab_size) == \
        (16, 448, 4, 128, 96_512)
    assert (m.router.bias, m.router.projector_bias, m.init_std, m.dropout_rate) == (False, False, 0.02, 0.0)
    assert (m.dtype, m.param_dtype) == ("bfloat16", "float32")
    assert (t.beta1, t.beta2, t.weight_decay, t.grad_clip_norm) == (0.9, 0.95, 0.1, 1.0)
    assert (t.learning_rate, t.schedule, t.final_learning_rate, t.warmup_steps, t.batch_size) == \
        (4.2e-4, "cosine", 4.2e-5, 2000, 1120)
    assert (c.data.tokenizer, c.data.sentencepiece_vocab_size) == ("sentencepiece", 96_512)
    assert c.data.dataset.startswith("c4")
    # RMoE adds ~3.5M router parameters over SMoE at this size (the paper, section 1).
    smoe = m.copy_and_resolve_references()
    smoe.router.name = "linear"
    extra = count_params(m)["router"] - count_params(smoe)["router"]
    assert 3.4e6 < extra < 3.7e6


def test_every_paper_row_is_documented_and_valid():
    module = load_config_module("enwik8_medium")
    for row, fields in module.ROWS.items():
        assert row in module.__doc__, row
        config = module.get_config(row)
        validate(config)
        for key, value in fields.items():
            node = config.model.moe if key.startswith("moe.") else config.model.router
            assert node[key.split(".")[-1]] == value
    with pytest.raises(ValueError, match="unknown row"):
        module.get_config("nope")


# Router parameters (millions) of the paper's Table 1, enwik8 medium.
TABLE1_ROUTER_PARAMS = {"smoe": 0.04, "mlp": 0.75, "random": 0.04, "cosine": 0.04, "rmoe": 0.47}


@pytest.mark.parametrize("row", sorted(TABLE1_ROUTER_PARAMS))
def test_router_sizes_match_table_1(row):
    config = load_config_module("enwik8_medium").get_config(row)
    assert count_params(config.model)["router"] / 1e6 == pytest.approx(TABLE1_ROUTER_PARAMS[row], abs=0.01)


def test_bad_values_are_reported_together_naming_fields():
    config = load_config_module("tiny").get_config()
    for dotted, value in {"train.batch_size": 10, "train.grad_accum_steps": 3, "train.learning_rate": 0.0,
                          "train.schedule": "linear", "train.eval_batch_size": -1,
                          "model.moe.top_k": 20, "data.seq_len": 4096}.items():
        set_fields(config, {dotted: value})
    with pytest.raises(ConfigError) as info:
        validate_all(config)
    message = str(info.value)
    for text in ("train.batch_size: 10 is not divisible by grad_accum_steps=3", "train.learning_rate",
                 "train.schedule: 'linear' is not one of constant, cosine", "train.eval_batch_size",
                 "model.moe.top_k: 20 is larger than num_experts=8", "data.seq_len: 4096 is longer than"):
        assert text in message, message


def test_set_fields_refuses_an_unknown_field():
    config = default_config()
    set_fields(config, {"model.router.name": "linear"})
    assert config.model.router.name == "linear"
    with pytest.raises(KeyError, match="config has no field 'model.router.nmae'"):
        set_fields(config, {"model.router.nmae": "linear"})


def test_mesh_rules_override_the_defaults_and_bad_ones_name_the_entry():
    from rmoe_jax import config as config_lib
    from rmoe_jax import parallel

    config = default_config()
    assert parallel.rules_from_config(config.mesh) == parallel.DEFAULT_RULES
    config.mesh.rules = "embed=fsdp+expert, mlp=none,heads=tensor"
    rules = dict(parallel.rules_from_config(config.mesh))
    assert rules["embed"] == ("fsdp", "expert") and rules["mlp"] is None
    assert rules["heads"] == "tensor" and rules["vocab"] == dict(parallel.DEFAULT_RULES)["vocab"]
    assert config_lib.problems(config) == []
    # The rule reaches the placement of a parameter: the embedding over fsdp and expert.
    import jax

    spec = parallel.param_specs({"embed": {"embedding": jax.ShapeDtypeStruct((64, 32), "float32")}},
                                tuple(rules.items()))
    assert tuple(spec["embed"]["embedding"]) == ("tensor", ("fsdp", "expert"))
    for bad, why in (("embeds=fsdp", "is not NAME=AXES"), ("embed", "is not NAME=AXES"),
                     ("embed=fsdp+model", "names model, not mesh axes")):
        config.mesh.rules = bad
        assert [p for p in config_lib.problems(config) if why in p and bad in p], bad
