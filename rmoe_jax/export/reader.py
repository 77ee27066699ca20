"""Reading an export folder back: `read_export` (config, exact params, data config, the
tokenizer's file) and `import_export` (just the model config and params). config.json's
transformers fields are checked against the tensors; without our `rmoe_jax` block the model
is rebuilt from the transformers fields alone (a Mixtral or the authors' RMoE).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import ml_collections
import numpy as np

from rmoe_jax import config as config_lib
from rmoe_jax.config_json import config_from_dict, model_config_from_dict
from rmoe_jax.export.hf_config_json import _model_config_from_hf
from rmoe_jax.export.names import from_torch_tensors
from rmoe_jax.export.safetensors_io import _read_json, _tensor_facts, read_tensors
from rmoe_jax.export.spec import CONFIG_FILE, FORMAT_VERSION, TOKENIZER_FILES, ExportError


@dataclasses.dataclass
class Export:
    model_config: ml_collections.ConfigDict
    params: Any  # numpy arrays in the model's param_dtype
    data_config: Optional[ml_collections.ConfigDict]  # None when the export has none
    tokenizer_file: Optional[str]  # the tokenizer's file inside the export, if any
    config_json: dict
    folder: str


def _check_hf_fields(path: str, config_json: dict, tensors: dict[str, np.ndarray]) -> None:
    """ExportError when config.json's transformers fields disagree with the tensors (what
    transformers would build from them is not the model the tensors hold)."""
    facts = _tensor_facts(tensors)
    if "intermediate_size" in facts and config_json.get("moe_expert_intermediate_size"):
        # LlamaMoeRNNConfig: intermediate_size may be a dense FFN's; the experts' is this one.
        facts["moe_expert_intermediate_size"] = facts.pop("intermediate_size")
    problems = [f"{field} is {config_json[field]!r} but the tensors hold {value} {why}"
                for field, (value, why) in facts.items()
                if field in config_json and config_json[field] != value]
    if problems:
        raise ExportError(f"{path} disagrees with its tensors: {'; '.join(problems)}. Correct "
                          "config.json, or export the checkpoint again")


def read_export(folder: str) -> Export:
    """Read an export folder back: config, params (exact), data config, tokenizer file."""
    folder = os.path.abspath(os.path.expanduser(folder))
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.exists(path):
        raise ExportError(f"{path} not found: not an export folder")
    config_json = _read_json(path)
    tensors = read_tensors(folder)  # every tensor read, finite; checked against config.json
    _check_hf_fields(path, config_json, tensors)
    block = config_json.get("rmoe_jax")
    if block is not None and not isinstance(block, dict):
        raise ExportError(f"{path}: rmoe_jax is {type(block).__name__}, not an object: the export "
                          "is damaged; export the checkpoint again")
    data_config = None
    if block is None:
        try:
            model_config = _model_config_from_hf(config_json)
        except KeyError as error:
            raise ExportError(f"{path}: field {error.args[0]!r} is missing (and there is no "
                              "rmoe_jax block to rebuild the model from)") from None
    else:
        if block.get("format_version") != FORMAT_VERSION:
            raise ExportError(f"{path}: rmoe_jax.format_version {block.get('format_version')!r} "
                              f"is not {FORMAT_VERSION}")
        for key in ("model", "data"):
            if not isinstance(block.get(key), dict) and not (key == "data" and block.get(key) is None):
                raise ExportError(f"{path}: rmoe_jax.{key} is missing or not an object: the "
                                  "export is damaged; export the checkpoint again")
        model_config = model_config_from_dict(block["model"])
        if block.get("data") is not None:
            data_config = config_from_dict(block["data"], config_lib.data_config(), "data")
    config_lib.validate_model(model_config)
    kind = data_config.tokenizer if data_config is not None else None
    candidates = [TOKENIZER_FILES[kind]] if kind in TOKENIZER_FILES else list(TOKENIZER_FILES.values())
    tokenizer_file = next((os.path.join(folder, name) for name in candidates
                           if os.path.exists(os.path.join(folder, name))), None)
    if data_config is not None and tokenizer_file:  # the export's copy, not the run's original
        if kind == "sentencepiece":
            data_config.sentencepiece_model = tokenizer_file
        elif kind == "huggingface":
            data_config.tokenizer_file = tokenizer_file
    params = from_torch_tensors(model_config, tensors, where=f"export {folder}")
    return Export(model_config=model_config, params=params, data_config=data_config,
                  tokenizer_file=tokenizer_file, config_json=config_json, folder=folder)


def import_export(folder: str) -> tuple[ml_collections.ConfigDict, Any]:
    """(model_config, params) rebuilt exactly from an export folder."""
    exported = read_export(folder)
    return exported.model_config, exported.params
