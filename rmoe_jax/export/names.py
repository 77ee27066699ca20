"""The name mapping: our param tree <-> export tensors (HF Llama/Mixtral names, the RMoE
authors' names, and our extensions in the same style), in PyTorch `nn.Linear` layout.

`_rules(model_config)` lists one `Rule` per param leaf, in export order, from the parameter
table (`rmoe_jax.param_table`, which holds every export name); `to_torch_tensors`
applies them, `from_torch_tensors` inverts them (listing every missing, unexpected or misshapen
tensor at once), `expected_tensors` gives the names and shapes without any data. A param the
mapping does not know is an error, never dropped.
"""

from __future__ import annotations

from typing import Optional

import jax
import ml_collections
import ml_dtypes
import numpy as np

from rmoe_jax import param_table
from rmoe_jax.checkpoint import _flat, abstract_params
from rmoe_jax.export.spec import ExportError

# A rule is the parameter table's `ParamFact` of a param: its path, export name templates ({i}
# layer, {e} expert; one per split part), kind, whether it is stacked over layers, whether the
# names are the format's own (`spec`; else an extension listed in config.json with `doc`).
Rule = param_table.ParamFact


def _rules(cfg: ml_collections.ConfigDict, abstract=None) -> list[Rule]:
    """Every param of the model `cfg` describes, in export order (layer by layer), with the
    names the parameter table gives it. `abstract`: its param tree (ShapeDtypeStructs), when
    the caller has it already."""
    return param_table.param_facts(cfg, abstract_params(cfg) if abstract is None else abstract)


def _fmt(template: str, i: Optional[int], e: Optional[int] = None) -> str:
    return template.format(i=i, e=e) if ("{" in template) else template


def _slice_export(rule: Rule, x: np.ndarray, i: Optional[int]) -> list[tuple[str, np.ndarray]]:
    kind = rule.kind
    if kind == "copy":
        return [(_fmt(rule.names[0], i), x)]
    if kind == "linear":
        return [(_fmt(rule.names[0], i), x.T)]
    if kind == "query":
        return [(_fmt(rule.names[0], i), x.reshape(x.shape[0], -1).T)]
    if kind == "out":
        return [(_fmt(rule.names[0], i), x.reshape(-1, x.shape[-1]).T)]
    if kind == "experts":
        return [(_fmt(rule.names[0], i, e), x[e].T) for e in range(x.shape[0])]
    parts = np.split(x, len(rule.names), axis=-1)
    if kind == "split_linear":
        return [(_fmt(n, i), p.T) for n, p in zip(rule.names, parts)]
    if kind == "split_copy":
        return [(_fmt(n, i), p) for n, p in zip(rule.names, parts)]
    raise AssertionError(kind)


