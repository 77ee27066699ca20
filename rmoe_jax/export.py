"""Portable checkpoints: export a trained model to safetensors + config.json, and import it back.

    python -m rmoe_jax.export --workdir runs/rmoe --out exports/rmoe [--step N]
        [--dtype float32|bfloat16] [--max_shard_size 5GB] [--overwrite]

The format (README, "Export format"): HF Llama/Mixtral tensor names in PyTorch `nn.Linear`
layout (`[out, in]`), `model.safetensors` or shards plus `model.safetensors.index.json`, a
`config.json` and the tokenizer's files (`tokenizer.model` for SentencePiece; `tokenizer.json`
and a `tokenizer_config.json` for a Hugging Face tokenizer, so `AutoTokenizer` opens it).

* A linear (or frozen random) router exports as a Mixtral checkpoint:
  `transformers.MixtralForCausalLM.from_pretrained(folder)` loads it (and gives our logits
  whenever `config.json["rmoe_jax"]["transformers_exact"]` is true).
* A recurrent router uses the RMoE authors' names (`block_sparse_moe.weight1/weight2`,
  `model.rnn_router.*`) and their `LlamaMoeRNNConfig` fields, and the export carries its own
  transformers code (`rmoe_jax/hf_remote/`, copied in, with an `auto_map` in config.json):
  `transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it
  and gives our logits. A variant that code cannot reproduce (`remote_code_problems`) is
  exported without it, or refused with `remote_code=True` (the CLI's default).
* Everything the spec's names cannot express (router biases, MLP/cosine/XMoE/hyper routers,
  RNN/LSTM cells, S-proj, shared experts) gets names in the same style under the same prefix,
  each listed with its meaning in `config.json["rmoe_jax"]["extension_tensors"]`.
* `config.json["rmoe_jax"]` also holds our full model (and data) config, so `import_export`
  rebuilds the exact model; an unexpected, missing or misshapen tensor is an error.

Public API:
  load_workdir(workdir, step=None) -> WorkdirCheckpoint(config, params, step, workdir)
  export_model(model_config, params, out, *, data_config=None, dtype, max_shard_size,
               overwrite, tokenizer_file=None, source=None, remote_code=None) -> out path
  export_workdir(workdir, out, *, step=None, dtype, max_shard_size, overwrite,
                 remote_code=True) -> out path
  remote_code_problems(model_config) -> why the transformers code cannot run it ([] = it can)
  read_export(folder) -> Export(model_config, params, data_config, tokenizer_file, config_json)
  import_export(folder) -> (model_config, params)
  to_torch_tensors(model_config, params) -> {name: np.ndarray}   (the name mapping)
  from_torch_tensors(model_config, tensors) -> params              (its inverse)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np

from rmoe_jax import config as config_lib
from rmoe_jax import hf_remote

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"  # SentencePiece
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILES = {"sentencepiece": TOKENIZER_FILE, "huggingface": HF_TOKENIZER_FILE}
DEFAULT_MAX_SHARD_SIZE = "5GB"
EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Gate order of the fused cell kernels (PyTorch's weight_ih row blocks) -> export suffixes.
CELL_GATES = {"gru": ("r", "z", "n"), "rnn": ("n",), "lstm": ("i", "f", "g", "o")}


class ExportError(ValueError):
    """An export that cannot be written or read back; the message says what and where."""


# -- configs ----------------------------------------------------------------------------------------

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
        raise ExportError(f"cannot rebuild the {prefix} config:\n  " + "\n  ".join(problems))
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


# -- workdir checkpoints ----------------------------------------------------------------------------

class DamagedCheckpointError(FileNotFoundError):
    """A checkpoint whose files fail their checksums or hold non-finite values."""


@dataclasses.dataclass
class WorkdirCheckpoint:
    config: ml_collections.ConfigDict  # the full experiment config saved with the step
    params: Any  # numpy arrays, the model's param tree
    step: int
    workdir: str


def abstract_params(model_config: ml_collections.ConfigDict):
    """The param tree of `model_config` as ShapeDtypeStructs (nothing allocated or compiled)."""
    import flax.linen as nn

    from rmoe_jax.model import build_model

    model = build_model(model_config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return nn.meta.unbox(shapes["params"])


def _checkpoint_manager(directory: str):
    """A read-only Orbax manager over `<workdir>/checkpoints`.

    Read-only on purpose: `rmoe_jax.checkpoint.Checkpointer` creates the directory and cleans up
    unfinished (temporary) step directories when it opens one, which would delete the save in
    progress of a run that is still training. The item names and handlers are its own.
    """
    import orbax.checkpoint as ocp

    from rmoe_jax.checkpoint import CONFIG, STATE

    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler())
    json_handler = ocp.JsonCheckpointHandler(filename="config.json")
    registry.add(CONFIG, ocp.args.JsonRestore, json_handler)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           cleanup_tmp_directories=False)
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


def load_workdir(workdir: str, step: Optional[int] = None) -> WorkdirCheckpoint:
    """The model params (only: no optimizer state) and config of a training workdir.

    `step=None` takes the latest complete checkpoint. Params come back as numpy arrays.
    """
    import orbax.checkpoint as ocp

    from etils import epath

    from rmoe_jax.checkpoint import CHECKPOINT_DIR, CONFIG, STATE, verify_step

    workdir = os.path.abspath(os.path.expanduser(workdir))
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} not found: --workdir must be a training workdir "
                                "(the folder given to train.py --workdir)")
    manager = _checkpoint_manager(directory)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {directory}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; complete "
                                    f"steps: {', '.join(map(str, steps))}")
        problems = verify_step(epath.Path(directory) / str(step))
        if problems:  # never read a checkpoint whose files changed since they were saved
            raise DamagedCheckpointError(
                f"the checkpoint at step {step} in {directory} is damaged: " + "; ".join(problems)
                + f". Complete steps: {', '.join(map(str, steps))}; pick another with --step")
        saved = manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
        config = full_config_from_dict(saved[CONFIG])
        target = {"params": abstract_params(config.model)}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        restored = manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                          partial_restore=True)}))
    finally:
        manager.close()
    params = restored[STATE]["params"]
    _check_tree(params, target["params"], f"checkpoint {directory}/{step}")
    bad = _non_finite({"/".join(path): x for path, x in _flat(params).items()})
    if bad:
        raise DamagedCheckpointError(
            f"the checkpoint at step {step} in {directory} holds non-finite values (NaN or inf) "
            f"in {len(bad)} tensor{'s' if len(bad) > 1 else ''}: {', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}")
    return WorkdirCheckpoint(config=config, params=params, step=int(step), workdir=workdir)


def _flat(tree) -> dict[tuple[str, ...], Any]:
    return {tuple(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_tree(params, abstract, where: str) -> None:
    got, want = _flat(params), _flat(abstract)
    problems = [f"{'/'.join(p)}: missing" for p in sorted(set(want) - set(got))]
    problems += [f"{'/'.join(p)}: unexpected" for p in sorted(set(got) - set(want))]
    problems += [f"{'/'.join(p)}: shape {tuple(np.shape(got[p]))}, the config gives "
                 f"{tuple(want[p].shape)}" for p in sorted(set(got) & set(want))
                 if tuple(np.shape(got[p])) != tuple(want[p].shape)]
    if problems:
        raise ExportError(f"{where} does not match its model config:\n  " + "\n  ".join(problems))


# -- the name mapping -------------------------------------------------------------------------------
#
# One Rule per param leaf of ours. `kind` says how one (per-layer) slice becomes export tensors:
#   copy          same array                                  (norm scales, biases, embeddings)
#   linear        kernel [in, out] -> weight [out, in]        (flax Dense -> torch Linear)
#   query         [d, H, hd] -> [H*hd, d]                     (q/k/v DenseGeneral)
#   out           [H, hd, d] -> [d, H*hd]                     (o DenseGeneral)
#   experts       [E, in, out] -> E tensors [out, in]          (names hold {e})
#   split_linear  [in, G*p] -> G tensors [p, in]              (fused cell kernels, gate order)
#   split_copy    [G*p] -> G tensors [p]                      (fused cell biases)

@dataclasses.dataclass(frozen=True)
class Rule:
    path: tuple[str, ...]
    names: tuple[str, ...]  # export name templates ({i} layer, {e} expert); one per split part
    kind: str
    layered: bool  # the leaf has a leading layer axis (under params['layers'])
    spec: bool  # the names are the format's own (HF Mixtral / the RMoE authors'); otherwise an extension, listed in config.json
    doc: str = ""


def _rules(cfg: ml_collections.ConfigDict) -> list[Rule]:
    """Every param of the model `cfg` describes, in export order (layer by layer)."""
    L = "model.layers.{i}."
    B = L + "block_sparse_moe."
    rules = [Rule(("embed", "embedding"), ("model.embed_tokens.weight",), "copy", False, True)]

    def layer(path, name, kind, spec=True, doc=""):
        rules.append(Rule(("layers",) + path, (L + name,), kind, True, spec, doc))

    layer(("attention_norm", "scale"), "input_layernorm.weight", "copy")
    layer(("attention", "query", "kernel"), "self_attn.q_proj.weight", "query")
    layer(("attention", "key", "kernel"), "self_attn.k_proj.weight", "query")
    layer(("attention", "value", "kernel"), "self_attn.v_proj.weight", "query")
    layer(("attention", "out", "kernel"), "self_attn.o_proj.weight", "out")
    layer(("moe_norm", "scale"), "post_attention_layernorm.weight", "copy")
    for w in ("w1", "w3", "w2"):
        layer(("moe", w), f"block_sparse_moe.experts.{{e}}.{w}.weight", "experts")
    moe, router = cfg.moe, cfg.router
    if moe.shared_expert:
        for ours, theirs, role in (("w1", "gate_proj", "gate, through SiLU"), ("w3", "up_proj", "up"),
                                   ("w2", "down_proj", "down")):
            layer(("moe", "shared_expert", ours, "kernel"), f"mlp_share.{theirs}.weight", "linear",
                  False, f"shared (always-on) SwiGLU expert, {role} (the authors' LlamaMLP); "
                  "layer output = routed_weight * moe + shared_weight * shared")
    R = ("moe", "router")
    name = router.name
    if name == "linear":
        layer(R + ("gate", "kernel"), "block_sparse_moe.gate.weight", "linear")
        if router.bias:
            layer(R + ("gate", "bias"), "block_sparse_moe.gate.bias", "copy", False,
                  "bias of the linear router: logits = x W^T + b")
    elif name == "random":
        layer(R + ("frozen_kernel",), "block_sparse_moe.gate.weight", "linear", True,
              "frozen (never trained) random linear router")
    elif name == "mlp":
        layer(R + ("hidden", "kernel"), "block_sparse_moe.gate.0.weight", "linear", False,
              "MLP router as torch nn.Sequential(Linear(d, h), GELU(exact), Linear(h, E))")
        layer(R + ("hidden", "bias"), "block_sparse_moe.gate.0.bias", "copy", False, "MLP router")
        layer(R + ("gate", "kernel"), "block_sparse_moe.gate.2.weight", "linear", False, "MLP router")
        if router.bias:
            layer(R + ("gate", "bias"), "block_sparse_moe.gate.2.bias", "copy", False, "MLP router")
    elif name in ("cosine", "xmoe"):
        _cosine_head(layer, R + ("head",), "block_sparse_moe.gate.", name == "xmoe", "x")
    elif name == "hyper":
        doc = ("HyperRouter: W = reshape(hyper_out(relu(hyper_in(embedding))), [d, E]) (row-major), "
               "logits = x @ W; hyper_in/hyper_out are frozen, bias-free torch Linears")
        layer(R + ("embedding",), "block_sparse_moe.gate.embedding", "copy", False, doc)
        layer(R + ("frozen_hyper_in",), "block_sparse_moe.gate.hyper_in.weight", "linear", False, doc)
        layer(R + ("frozen_hyper_out",), "block_sparse_moe.gate.hyper_out.weight", "linear", False, doc)
    elif name == "recurrent":
        if router.shared_projector:
            doc = "S-proj: one projector d -> p shared by every layer (replaces weight1/bias1)"
            rules.append(Rule(("router_shared", "projector_kernel"), ("model.router_projector.weight",),
                              "linear", False, False, doc))
            if router.projector_bias:
                rules.append(Rule(("router_shared", "projector_bias"), ("model.router_projector.bias",),
                                  "copy", False, False, doc))
        else:
            layer(R + ("projector", "kernel"), "block_sparse_moe.weight1", "linear")
            if router.projector_bias:
                layer(R + ("projector", "bias"), "block_sparse_moe.bias1", "copy", False,
                      "bias of the projector: x' = weight1 x + bias1")
        if router.head == "linear":
            layer(R + ("gate", "kernel"), "block_sparse_moe.weight2", "linear")
            if router.bias:
                layer(R + ("gate", "bias"), "block_sparse_moe.bias2", "copy", False,
                      "bias of the router head: logits = weight2 h + bias2")
        else:
            _cosine_head(layer, R + ("gate",), "block_sparse_moe.gate.", router.head == "xmoe", "h")
        gates = CELL_GATES[router.cell]
        spec = router.cell == "gru"
        doc = {"gru": "", "rnn": "tanh RNN cell shared by all layers (the authors' CustomRNNCell "
                                 "names): h' = tanh(W_in x + b_in + W_hn h + b_hn)",
               "lstm": "LSTM cell shared by all layers, torch LSTMCell gates i, f, g, o: "
                       "weight_i{gate} [p, p] = rows of weight_ih, weight_h{gate} of weight_hh; "
                       "the carried state is (h, c), routers read h"}[router.cell]
        C = "model.rnn_router."
        for ours, theirs, kind in (("input_kernel", "weight_i", "split_linear"),
                                   ("hidden_kernel", "weight_h", "split_linear"),
                                   ("input_bias", "bias_i", "split_copy"),
                                   ("hidden_bias", "bias_h", "split_copy")):
            rules.append(Rule(("router_shared", "cell", ours), tuple(C + theirs + g for g in gates),
                              kind, False, spec, doc))
    else:  # pragma: no cover - the config validation rejects unknown routers
        raise ExportError(f"model.router.name: no export mapping for router {name!r}")
    rules.append(Rule(("final_norm", "scale"), ("model.norm.weight",), "copy", False, True))
    if not cfg.tie_embeddings:
        rules.append(Rule(("lm_head", "kernel"), ("lm_head.weight",), "linear", False, True))
    return rules


def _cosine_head(layer, path, prefix, project, reads):
    doc = (f"cosine router on {reads}: logits = cos({'down(' + reads + ')' if project else reads}, "
           "expert_embedding[e]) * exp(min(logit_scale, ln 100)), L2 normalisation with eps 1e-6 "
           "inside the rsqrt")
    if project:
        layer(path + ("down", "kernel"), prefix + "down.weight", "linear", False,
              doc + "; down: bias-free Linear d -> q (XMoE)")
    layer(path + ("expert_embedding",), prefix + "expert_embedding", "copy", False, doc)
    layer(path + ("logit_scale",), prefix + "logit_scale", "copy", False, doc + " (a scalar)")


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
    problems += [f"{'/'.join(p)}: param has no export name (add it to rmoe_jax.export._rules)"
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
    leaves = _flat(abstract_params(model_config))
    out = {}
    for rule in _rules(model_config):
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
    rules = _rules(model_config)
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


# -- config.json ------------------------------------------------------------------------------------

def is_mixtral(model_config: ml_collections.ConfigDict) -> bool:
    """True when the router is a plain linear map (linear or frozen random): a Mixtral export."""
    return model_config.router.name in ("linear", "random")


def transformers_notes(model_config: ml_collections.ConfigDict) -> list[str]:
    """Why `MixtralForCausalLM` would NOT reproduce this model's logits (empty = it does)."""
    cfg, notes = model_config, []
    if cfg.router.name == "recurrent":
        problems = remote_code_problems(cfg)
        if not problems:
            return ["MixtralForCausalLM cannot run a recurrent router; "
                    "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) runs the "
                    f"modeling code shipped in the folder ({hf_remote.MODELING_FILE}) and reproduces "
                    "the logits"]
        return ["MixtralForCausalLM cannot run a recurrent router, and the export holds no "
                "transformers code for this variant: " + "; ".join(problems)]
    if not is_mixtral(cfg):
        return [f"router {cfg.router.name!r} has no transformers implementation; load it with "
                "the RMoE authors' code (recurrent) or your own, following extension_tensors"]
    if cfg.router.name == "linear" and cfg.router.bias:
        notes.append("the router bias (block_sparse_moe.gate.bias) is ignored by Mixtral")
    if cfg.moe.shared_expert:
        notes.append("the shared expert (mlp_share.*) is ignored by Mixtral")
    if not cfg.moe.renormalize:
        notes.append("moe.renormalize=False: Mixtral always renormalises the top-k weights")
    if cfg.moe.dispatch == "capacity":
        notes.append("moe.dispatch='capacity' drops tokens over an expert's capacity; Mixtral "
                     "never drops (logits differ wherever a token was dropped)")
    return notes


