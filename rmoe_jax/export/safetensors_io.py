"""The weight files: shard sizes, writing a folder atomically (temporary sibling, then rename),
and reading every tensor back (single file or shards + index), checked for consistency and
for NaN/inf; what the tensors say about config.json's fields (`_tensor_facts`).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np

from rmoe_jax.checkpoint import _non_finite
from rmoe_jax.export.spec import INDEX_FILE, WEIGHTS_FILE, ExportError


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from 1000000, '500KB', '10MB', '5GB' (powers of 10) or '1GiB' (powers of 2)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        unit = match.group(2).upper() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise ExportError(f"--max_shard_size: cannot read {size!r}; use e.g. 5GB, 500MB, "
                              "2GiB or a number of bytes")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ExportError(f"--max_shard_size: must be > 0, got {size!r}")
    return value


def _shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of names, each at most `max_bytes` (a larger tensor stands alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += tensor.nbytes
    return shards


def _check_target(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"--out {out} is not empty; pass --overwrite to replace its contents "
                          "(nothing was written)")


def _write_folder(out: str, overwrite: bool, write) -> None:
    """Write into a temporary sibling folder, then move it into place, so an export that fails
    or is killed midway never leaves a half-written folder (nor touches the old one)."""
    _check_target(out, overwrite)
    parent = os.path.dirname(out) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        write(tmp)
        old = None
        if os.path.isdir(out):
            _check_target(out, overwrite)  # again: something may have appeared meanwhile
            if os.listdir(out):
                old = os.path.join(parent, f".{os.path.basename(out)}.old-{os.getpid()}")
                os.rename(out, old)
            else:
                os.rmdir(out)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_tensors(folder: str) -> dict[str, np.ndarray]:
    """Every tensor of an export folder (single file or shards + index), as numpy arrays."""
    from safetensors import safe_open

    single, index_path = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, INDEX_FILE)
    if os.path.exists(single) and os.path.exists(index_path):
        raise ExportError(f"{folder} holds both {WEIGHTS_FILE} and {INDEX_FILE}; keep one")
    if os.path.exists(index_path):
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ExportError(f"{index_path} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
        weight_map, files = None, [WEIGHTS_FILE]
    else:
        raise ExportError(f"{folder} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    tensors: dict[str, np.ndarray] = {}
    problems = []
    for filename in files:
        path = os.path.join(folder, filename)
        if not os.path.exists(path):
            raise ExportError(f"{path} is listed in {INDEX_FILE} but missing")
        try:
            with safe_open(path, framework="np") as f:
                for name in f.keys():
                    if name in tensors:
                        problems.append(f"{name}: in more than one file")
                    elif weight_map is not None and weight_map.get(name) != filename:
                        problems.append(f"{name}: in {filename}, but the index says "
                                        f"{weight_map.get(name)}")
                    tensors[name] = f.get_tensor(name)
        except Exception as error:  # safetensors' SafetensorError: cut, garbled or not a file
            if isinstance(error, ExportError):
                raise
            raise ExportError(f"{path} is damaged or truncated ({' '.join(str(error).split())}): "
                              "export the checkpoint again (python -m rmoe_jax.export --workdir "
                              "RUN --out NEW_FOLDER)") from None
    _check_finite(tensors, folder)
    if weight_map is not None:
        problems += [f"{n}: listed in the index ({fn}) but not in that file"
                     for n, fn in weight_map.items() if n not in tensors]
    if problems:
        raise ExportError(f"inconsistent export {folder}:\n  " + "\n  ".join(problems))
    return tensors


def _read_json(path: str) -> dict:
    """A JSON object from `path`; ExportError naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path} is not valid JSON ({error}): the export is damaged; export "
                          "the checkpoint again (python -m rmoe_jax.export)") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path} holds a JSON {type(value).__name__}, not an object: the "
                          "export is damaged; export the checkpoint again")
    return value


def _check_finite(tensors: dict[str, np.ndarray], folder: str) -> None:
    """ExportError naming every tensor holding NaN or inf (a damaged or diverged export)."""
    bad = _non_finite(tensors)
    if bad:
        raise ExportError(f"{folder}: non-finite values (NaN or inf) in {len(bad)} tensor"
                          f"{'s' if len(bad) > 1 else ''}: {', '.join(bad[:5])}"
                          f"{', ...' if len(bad) > 5 else ''}; the export (or the checkpoint it "
                          "came from) is damaged or diverged: export an earlier checkpoint "
                          "(--step N)")


def _tensor_facts(tensors: dict[str, np.ndarray]) -> dict[str, tuple[int, str]]:
    """{config.json field: (its value as the tensors say, which tensor says so)} for the fields
    transformers builds the model from."""
    import re

    facts: dict[str, tuple[int, str]] = {}
    layers = sorted({int(m.group(1)) for n in tensors
                     if (m := re.match(r"model\.layers\.(\d+)\.", n))})
    if layers:
        facts["num_hidden_layers"] = (layers[-1] + 1, f"layers (model.layers.0.* to "
                                                      f"model.layers.{layers[-1]}.*)")
    moe = "model.layers.0.block_sparse_moe.experts"
    experts = sorted({int(m.group(1)) for n in tensors
                      if (m := re.match(re.escape(moe) + r"\.(\d+)\.", n))})
    if experts:
        facts["num_local_experts"] = (experts[-1] + 1, f"experts per layer (the last: "
                                                       f"{moe}.{experts[-1]}.w1.weight)")
        w1 = tensors.get(f"{moe}.0.w1.weight")
        if w1 is not None and np.ndim(w1) == 2:
            facts["intermediate_size"] = (int(np.shape(w1)[0]), f"({moe}.0.w1.weight has shape "
                                                                f"{list(np.shape(w1))})")
    embed = tensors.get("model.embed_tokens.weight")
    if embed is not None and np.ndim(embed) == 2:
        shape = f"(model.embed_tokens.weight has shape {list(np.shape(embed))})"
        facts["vocab_size"] = (int(np.shape(embed)[0]), shape)
        facts["hidden_size"] = (int(np.shape(embed)[1]), shape)
    return facts