def _slice_expected(rule: Rule, shape: tuple[int, ...], i: Optional[int]) -> list[tuple[str, tuple]]:
    """Names and torch shapes `_slice_export` makes from a slice of `shape` (no data)."""
    kind, n = rule.kind, len(rule.names)
    if kind == "copy":
        return [(_fmt(rule.names[0], i), shape)]
    if kind == "linear":
        return [(_fmt(rule.names[0], i), shape[::-1])]
    if kind == "query":
        return [(_fmt(rule.names[0], i), (shape[1] * shape[2], shape[0]))]
    if kind == "out":
        return [(_fmt(rule.names[0], i), (shape[2], shape[0] * shape[1]))]
    if kind == "experts":
        return [(_fmt(rule.names[0], i, e), (shape[2], shape[1])) for e in range(shape[0])]
    if kind == "split_linear":
        return [(_fmt(t, i), (shape[1] // n, shape[0])) for t in rule.names]
    if kind == "split_copy":
        return [(_fmt(t, i), (shape[0] // n,)) for t in rule.names]
    raise AssertionError(kind)


def _slice_import(rule: Rule, tensors: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `_slice_export`: the slice of shape `shape` from its tensors (in name order)."""
    kind = rule.kind
    if kind == "copy":
        return tensors[0]
    if kind == "linear":
        return tensors[0].T
    if kind in ("query", "out"):
        return tensors[0].T.reshape(shape)
    if kind == "experts":
        return np.stack([t.T for t in tensors])
    if kind == "split_linear":
        return np.concatenate([t.T for t in tensors], axis=-1)
    if kind == "split_copy":
        return np.concatenate(tensors, axis=-1)
    raise AssertionError(kind)


def _rule_slices(rule: Rule, shape: tuple[int, ...]) -> list[tuple[Optional[int], tuple]]:
    if rule.layered:
        return [(i, tuple(shape[1:])) for i in range(shape[0])]
    return [(None, tuple(shape))]


def _covered(rules: list[Rule], leaves: dict, what: str) -> None:
    paths = [r.path for r in rules]
    missing = [p for p in paths if p not in leaves]
    unmapped = [p for p in leaves if p not in paths]
    problems = [f"{'/'.join(p)}: the config has this param but the tree lacks it" for p in missing]
    problems += [f"{'/'.join(p)}: param has no export name (add it to rmoe_jax/param_table.py)"
                 for p in unmapped]
    if problems:
        raise ExportError(f"{what}:\n  " + "\n  ".join(problems))


def to_torch_tensors(model_config: ml_collections.ConfigDict, params) -> dict[str, np.ndarray]:
    """Our params -> {export name: numpy array in torch layout}, in export order.

    Every param must have a name (a param the mapping does not know is an error, never dropped).
    """
    leaves = {p: np.asarray(jax.device_get(v)) for p, v in _flat(params).items()}
    rules = _rules(model_config)
    _covered(rules, leaves, "cannot export these params")
    out: dict[str, np.ndarray] = {}
    for rule in rules:
        x = leaves[rule.path]
        slices = [(i, x[i]) for i in range(x.shape[0])] if rule.layered else [(None, x)]
        for i, part in slices:
            for name, tensor in _slice_export(rule, part, i):
                out[name] = np.asarray(tensor, order="C")
    return out


def expected_tensors(model_config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """{export name: torch shape} of every tensor an export of `model_config` holds."""
    abstract = abstract_params(model_config)
    leaves = _flat(abstract)
    out = {}
    for rule in _rules(model_config, abstract):
        for i, shape in _rule_slices(rule, tuple(leaves[rule.path].shape)):
            out.update(_slice_expected(rule, shape, i))
    return out


def from_torch_tensors(model_config: ml_collections.ConfigDict, tensors: dict[str, np.ndarray],
                       where: str = "the export"):
    """Inverse of `to_torch_tensors`: the param tree of `model_config` (param_dtype arrays).

    Raises ExportError listing every missing, unexpected or misshapen tensor at once. With
    tied embeddings `lm_head.weight` may be present, but must equal `model.embed_tokens.weight`.
    """
    abstract = abstract_params(model_config)
    leaves = _flat(abstract)
    rules = _rules(model_config, abstract)
    _covered(rules, leaves, "internal: the mapping does not match the model")
    tensors = dict(tensors)
    problems: list[str] = []
    if model_config.tie_embeddings and "lm_head.weight" in tensors:
        lm_head = tensors.pop("lm_head.weight")
        embed = tensors.get("model.embed_tokens.weight")
        if embed is None or lm_head.shape != embed.shape or not np.array_equal(
                np.asarray(lm_head, np.float32), np.asarray(embed, np.float32)):
            problems.append("lm_head.weight: the model ties its embeddings (tie_word_embeddings) "
                            "but lm_head.weight differs from model.embed_tokens.weight")
    expected: dict[str, tuple] = {}
    for rule in rules:
        for i, shape in _rule_slices(rule, tuple(leaves[rule.path].shape)):
            expected.update(_slice_expected(rule, shape, i))
    problems += [f"{n}: missing (shape {list(s)} expected)" for n, s in expected.items()
                 if n not in tensors]
    problems += [f"{n}: unexpected tensor (shape {list(np.shape(t))}) -- not part of a "
                 f"{_describe(model_config)} model" for n, t in tensors.items() if n not in expected]
    problems += [f"{n}: shape {list(np.shape(tensors[n]))}, expected {list(s)}"
                 for n, s in expected.items() if n in tensors and tuple(np.shape(tensors[n])) != s]
    problems += [f"{n}: dtype {np.asarray(tensors[n]).dtype} is not a float type"
                 for n in expected if n in tensors
                 and not np.issubdtype(np.asarray(tensors[n]).dtype, np.floating)
                 and np.asarray(tensors[n]).dtype != ml_dtypes.bfloat16]
    if problems:
        raise ExportError(f"{where} does not fit its config ({_describe(model_config)}):\n  "
                          + "\n  ".join(problems))
    flat_params = {}
    for rule in rules:
        leaf = leaves[rule.path]
        parts = []
        for i, shape in _rule_slices(rule, tuple(leaf.shape)):
            names = [n for n, _ in _slice_expected(rule, shape, i)]
            parts.append(_slice_import(rule, [np.asarray(tensors[n]) for n in names], shape))
        value = np.stack(parts) if rule.layered else parts[0]
        flat_params[rule.path] = np.asarray(value).astype(leaf.dtype)
    treedef = jax.tree_util.tree_structure(abstract)
    ordered = [flat_params[p] for p in _flat(abstract)]
    return jax.tree_util.tree_unflatten(treedef, ordered)


def _describe(cfg: ml_collections.ConfigDict) -> str:
    r = cfg.router
    what = f"router={r.name}"
    if r.name == "recurrent":
        what += f", cell={r.cell}, head={r.head}, shared_projector={r.shared_projector}"
    if r.name in ("linear", "mlp", "recurrent"):
        what += f", bias={r.bias}"
    if r.name == "recurrent":
        what += f", projector_bias={r.projector_bias}"
    return what + f", shared_expert={cfg.moe.shared_expert}, tie_embeddings={cfg.tie_embeddings}"