def remote_code_problems(model_config: ml_collections.ConfigDict) -> list[str]:
    """Why the shipped transformers code (rmoe_jax/hf_remote) would NOT reproduce this
    recurrent-router model, one "field: why" each; [] = it does. Only recurrent routers ship
    transformers code (linear/random ones are Mixtral checkpoints)."""
    cfg = model_config
    if cfg.router.name != "recurrent":
        return [f"model.router.name: {cfg.router.name!r}; only recurrent routers ship "
                "transformers code"]
    problems = []
    if cfg.moe.dispatch == "capacity":
        problems.append("model.moe.dispatch: 'capacity' drops the tokens over an expert's "
                        "capacity (so a token's output depends on the later tokens of its "
                        "sequence); the transformers code never drops a token")
    return problems


def _remote_code_refusal(problems: list[str]) -> ExportError:
    return ExportError("cannot export this RMoE with its transformers code, which would not "
                       "reproduce the model:\n  " + "\n  ".join(problems) + "\n(--skip_remote_code "
                       "/ remote_code=False exports it without that code; "
                       "rmoe_jax.export.import_export still reads it back)")


def _remote_code_fields(cfg: ml_collections.ConfigDict) -> dict:
    """LlamaMoeRNNConfig fields for our extensions (rmoe_jax/hf_remote/configuration_*.py)."""
    router = cfg.router
    return {
        "rmoe_router_bias": bool(router.bias) and router.head == "linear",
        "rmoe_projector_bias": bool(router.projector_bias),
        "rmoe_shared_projector": bool(router.shared_projector),
        "rmoe_no_recurrence": bool(router.no_recurrence),
        "rmoe_detach": bool(router.detach),
        "rmoe_residual_alpha": float(router.residual_alpha),
        "rmoe_residual_detach": bool(router.residual_detach),
        "rmoe_router_head": router.head,
        "rmoe_xmoe_dim": router.xmoe_dim if router.head == "xmoe" else None,
        "rmoe_renormalize": bool(cfg.moe.renormalize),
    }


