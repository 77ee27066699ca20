"""Writing an export folder: `export_model` (a model config + params) and `export_workdir`
(a training workdir's checkpoint, read-only through `rmoe_jax.checkpoint.load_workdir`).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import ml_collections
import numpy as np

from rmoe_jax import config as config_lib
from rmoe_jax import hf_remote
from rmoe_jax.checkpoint import _check_tree, abstract_params, load_workdir
from rmoe_jax.export.hf_config_json import (_hf_tokenizer_config, _remote_code_refusal,
                                            build_config_json, remote_code_problems)
from rmoe_jax.export.names import to_torch_tensors
from rmoe_jax.export.safetensors_io import _check_target, _shards, _write_folder, parse_size
from rmoe_jax.export.spec import (CONFIG_FILE, DEFAULT_MAX_SHARD_SIZE, EXPORT_DTYPES,
                                  HF_TOKENIZER_CONFIG_FILE, INDEX_FILE, TOKENIZER_FILES,
                                  WEIGHTS_FILE, ExportError)


def export_model(model_config: ml_collections.ConfigDict, params, out: str, *,
                 data_config: Optional[ml_collections.ConfigDict] = None,
                 dtype: str = "float32", max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 overwrite: bool = False, tokenizer_file: Optional[str] = None,
                 source: Optional[dict] = None, remote_code: Optional[bool] = None) -> str:
    """Write `params` of the model `model_config` to the folder `out` (see `rmoe_jax.export`).

    tokenizer_file: the tokenizer's file to copy in: a SentencePiece model (as `tokenizer.model`)
    or a `tokenizer.json` (None: no tokenizer files; the byte tokenizer has none). Returns the absolute path of `out`.
    remote_code (recurrent routers only; other routers ignore it): whether to ship the
    transformers code of rmoe_jax/hf_remote (and an `auto_map`) in the folder. None: whenever
    it reproduces the model (`remote_code_problems` is empty), else the export goes without
    it (config.json's transformers_notes says why); True: always, and a variant it cannot
    reproduce is an ExportError naming the config field; False: never.
    """
    from safetensors.numpy import save_file

    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype: {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    out = os.path.abspath(os.path.expanduser(out))
    _check_target(out, overwrite)  # fail before any work
    max_bytes = parse_size(max_shard_size)
    model_config = ml_collections.ConfigDict(model_config.to_dict())
    config_lib.validate_model(model_config)
    with_code = model_config.router.name == "recurrent" and remote_code is not False
    if with_code:
        problems = remote_code_problems(model_config)
        if problems and remote_code:
            raise _remote_code_refusal(problems)
        with_code = not problems
    _check_tree(params, abstract_params(model_config), "params")
    target = EXPORT_DTYPES[dtype]
    tensors = {n: np.asarray(np.asarray(t).astype(target), order="C")
               for n, t in to_torch_tensors(model_config, params).items()}
    if data_config is None:
        tokenizer = {"type": "unknown" if not tokenizer_file else "huggingface"
                     if tokenizer_file.endswith(".json") else "sentencepiece"}
    else:
        tokenizer = {"type": data_config.tokenizer}
    if tokenizer["type"] in TOKENIZER_FILES:
        tokenizer["file"] = TOKENIZER_FILES[tokenizer["type"]] if tokenizer_file else None
    if tokenizer["type"] == "huggingface" and tokenizer_file:
        data_config = ml_collections.ConfigDict(
            (data_config or config_lib.data_config()).to_dict())
        data_config.tokenizer, data_config.tokenizer_file = "huggingface", tokenizer_file
    hf_tokenizer_config = (_hf_tokenizer_config(tokenizer_file)
                           if tokenizer["type"] == "huggingface" and tokenizer_file else None)
    config_json = build_config_json(model_config, dtype=dtype, data_config=data_config,
                                    tokenizer=tokenizer, source=source, remote_code=with_code)

    def write(folder: str) -> None:
        metadata = {"format": "pt"}
        shards = _shards(tensors, max_bytes)
        if len(shards) == 1:
            save_file(tensors, os.path.join(folder, WEIGHTS_FILE), metadata=metadata)
        else:
            weight_map = {}
            for k, names in enumerate(shards):
                filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file({n: tensors[n] for n in names}, os.path.join(folder, filename),
                          metadata=metadata)
                weight_map.update({n: filename for n in names})
            index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
                     "weight_map": weight_map}
            with open(os.path.join(folder, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, os.path.join(folder, tokenizer["file"]))
        if hf_tokenizer_config is not None:
            with open(os.path.join(folder, HF_TOKENIZER_CONFIG_FILE), "w") as f:
                json.dump(hf_tokenizer_config, f, indent=2)
        if with_code:
            for name in hf_remote.FILES:
                shutil.copyfile(hf_remote.path(name), os.path.join(folder, name))
        with open(os.path.join(folder, CONFIG_FILE), "w") as f:
            json.dump(config_json, f, indent=2)

    _write_folder(out, overwrite, write)
    return out


def _tokenizer_file(data_config) -> Optional[str]:
    if data_config.tokenizer not in TOKENIZER_FILES:
        return None
    from rmoe_jax.data.tokenizers import tokenizer_file

    path = str(tokenizer_file(data_config))
    if not os.path.exists(path):
        raise ExportError(f"the run's {data_config.tokenizer} tokenizer file {path} is missing; point "
                          "--tokenizer_file at it, or pass --skip_tokenizer to export the "
                          "weights without it")
    return path


def export_workdir(workdir: str, out: str, *, step: Optional[int] = None,
                   dtype: str = "float32", max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                   overwrite: bool = False, tokenizer_file: Optional[str] = None,
                   skip_tokenizer: bool = False, remote_code: Optional[bool] = True) -> str:
    """Export the params of a workdir's checkpoint (latest, or `step`) to `out`.

    remote_code: as for `export_model`; True by default here (and in the CLI), so an RMoE
    whose transformers code would not reproduce it is refused (before anything is written)."""
    out_abs = os.path.abspath(os.path.expanduser(out))
    _check_target(out_abs, overwrite)  # before loading anything
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype: {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    parse_size(max_shard_size)
    ckpt = load_workdir(workdir, step)
    if remote_code and ckpt.config.model.router.name == "recurrent":
        problems = remote_code_problems(ckpt.config.model)
        if problems:  # export_model's refusal, before the tokenizer is looked for
            raise _remote_code_refusal(problems)
    if tokenizer_file is None and not skip_tokenizer:
        tokenizer_file = _tokenizer_file(ckpt.config.data)
    if skip_tokenizer:
        tokenizer_file = None
    return export_model(ckpt.config.model, ckpt.params, out_abs, data_config=ckpt.config.data,
                        dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                        tokenizer_file=tokenizer_file,
                        source={"workdir": ckpt.workdir, "step": ckpt.step},
                        remote_code=remote_code)
