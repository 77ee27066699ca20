"""Configs as JSON and back: a saved config's JSON (a training workdir's `config.json`, an
export's `rmoe_jax` block) -> the `ml_collections.ConfigDict` of this code's schema.

`config_from_dict` fills in defaults; strict (the model config) it refuses a field the schema
lacks or a value it cannot take, listing every one (`ConfigJSONError`): a saved model must
rebuild exactly. Loading a checkpoint (`rmoe_jax.checkpoint.load_workdir`) and reading an
export (`rmoe_jax.export`) both read configs through here. `rmoe_jax.export.ExportError` is
`ConfigJSONError` itself (one class), so callers catching either see the same errors.
"""

from __future__ import annotations

import json

import ml_collections

from rmoe_jax import config as config_lib


class ConfigJSONError(ValueError):
    """A saved config or param tree that does not rebuild its model, or an export that cannot
    be written or read back (`rmoe_jax.export.ExportError` is this class); the message says
    what and where."""


def _merge(target: ml_collections.ConfigDict, values: dict, prefix: str, problems: list[str]) -> None:
    for key, value in values.items():
        field = f"{prefix}.{key}"
        if key not in target:
            problems.append(f"{field}: unknown field (written by a newer rmoe_jax?)")
        elif isinstance(target[key], ml_collections.ConfigDict):
            if not isinstance(value, dict):
                problems.append(f"{field}: expected a dict, got {value!r}")
            else:
                _merge(target[key], value, field, problems)
        else:
            try:
                target[key] = value
            except (TypeError, ValueError, KeyError) as e:
                problems.append(f"{field}: {e}")


def config_from_dict(values: dict, defaults: ml_collections.ConfigDict, prefix: str,
                     strict: bool = True) -> ml_collections.ConfigDict:
    """`defaults` updated with `values` (a config's JSON).

    strict: a field `defaults` lacks, or a value it cannot take, is an error (the model config:
    an export must rebuild the exact model); otherwise such fields are skipped.
    """
    config = ml_collections.ConfigDict(defaults.to_dict())
    problems: list[str] = []
    _merge(config, values, prefix, problems)
    if problems and strict:
        raise ConfigJSONError(f"cannot rebuild the {prefix} config:\n  " + "\n  ".join(problems))
    return config


def model_config_from_dict(values: dict) -> ml_collections.ConfigDict:
    return config_from_dict(values, config_lib.model_config(), "model")


def full_config_from_dict(values: dict) -> ml_collections.ConfigDict:
    """The experiment config saved in a workdir, defaults filled in.

    The model section must match this code's schema exactly; data/train/mesh fields this code
    does not know are skipped (only data and the eval batch size are read from them).
    """
    config = config_lib.default_config()
    for section in config:
        if section in values:
            config[section] = config_from_dict(values[section], config[section], section,
                                               strict=section == "model")
    return config


def _json_config(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())