def _tokenizer_ids(data_config) -> dict:
    if data_config is None or data_config.tokenizer == "byte":
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if data_config.tokenizer == "huggingface":
        return _hf_special_ids(data_config.tokenizer_file)
    from rmoe_jax.data.tokenizers import SP_BOS_ID, SP_EOS_ID, SP_PAD_ID

    return {"bos_token_id": SP_BOS_ID, "eos_token_id": SP_EOS_ID, "pad_token_id": SP_PAD_ID}


def _hf_special_ids(path: str) -> dict:
    """bos/eos/pad ids of a tokenizer.json as the training pipeline reads them (the document
    separator is the BOS; EOS the file's EOS-named special, else the separator)."""
    from rmoe_jax.data.tokenizers import HF_EOS_NAMES, HuggingFaceTokenizer

    if not path or not os.path.exists(path):
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    tokenizer = HuggingFaceTokenizer(path)
    eos = next((i for i in map(tokenizer._tok.token_to_id, HF_EOS_NAMES) if i is not None),
               tokenizer.bos_id)
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_id}


def _hf_tokenizer_config(path: str) -> dict:
    """tokenizer_config.json for a copied tokenizer.json: the fast tokenizer class and its specials."""
    from rmoe_jax.data.tokenizers import HuggingFaceTokenizer

    tokenizer = HuggingFaceTokenizer(path)
    ids = _hf_special_ids(path)
    token = {k: None if ids[f"{k}_token_id"] is None else tokenizer._tok.id_to_token(ids[f"{k}_token_id"])
             for k in ("bos", "eos", "pad")}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token["bos"],
            "eos_token": token["eos"], "pad_token": token["pad"], "add_bos_token": False,
            "model_max_length": 1_000_000_000_000}


