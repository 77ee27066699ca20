"""config.json's transformers side: the fields of `MixtralConfig` (linear/random routers) or of
the RMoE authors' `LlamaMoeRNNConfig` (recurrent routers, with our `rmoe_*` extension fields and
an `auto_map` to the shipped code), the tokenizer's special ids, whether transformers
reproduces the model (`transformers_notes`, `remote_code_problems`), the whole config.json with
our `rmoe_jax` block (`build_config_json`), and the way back for a config.json without that
block (`_model_config_from_hf`).
"""

from __future__ import annotations

import os
from typing import Optional

import ml_collections

from rmoe_jax import config as config_lib
from rmoe_jax import hf_remote
from rmoe_jax.config_json import _json_config
from rmoe_jax.export.names import _rules
from rmoe_jax.export.spec import FORMAT_VERSION, ExportError


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
