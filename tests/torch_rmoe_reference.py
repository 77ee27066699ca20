"""A PyTorch RMoE built from an export folder, independently of rmoe_jax (test code only).

transformers' `MixtralForCausalLM` supplies everything but the router (embeddings, attention,
RMSNorm, SwiGLU experts, top-k dispatch); its linear gate is swapped, in every layer, for the
recurrent router of the paper's section 1:

    x'_i = weight1_i x_i;  h_i = GRUCell(x'_i, h_{i-1}) (one cell for all layers, h_0 = 0);
    logits_i = weight2_i h_i;  softmax in float32, top-k, renormalised.

The weights are read straight from the export's safetensors by their export names
(`model.layers.{i}.block_sparse_moe.weight1/weight2`, `model.rnn_router.weight_ir`, ...), and the
GRU is `torch.nn.GRUCell`, whose `weight_ih` stacks the r, z, n blocks.
"""

from __future__ import annotations

import glob
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn


def read_export_tensors(folder: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        tensors.update(load_file(path))
    return tensors


class SharedGRU(nn.Module):
    """The one GRU cell of all layers, and the state it threads through them in order."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.cell = nn.GRUCell(hidden_size, hidden_size)
        self.state = None


class RecurrentGate(nn.Module):
    """Drop-in for `MixtralTopKRouter`: forward(x) -> (logits, top-k weights, top-k indices)."""

    def __init__(self, layer: int, weight1: torch.Tensor, weight2: torch.Tensor, shared: SharedGRU,
                 top_k: int, *, detach: bool = False, no_recurrence: bool = False):
        super().__init__()
        self.layer = layer
        self.detach = detach  # RMoE-detach: h_{i-1} enters the cell without gradient
        self.no_recurrence = no_recurrence  # RMoE-NP: every layer's cell sees h_{i-1} = 0
        self.weight1 = nn.Parameter(weight1)  # [p, d]
        self.weight2 = nn.Parameter(weight2)  # [E, p]
        self.top_k = top_k
        self._shared = [shared]  # a list: not registered as a submodule of every layer

    def forward(self, hidden_states: torch.Tensor):
        shared = self._shared[0]
        x = hidden_states.reshape(-1, self.weight1.shape[1])
        projected = F.linear(x, self.weight1)
        previous = None if self.layer == 0 or self.no_recurrence else shared.state  # None: h = 0
        if previous is not None and self.detach:
            previous = previous.detach()
        h = shared.cell(projected, previous)
        shared.state = h
        logits = F.linear(h, self.weight2)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, indices


def mixtral_config_for(config_json: dict):
    """A MixtralConfig with the backbone fields of an RMoE export's config.json."""
    from transformers import MixtralConfig

    c = config_json
    return MixtralConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["moe_expert_intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
        max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=c["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]},
        tie_word_embeddings=c["tie_word_embeddings"], num_local_experts=c["num_local_experts"],
        num_experts_per_tok=c["num_experts_per_tok"], router_jitter_noise=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)


def load_torch_rmoe(folder: str, *, detach: bool = False, no_recurrence: bool = False):
    """transformers' Mixtral with its gates replaced by the GRU router, weights from `folder`.

    `detach` / `no_recurrence`: the paper's RMoE-detach and RMoE-NP ablations (Table 5).
    """
    from transformers import MixtralForCausalLM
    from transformers.utils import logging as hf_logging

    with open(os.path.join(folder, "config.json")) as f:
        config_json = json.load(f)
    assert config_json["model_type"] == "llama_moe_rnn" and config_json["moe_router_type"] == "gru"
    hf_logging.set_verbosity_error()  # the RMoE tensors are 'unexpected' to Mixtral: we add them below
    model = MixtralForCausalLM.from_pretrained(folder, config=mixtral_config_for(config_json),
                                               dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tensors = read_export_tensors(folder)
    p = config_json["moe_router_rnn_hidden_size"]
    shared = SharedGRU(p)
    cell, rnn = shared.cell, "model.rnn_router."
    with torch.no_grad():
        cell.weight_ih.copy_(torch.cat([tensors[rnn + f"weight_i{g}"] for g in "rzn"]))
        cell.weight_hh.copy_(torch.cat([tensors[rnn + f"weight_h{g}"] for g in "rzn"]))
        cell.bias_ih.copy_(torch.cat([tensors[rnn + f"bias_i{g}"] for g in "rzn"]))
        cell.bias_hh.copy_(torch.cat([tensors[rnn + f"bias_h{g}"] for g in "rzn"]))
    model.rnn_router = shared
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}.block_sparse_moe."
        layer.mlp.gate = RecurrentGate(i, tensors[prefix + "weight1"], tensors[prefix + "weight2"],
                                       shared, config_json["num_experts_per_tok"], detach=detach,
                                       no_recurrence=no_recurrence)
    return model