def hf_config(model_config: ml_collections.ConfigDict, *, dtype: str = "float32",
              data_config: Optional[ml_collections.ConfigDict] = None) -> dict:
    """The transformers-side fields of config.json (MixtralConfig or LlamaMoeRNNConfig)."""
    cfg = model_config
    head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
    out = {
        "architectures": ["MixtralForCausalLM" if is_mixtral(cfg) else "LlamaMoeRNNForCausalLM"],
        "model_type": "mixtral" if is_mixtral(cfg) else "llama_moe_rnn",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.moe.expert_hidden,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": float(cfg.rope_theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "attention_dropout": 0.0,
        "num_local_experts": cfg.moe.num_experts,
        "num_experts_per_tok": cfg.moe.top_k,
        "router_aux_loss_coef": cfg.moe.balance_coef,
        "output_router_logits": False,
        "use_cache": True,
        "dtype": dtype,
        **_tokenizer_ids(data_config),
    }
    if is_mixtral(cfg):
        out.update(router_jitter_noise=0.0, sliding_window=None)
    else:
        router = cfg.router
        out.update(
            attention_bias=False,
            pretraining_tp=1,
            moe_num_layers=cfg.num_layers,
            moe_expert_intermediate_size=cfg.moe.expert_hidden,
            add_moe_share_expert=bool(cfg.moe.shared_expert),
            moe_share_expert_intermediate_size=(cfg.moe.shared_expert_hidden or cfg.moe.expert_hidden)
            if cfg.moe.shared_expert else None,
            share_weight=cfg.moe.shared_weight,
            moe_weight=cfg.moe.routed_weight,
            add_moe_bias=False,
            moe_router_type=router.cell if router.name == "recurrent" else router.name,
            moe_router_rnn_hidden_size=router.hidden_size if router.name == "recurrent" else None,
        )
        if router.name == "recurrent":
            out.update(_remote_code_fields(cfg))
            if not remote_code_problems(cfg):
                out["auto_map"] = dict(hf_remote.AUTO_MAP)
    return out


