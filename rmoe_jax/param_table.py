"""THE parameter table: every parameter's facts in one place.

One `Param` per parameter path of the model (all routers, all options), holding:
  axes    logical axis names of one layer's slice (`parallel` maps them to the mesh; stacked
          params under `layers/` get a leading `layers` axis)
  group   what it belongs to (`count_params` sums by group; `router` marks the router's params)
  decay   whether AdamW's weight decay applies (not to norm scales, biases, temperatures)
  frozen  never updated by the optimizer (the random router, the HyperRouter's generator)
  export  its name(s) in an export and how a slice becomes PyTorch tensors (`Name`); a path
          whose export name depends on the router has one `Name` per router, chosen by `when`

Which params exist is the model's business (its modules create them); this table gives their
facts. Sharding, the optimizer masks, the parameter counts, `analysis` and the export all read
it, so a new parameter is one `Param` line here (plus the module that creates it), and a
parameter missing here fails with a message naming this file.

Export kinds (how one per-layer slice becomes export tensors):
  copy          same array                                  (norm scales, biases, embeddings)
  linear        kernel [in, out] -> weight [out, in]        (flax Dense -> torch Linear)
  query         [d, H, hd] -> [H*hd, d]                     (q/k/v DenseGeneral)
  out           [H, hd, d] -> [d, H*hd]                     (o DenseGeneral)
  experts       [E, in, out] -> E tensors [out, in]          (names hold {e})
  split_linear  [in, G*p] -> G tensors [p, in]              (fused cell kernels, gate order)
  split_copy    [G*p] -> G tensors [p]                      (fused cell biases)
Name templates hold {i} (layer), {e} (expert) and {gate} (one name per cell gate, `CELL_GATES`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import ml_collections

# Gate order of the fused cell kernels (PyTorch's weight_ih row blocks) -> export suffixes.
CELL_GATES = {"gru": ("r", "z", "n"), "rnn": ("n",), "lstm": ("i", "f", "g", "o")}

When = Optional[Callable[[ml_collections.ConfigDict], bool]]


@dataclasses.dataclass(frozen=True)
class Name:
    """A param's export name(s): templates, slicing kind, whether the name is the format's own
    (HF Mixtral / the RMoE authors') rather than an extension listed in config.json with `doc`,
    and the model configs it applies to (`when`; None: all)."""
    templates: tuple[str, ...]
    kind: str
    spec: bool = True
    doc: str = ""
    when: When = None


@dataclasses.dataclass(frozen=True)
class Param:
    path: str  # '/'-joined, as in the param tree ('layers/...' = stacked over layers)
    axes: tuple[Optional[str], ...]  # of one layer's slice
    group: str
    export: tuple[Name, ...]
    decay: bool = True
    frozen: bool = False


@dataclasses.dataclass(frozen=True)
class ParamFact:
    """A param of one model config: its path and every fact, export names expanded."""
    path: tuple[str, ...]
    axes: tuple[Optional[str], ...]  # full rank: 'layers' first for stacked params
    layered: bool
    group: str
    decay: bool
    frozen: bool
    names: tuple[str, ...]
    kind: str
    spec: bool
    doc: str


def _router(*names: str) -> When:
    return lambda m: m.router.name in names


def _head(head: str) -> When:
    return lambda m: m.router.name == "recurrent" and m.router.head == head


def _cell(cell: str) -> When:
    return lambda m: m.router.cell == cell


L, B, R = "model.layers.{i}.", "model.layers.{i}.block_sparse_moe.", "layers/moe/router/"
ROUTER_IN_OUT, ROUTER_OUT = ("router_in", "router_out"), ("router_out",)
MLP_DOC = "MLP router as torch nn.Sequential(Linear(d, h), GELU(exact), Linear(h, E))"
HYPER_DOC = ("HyperRouter: W = reshape(hyper_out(relu(hyper_in(embedding))), [d, E]) (row-major), "
             "logits = x @ W; hyper_in/hyper_out are frozen, bias-free torch Linears")
SPROJ_DOC = "S-proj: one projector d -> p shared by every layer (replaces weight1/bias1)"
CELL_DOCS = {"gru": "", "rnn": "tanh RNN cell shared by all layers (the authors' CustomRNNCell "
                               "names): h' = tanh(W_in x + b_in + W_hn h + b_hn)",
             "lstm": "LSTM cell shared by all layers, torch LSTMCell gates i, f, g, o: "
                     "weight_i{gate} [p, p] = rows of weight_ih, weight_h{gate} of weight_hh; "
                     "the carried state is (h, c), routers read h"}


def _cosine_doc(reads: str, project: bool) -> str:
    return (f"cosine router on {reads}: logits = cos({'down(' + reads + ')' if project else reads}, "
            "expert_embedding[e]) * exp(min(logit_scale, ln 100)), L2 normalisation with eps 1e-6 "
            "inside the rsqrt")


def _cosine_head(path: str, reads: str, plain: When, projected: When) -> list[Param]:
    """The cosine / XMoE head's params at `path` (the cosine router's, or RMoE's cosine head)."""
    prefix = B + "gate."
    down = _cosine_doc(reads, True) + "; down: bias-free Linear d -> q (XMoE)"
    return [
        Param(path + "down/kernel", ROUTER_IN_OUT, "router",
              (Name((prefix + "down.weight",), "linear", False, down, projected),)),
        Param(path + "expert_embedding", ROUTER_IN_OUT, "router", tuple(
            Name((prefix + "expert_embedding",), "copy", False, _cosine_doc(reads, project), when)
            for project, when in ((False, plain), (True, projected)))),
        Param(path + "logit_scale", (), "router", tuple(
            Name((prefix + "logit_scale",), "copy", False, _cosine_doc(reads, project) + " (a scalar)",
                 when) for project, when in ((False, plain), (True, projected))), decay=False),
    ]


def _cell_param(ours: str, theirs: str, kind: str, axes: tuple, decay: bool) -> Param:
    names = tuple(Name(("model.rnn_router." + theirs + "{gate}",), kind, cell == "gru",
                       CELL_DOCS[cell], _cell(cell)) for cell in CELL_GATES)
    return Param("router_shared/cell/" + ours, axes, "router", names, decay=decay)


def _one(template: str, kind: str, spec: bool = True, doc: str = "") -> tuple[Name, ...]:
    return (Name((template,), kind, spec, doc),)


def _shared_expert(ours: str, theirs: str, role: str, axes: tuple) -> Param:
    doc = (f"shared (always-on) SwiGLU expert, {role} (the authors' LlamaMLP); "
           "layer output = routed_weight * moe + shared_weight * shared")
    return Param(f"layers/moe/shared_expert/{ours}/kernel", axes, "shared_expert",
                 _one(L + f"mlp_share.{theirs}.weight", "linear", False, doc))


# In export order: a model's export lists its params in this order, layer by layer.
PARAMS: tuple[Param, ...] = (
    Param("embed/embedding", ("vocab", "embed"), "embedding", _one("model.embed_tokens.weight", "copy")),
    Param("layers/attention_norm/scale", ("norm",), "norm",
          _one(L + "input_layernorm.weight", "copy"), decay=False),
    Param("layers/attention/query/kernel", ("embed", "heads", "head_dim"), "attention",
          _one(L + "self_attn.q_proj.weight", "query")),
    Param("layers/attention/key/kernel", ("embed", "kv_heads", "head_dim"), "attention",
          _one(L + "self_attn.k_proj.weight", "query")),
    Param("layers/attention/value/kernel", ("embed", "kv_heads", "head_dim"), "attention",
          _one(L + "self_attn.v_proj.weight", "query")),
    Param("layers/attention/out/kernel", ("heads", "head_dim", "embed"), "attention",
          _one(L + "self_attn.o_proj.weight", "out")),
    Param("layers/moe_norm/scale", ("norm",), "norm",
          _one(L + "post_attention_layernorm.weight", "copy"), decay=False),
    Param("layers/moe/w1", ("expert", "expert_embed", "expert_mlp"), "experts",
          _one(B + "experts.{e}.w1.weight", "experts")),
    Param("layers/moe/w3", ("expert", "expert_embed", "expert_mlp"), "experts",
          _one(B + "experts.{e}.w3.weight", "experts")),
    Param("layers/moe/w2", ("expert", "expert_mlp", "expert_embed"), "experts",
          _one(B + "experts.{e}.w2.weight", "experts")),
    _shared_expert("w1", "gate_proj", "gate, through SiLU", ("embed", "mlp")),
    _shared_expert("w3", "up_proj", "up", ("embed", "mlp")),
    _shared_expert("w2", "down_proj", "down", ("mlp", "embed")),
    # Routers (replicated: `router_in` / `router_out` map to no mesh axis by default).
    Param("router_shared/projector_kernel", ROUTER_IN_OUT, "router",
          _one("model.router_projector.weight", "linear", False, SPROJ_DOC)),
    Param("router_shared/projector_bias", ROUTER_OUT, "router",
          _one("model.router_projector.bias", "copy", False, SPROJ_DOC), decay=False),
    Param(R + "projector/kernel", ROUTER_IN_OUT, "router", _one(B + "weight1", "linear")),
    Param(R + "projector/bias", ROUTER_OUT, "router",
          _one(B + "bias1", "copy", False, "bias of the projector: x' = weight1 x + bias1"), decay=False),
    Param(R + "hidden/kernel", ROUTER_IN_OUT, "router", _one(B + "gate.0.weight", "linear", False, MLP_DOC)),
    Param(R + "hidden/bias", ROUTER_OUT, "router", _one(B + "gate.0.bias", "copy", False, "MLP router"),
          decay=False),
    Param(R + "gate/kernel", ROUTER_IN_OUT, "router", (
        Name((B + "gate.weight",), "linear", when=_router("linear")),
        Name((B + "gate.2.weight",), "linear", False, "MLP router", _router("mlp")),
        Name((B + "weight2",), "linear", when=_router("recurrent")))),
    Param(R + "gate/bias", ROUTER_OUT, "router", (
        Name((B + "gate.bias",), "copy", False, "bias of the linear router: logits = x W^T + b",
             _router("linear")),
        Name((B + "gate.2.bias",), "copy", False, "MLP router", _router("mlp")),
        Name((B + "bias2",), "copy", False, "bias of the router head: logits = weight2 h + bias2",
             _router("recurrent"))), decay=False),
    *_cosine_head(R + "gate/", "h", _head("cosine"), _head("xmoe")),
    *_cosine_head(R + "head/", "x", _router("cosine"), _router("xmoe")),
    Param(R + "embedding", ROUTER_OUT, "router", _one(B + "gate.embedding", "copy", False, HYPER_DOC)),
    Param(R + "frozen_kernel", ROUTER_IN_OUT, "router",
          _one(B + "gate.weight", "linear", True, "frozen (never trained) random linear router"),
          frozen=True),
    Param(R + "frozen_hyper_in", ROUTER_IN_OUT, "router",
          _one(B + "gate.hyper_in.weight", "linear", False, HYPER_DOC), frozen=True),
    Param(R + "frozen_hyper_out", ROUTER_IN_OUT, "router",
          _one(B + "gate.hyper_out.weight", "linear", False, HYPER_DOC), frozen=True),
    _cell_param("input_kernel", "weight_i", "split_linear", ROUTER_IN_OUT, True),
    _cell_param("hidden_kernel", "weight_h", "split_linear", ROUTER_IN_OUT, True),
    _cell_param("input_bias", "bias_i", "split_copy", ROUTER_OUT, False),
    _cell_param("hidden_bias", "bias_h", "split_copy", ROUTER_OUT, False),
    Param("final_norm/scale", ("norm",), "norm", _one("model.norm.weight", "copy"), decay=False),
    Param("lm_head/kernel", ("embed", "vocab"), "embedding", _one("lm_head.weight", "linear")),
)
BY_PATH: dict[str, Param] = {param.path: param for param in PARAMS}
assert len(BY_PATH) == len(PARAMS), "a path is listed twice in PARAMS"


class UnknownParamError(ValueError):
    """A param the model creates but the table does not list."""


def path_string(path) -> str:
    """'/'-joined names of a pytree key path (dict keys, attributes or plain strings)."""
    return "/".join(str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path)


def lookup(path: str) -> Param:
    """The table's entry for a '/'-joined param path."""
    try:
        return BY_PATH[path]
    except KeyError:
        raise UnknownParamError(f"param {path} is not in the parameter table: add a Param for it "
                                "to rmoe_jax/param_table.py") from None


def fact_tree(params: Any, field: Callable[[Param, tuple], Any]) -> Any:
    """A pytree like `params` with `field(entry, leaf_shape)` at each leaf."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: field(lookup(path_string(path)), tuple(getattr(leaf, "shape", ()))), params)


def _full_axes(param: Param, shape: tuple) -> tuple:
    layered = param.path.startswith("layers/")
    axes = (("layers",) if layered else ()) + tuple(param.axes)
    if len(axes) != len(shape):
        raise ValueError(f"param {param.path}: rank {len(shape)} does not match its axes {axes} "
                         "in rmoe_jax/param_table.py")
    return axes


def logical_axes(params: Any) -> Any:
    """Pytree of logical-axis tuples, one per param (stacked params start with 'layers')."""
    return fact_tree(params, _full_axes)


def decay_mask(params: Any) -> Any:
    """Pytree of bools, True where weight decay applies: not norm scales, biases or temperatures."""
    return fact_tree(params, lambda param, _: param.decay)


def frozen_mask(params: Any) -> Any:
    """Pytree of bools, True where a param must never be updated (e.g. the random router)."""
    return fact_tree(params, lambda param, _: param.frozen)


def groups(params: Any) -> Any:
    """Pytree of group names ('embedding', 'experts', 'router', ...), one per param."""
    return fact_tree(params, lambda param, _: param.group)


def _export_name(param: Param, model_config: ml_collections.ConfigDict) -> Name:
    for name in param.export:
        if name.when is None or name.when(model_config):
            return name
    raise UnknownParamError(f"param {param.path}: no export name for router "
                            f"{model_config.router.name!r} in rmoe_jax/param_table.py")


def param_facts(model_config: ml_collections.ConfigDict, params: Any) -> list[ParamFact]:
    """Every param of `params` (a tree of the model `model_config` describes, arrays or
    ShapeDtypeStructs) with its facts, in export order."""
    shapes = {path_string(path): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path in shapes:
        lookup(path)  # every param is in the table
    facts = []
    for param in PARAMS:
        if param.path not in shapes:
            continue
        name = _export_name(param, model_config)
        gates = CELL_GATES[model_config.router.cell]
        names = tuple(t.replace("{gate}", g) for t in name.templates for g in gates) \
            if any("{gate}" in t for t in name.templates) else name.templates
        facts.append(ParamFact(
            path=tuple(param.path.split("/")), axes=_full_axes(param, shapes[param.path]),
            layered=param.path.startswith("layers/"), group=param.group, decay=param.decay,
            frozen=param.frozen, names=names, kind=name.kind, spec=name.spec, doc=name.doc))
    return facts
