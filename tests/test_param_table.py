"""The parameter table (`rmoe_jax.param_table`) covers exactly the params the model creates,
and its facts follow the rules they stand for, checked here from the param names and shapes
independently of the table."""

from __future__ import annotations

import jax
import pytest

from configs import tiny
from rmoe_jax import param_table, parallel, router_rows
from rmoe_jax.config import set_fields
from rmoe_jax.model import abstract_params
from rmoe_jax.param_table import path_string

# Every router row, plus the options that add or rename params.
VARIANTS = [(row, {}) for row in router_rows.ROUTERS] + [
    ("smoe", {"model.tie_embeddings": False, "model.router.bias": True}),
    ("smoe_mlp", {"model.router.bias": True}),
    ("rmoe", {"model.router.projector_bias": True, "model.router.bias": True}),
    ("rmoe_sproj", {"model.router.projector_bias": True}),
    ("rmoe", {"model.router.head": "cosine"}),
]


def _model_config(row, overrides):
    return set_fields(router_rows.apply_row(tiny.get_config(), row), overrides).model


@pytest.fixture(scope="module")
def trees():
    return [(row, extra, _model_config(row, extra), abstract_params(_model_config(row, extra)))
            for row, extra in VARIANTS]


def _leaves(tree):
    return {path_string(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, tuple))[0]}


def test_the_table_lists_exactly_the_params_some_config_creates(trees):
    created = set().union(*(_leaves(params) for *_, params in trees))
    assert created == set(param_table.BY_PATH)  # no param missing, no stale entry


def test_decay_skips_exactly_norm_scales_biases_and_temperatures(trees):
    for *_, params in trees:
        for path, decays in _leaves(param_table.decay_mask(params)).items():
            leaf = path.split("/")[-1]
            assert decays == (not (leaf == "scale" or "bias" in leaf or leaf == "logit_scale")), path


def test_frozen_are_exactly_the_params_named_frozen(trees):
    for *_, params in trees:
        for path, frozen in _leaves(param_table.frozen_mask(params)).items():
            assert frozen == path.split("/")[-1].startswith("frozen"), path


def test_axes_match_rank_and_stacking_and_routers_replicate(trees):
    rules = dict(parallel.DEFAULT_RULES)
    for *_, params in trees:
        leaves = _leaves(params)
        for path, axes in _leaves(parallel.param_logical_axes(params)).items():
            assert len(axes) == len(leaves[path].shape), path
            assert (axes[:1] == ("layers",)) == path.startswith("layers/"), path
            if "router" in path:  # router params are replicated under the default rules
                assert all(rules[a] is None for a in axes), path


def test_every_param_of_every_config_has_one_export_name_per_slice(trees):
    for row, extra, model_config, params in trees:
        facts = param_table.param_facts(model_config, params)
        assert [f.path for f in facts] == [tuple(p.split("/")) for p in param_table.BY_PATH
                                           if p in _leaves(params)]
        for fact in facts:
            expected = len(param_table.CELL_GATES[model_config.router.cell]) \
                if fact.kind.startswith("split") else 1
            assert len(fact.names) == expected, (row, extra, fact.path)
            assert fact.spec or fact.doc, (row, fact.path)  # an extension name says what it is


def test_a_param_missing_from_the_table_names_the_table():
    with pytest.raises(param_table.UnknownParamError, match="rmoe_jax/param_table.py"):
        param_table.decay_mask({"layers": {"moe": {"new_scale": jax.ShapeDtypeStruct((2, 3), "float32")}}})