def _extension_docs(model_config) -> dict[str, str]:
    """{name template: meaning} of every tensor the format does not name (an extension)."""
    return {name: rule.doc for rule in _rules(model_config) if not rule.spec for name in rule.names}


def build_config_json(model_config, *, dtype="float32", data_config=None, tokenizer=None,
                      source=None, remote_code: bool = True) -> dict:
    """config.json: the transformers fields, and our block. remote_code=False: the export
    holds no transformers code (so no auto_map either)."""
    notes = transformers_notes(model_config)
    out = hf_config(model_config, dtype=dtype, data_config=data_config)
    if not remote_code and "auto_map" in out:
        del out["auto_map"]
        notes = ["MixtralForCausalLM cannot run a recurrent router, and this export was written "
                 "without transformers code (remote_code=False / --skip_remote_code)"]
    out["rmoe_jax"] = {
        "format_version": FORMAT_VERSION,
        "model": _json_config(model_config),
        "data": None if data_config is None else _json_config(data_config),
        "tokenizer": tokenizer or {"type": "unknown"},
        "extension_tensors": _extension_docs(model_config),
        "transformers_exact": not notes,  # MixtralForCausalLM reproduces our logits
        "transformers_notes": notes,
        "remote_code_files": list(hf_remote.FILES) if "auto_map" in out else [],
        "dtype": dtype,
        "source": source or {},
    }
    return out


# -- writing ----------------------------------------------------------------------------------------

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


def export_model(model_config: ml_collections.ConfigDict, params, out: str, *,
                 data_config: Optional[ml_collections.ConfigDict] = None,
                 dtype: str = "float32", max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 overwrite: bool = False, tokenizer_file: Optional[str] = None,
                 source: Optional[dict] = None, remote_code: Optional[bool] = None) -> str:
    """Write `params` of the model `model_config` to the folder `out` (see the module doc).

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


# -- reading ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Export:
    model_config: ml_collections.ConfigDict
    params: Any  # numpy arrays in the model's param_dtype
    data_config: Optional[ml_collections.ConfigDict]  # None when the export has none
    tokenizer_file: Optional[str]  # the tokenizer's file inside the export, if any
    config_json: dict
    folder: str


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


def _non_finite(tensors: dict[str, Any]) -> list[str]:
    """'name (count of size values)' for every floating tensor holding NaN or inf."""
    bad = []
    for name, tensor in tensors.items():
        array = np.asarray(tensor)
        if np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16:
            count = int(array.size - np.count_nonzero(np.isfinite(array)))
            if count:
                bad.append(f"{name} ({count:,} of {array.size:,} values)")
    return bad


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


def _model_config_from_hf(hf: dict) -> ml_collections.ConfigDict:
    """Best effort for a config.json without our block (a Mixtral or the authors' RMoE)."""
    cfg = config_lib.model_config()
    model_type = hf.get("model_type")
    if model_type not in ("mixtral", "llama_moe_rnn"):
        raise ExportError(f"config.json: model_type {model_type!r} is neither mixtral nor "
                          "llama_moe_rnn, and there is no rmoe_jax block to rebuild the model from")
    rope = hf.get("rope_parameters") or {}
    cfg.vocab_size = hf["vocab_size"]
    cfg.d_model = hf["hidden_size"]
    cfg.num_layers = hf["num_hidden_layers"]
    cfg.num_heads = hf["num_attention_heads"]
    cfg.num_kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    cfg.head_dim = hf.get("head_dim") or 0
    cfg.max_seq_len = hf.get("max_position_embeddings", cfg.max_seq_len)
    cfg.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 1e6 if model_type == "mixtral"
                                                          else 1e4)))
    cfg.rms_norm_eps = float(hf.get("rms_norm_eps", 1e-5 if model_type == "mixtral" else 1e-6))
    cfg.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    cfg.init_std = float(hf.get("initializer_range", cfg.init_std))
    cfg.moe.num_experts = hf["num_local_experts"]
    cfg.moe.top_k = hf["num_experts_per_tok"]
    cfg.moe.balance_coef = float(hf.get("router_aux_loss_coef", cfg.moe.balance_coef))
    cfg.moe.renormalize = True
    cfg.moe.dispatch = "dropless"
    if model_type == "mixtral":
        cfg.moe.expert_hidden = hf["intermediate_size"]
        cfg.router.name = "linear"
        cfg.router.bias = False
    else:
        cfg.moe.expert_hidden = hf.get("moe_expert_intermediate_size") or hf["intermediate_size"]
        router_type = hf.get("moe_router_type", "gru")
        if router_type not in config_lib.CELL_NAMES:
            raise ExportError(f"config.json: moe_router_type {router_type!r} without an rmoe_jax block")
        cfg.router.name, cfg.router.cell = "recurrent", router_type
        cfg.router.hidden_size = hf["moe_router_rnn_hidden_size"]
        # Our extensions (LlamaMoeRNNConfig's rmoe_* fields); absent: the authors' RMoE.
        router = cfg.router
        router.bias = bool(hf.get("rmoe_router_bias", False))
        router.projector_bias = bool(hf.get("rmoe_projector_bias", False))
        router.shared_projector = bool(hf.get("rmoe_shared_projector", False))
        router.no_recurrence = bool(hf.get("rmoe_no_recurrence", False))
        router.detach = bool(hf.get("rmoe_detach", False))
        router.residual_alpha = float(hf.get("rmoe_residual_alpha", 0.0))
        router.residual_detach = bool(hf.get("rmoe_residual_detach", False))
        router.head = hf.get("rmoe_router_head", "linear")
        if router.head == "xmoe":
            router.xmoe_dim = int(hf["rmoe_xmoe_dim"])
        cfg.moe.renormalize = bool(hf.get("rmoe_renormalize", True))
        cfg.moe.shared_expert = bool(hf.get("add_moe_share_expert", False))
        if cfg.moe.shared_expert:
            cfg.moe.shared_expert_hidden = hf.get("moe_share_expert_intermediate_size") or 0
            cfg.moe.shared_weight = float(hf.get("share_weight", 0.5))
            cfg.moe.routed_weight = float(hf.get("moe_weight", 0.5))
        if hf.get("add_moe_bias"):
            raise ExportError("config.json: add_moe_bias (an output bias) is not supported")
        if hf.get("moe_num_layers", cfg.num_layers) != cfg.num_layers:
            raise ExportError("config.json: dense (non-MoE) layers (moe_num_layers < "
                              "num_hidden_layers) are not supported")
    return cfg


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


# -- CLI --------------------------------------------------------------------------------------------

def main(argv: Optional[Iterable[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m rmoe_jax.export",
        description="Export a training checkpoint to safetensors + config.json "
                    "(README: Export format); SMoE exports load in transformers' Mixtral.")
    parser.add_argument("--workdir", required=True, help="training workdir (train.py --workdir)")
    parser.add_argument("--out", required=True, help="export folder to create")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES))
    parser.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="split the weights into shards of at most this size, with an index "
                             "(e.g. 5GB, 500MB, 2GiB; default %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the contents of a non-empty --out")
    parser.add_argument("--tokenizer_file", default=None,
                        help="tokenizer file to include: a SentencePiece .model or a "
                             "tokenizer.json (default: the run's own)")
    parser.add_argument("--skip_tokenizer", action="store_true",
                        help="export without the tokenizer's files")
    parser.add_argument("--skip_remote_code", action="store_true",
                        help="RMoE: export without the transformers modeling code (by default "
                             "it is included, and a variant it cannot run is refused)")
    args = parser.parse_args(argv)
    _quiet_logs()
    try:
        out = export_workdir(args.workdir, args.out, step=args.step, dtype=args.dtype,
                             max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                             tokenizer_file=args.tokenizer_file, skip_tokenizer=args.skip_tokenizer,
                             remote_code=not args.skip_remote_code)
    except (ExportError, FileNotFoundError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(out, CONFIG_FILE)) as f:
        block = json.load(f)["rmoe_jax"]
    files = sorted(os.listdir(out))
    print(f"exported step {block['source'].get('step')} of {block['source'].get('workdir')} to "
          f"{out} ({block['dtype']}): {', '.join(files)}")
    if block["model"]["router"]["name"] in ("linear", "random") and block["transformers_notes"]:
        print("warning: transformers' MixtralForCausalLM loads this export but will not reproduce "
              "the model's logits: " + "; ".join(block["transformers_notes"]), file=sys.stderr)
    return 0


def _quiet_logs() -> None:
    """Orbax logs every restore (and that our read-only manager skips items) at WARNING."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
