"""RMoE, the Layerwise Recurrent Router for Mixture-of-Experts (arXiv 2408.06793), for transformers 5.

Written by rmoe_jax into every RMoE export; imports only torch and transformers. Load an
export with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

The model is a Llama decoder (pre-norm RMSNorm, rotary attention, tied or separate LM head,
taken from transformers' Llama by import) whose feed-forward is a top-k mixture of SwiGLU
experts in every layer. Layer i's router does not read the layer input alone: it reads the
state of ONE recurrent cell that all layers share, stepped once per layer:

    x'_i     = weight1_i x_i (+ bias1_i)       x_i: the MoE block's (normed) input, float32
    s_i      = Cell(x'_i, s_{i-1}),  s_0 = 0    GRU / tanh RNN / LSTM, PyTorch cell semantics
    logits_i = weight2_i h_i (+ bias2_i)        h_i: the cell output (the h of an LSTM's (h, c))
    gates    = top-k of softmax(logits_i) (float32), renormalised to sum to 1

The recurrence runs across layers, for each token on its own, within one forward call: the
state starts at zero in layer 0 of every call and is never carried from one position to the
next. So the KV cache and `generate` work exactly as for Mixtral or Llama.

Variants (config fields, see configuration_llama_moe_rnn.py): the cell (`moe_router_type`),
router biases (`rmoe_router_bias`, `rmoe_projector_bias`), RMoE-NP (`rmoe_no_recurrence`:
every layer's cell starts from 0), S-proj (`rmoe_shared_projector`: one projector d -> p for
all layers), a residual term (`rmoe_residual_alpha`: logits_i += alpha * head_i(h_{i-1})),
cosine / XMoE heads on h_i (`rmoe_router_head`), an always-on shared expert
(`add_moe_share_expert`: output = moe_weight * routed + share_weight * shared) and
`rmoe_renormalize` (False keeps the raw top-k probabilities).

Parameter names are the export's tensor names, so `save_pretrained` writes what the export
holds:
    model.rnn_router.{weight,bias}_{i,h}{gate}    the shared cell, one [p, p] / [p] per gate
                                                  (GRU r z n, RNN n, LSTM i f g o)
    model.router_projector.{weight,bias}          S-proj
    model.layers.{i}.block_sparse_moe.weight1/bias1, weight2/bias2
    model.layers.{i}.block_sparse_moe.gate.{expert_embedding,logit_scale,down.weight}
                                                  cosine / XMoE heads
    model.layers.{i}.block_sparse_moe.experts.{e}.w1/w2/w3.weight
    model.layers.{i}.mlp_share.{gate,up,down}_proj.weight

Router parameters stay float32 when the model loads in bf16/fp16, and router math is float32.
Loading is strict: a missing, unexpected or misshapen tensor is an error naming it.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_llama_moe_rnn import LlamaMoeRNNConfig

# Row blocks of PyTorch's fused cell weights, in their order; one tensor per gate here.
CELL_GATES = {"gru": ("r", "z", "n"), "rnn": ("n",), "lstm": ("i", "f", "g", "o")}
MAX_LOGIT_SCALE = math.log(100.0)  # cap on a cosine head's learnable inverse temperature


def linear32(x, weight, bias=None):
    """`F.linear` in float32, whatever the dtype the parameters were loaded in."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


class RecurrentRouterCell(nn.Module):
    """The one cell every layer's router steps: `model.rnn_router`.

    A state is a tuple of float32 `[tokens, p]` tensors: `(h,)` for the GRU and RNN, `(h, c)`
    for the LSTM; routers read `state[0]`.
    """

    def __init__(self, kind: str, size: int):
        super().__init__()
        self.kind, self.size = kind, size
        for gate in CELL_GATES[kind]:
            for side in ("i", "h"):  # i: from the input x', h: from the previous state
                self.register_parameter(f"weight_{side}{gate}", nn.Parameter(torch.empty(size, size)))
                self.register_parameter(f"bias_{side}{gate}", nn.Parameter(torch.empty(size)))

    def zero_state(self, tokens: int, device) -> tuple:
        zeros = torch.zeros(tokens, self.size, dtype=torch.float32, device=device)
        return (zeros, zeros) if self.kind == "lstm" else (zeros,)

    def gate(self, name: str, x, h):
        """W_i{name} x + b_i{name}, W_h{name} h + b_h{name} (kept apart: the GRU needs both)."""
        return (linear32(x, getattr(self, f"weight_i{name}"), getattr(self, f"bias_i{name}")),
                linear32(h, getattr(self, f"weight_h{name}"), getattr(self, f"bias_h{name}")))

    def forward(self, x, state: tuple) -> tuple:
        h = state[0]
        if self.kind == "gru":  # torch.nn.GRUCell: b_hn sits inside the reset product
            reset = torch.sigmoid(sum(self.gate("r", x, h)))
            update = torch.sigmoid(sum(self.gate("z", x, h)))
            from_x, from_h = self.gate("n", x, h)
            candidate = torch.tanh(from_x + reset * from_h)
            return ((1.0 - update) * candidate + update * h,)
        if self.kind == "rnn":  # torch.nn.RNNCell(nonlinearity="tanh")
            return (torch.tanh(sum(self.gate("n", x, h))),)
        c = state[1]  # torch.nn.LSTMCell
        i, f, g, o = (sum(self.gate(name, x, h)) for name in CELL_GATES["lstm"])
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return (torch.sigmoid(o) * torch.tanh(c), c)


def l2_normalize(x, eps: float = 1e-6):
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


class CosineRouterHead(nn.Module):
    """`block_sparse_moe.gate` for rmoe_router_head cosine / xmoe:
    logits = cos(down(h) or h, expert_embedding[e]) * exp(min(logit_scale, ln 100))."""

    def __init__(self, num_experts: int, size: int, down: int | None):
        super().__init__()
        self.down = nn.Linear(size, down, bias=False) if down else None
        self.expert_embedding = nn.Parameter(torch.empty(num_experts, down or size))
        self.logit_scale = nn.Parameter(torch.empty(()))

    def forward(self, h):
        z = h if self.down is None else linear32(h, self.down.weight)
        cosine = l2_normalize(z) @ l2_normalize(self.expert_embedding.float()).T
        return cosine * torch.exp(torch.clamp(self.logit_scale.float(), max=MAX_LOGIT_SCALE))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the attribute names are given (w1/w3/w2 or *_proj)."""

    def __init__(self, hidden_size: int, inner: int, names=("w1", "w3", "w2")):
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden_size, inner, bias=False))
        setattr(self, up, nn.Linear(hidden_size, inner, bias=False))
        setattr(self, down, nn.Linear(inner, hidden_size, bias=False))

    def forward(self, x):
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(F.silu(gate(x)) * up(x))


class LlamaMoeRNNSparseMoeBlock(nn.Module):
    """`block_sparse_moe` of one layer: its router's own weights and the routed experts.

    forward(x `[B, S, d]`, state, cell, projector) -> (routed output `[B, S, d]`, the cell's
    new state, router logits `[B*S, E]`). `cell` and `projector` are the model's shared ones.
    """

    def __init__(self, config: LlamaMoeRNNConfig):
        super().__init__()
        d, p, E = config.hidden_size, config.moe_router_rnn_hidden_size, config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.rmoe_renormalize
        self.no_recurrence = config.rmoe_no_recurrence
        self.detach = config.rmoe_detach
        self.residual_alpha = config.rmoe_residual_alpha
        self.residual_detach = config.rmoe_residual_detach
        self.weight1 = self.bias1 = self.weight2 = self.bias2 = self.gate = None
        if not config.rmoe_shared_projector:  # else the model's router_projector projects
            self.weight1 = nn.Parameter(torch.empty(p, d))
            if config.rmoe_projector_bias:
                self.bias1 = nn.Parameter(torch.empty(p))
        if config.rmoe_router_head == "linear":
            self.weight2 = nn.Parameter(torch.empty(E, p))
            if config.rmoe_router_bias:
                self.bias2 = nn.Parameter(torch.empty(E))
        else:
            down = config.rmoe_xmoe_dim if config.rmoe_router_head == "xmoe" else None
            self.gate = CosineRouterHead(E, p, down)
        self.experts = nn.ModuleList(
            SwiGLU(d, config.moe_expert_intermediate_size) for _ in range(E))

    def head(self, h):
        return linear32(h, self.weight2, self.bias2) if self.gate is None else self.gate(h)

    def route(self, x, previous, cell: RecurrentRouterCell, projector):
        """Router logits `[N, E]` (float32) and the new cell state, from tokens x `[N, d]`."""
        if projector is None:
            projected = linear32(x, self.weight1, self.bias1)
        else:
            projected = linear32(x, projector.weight, projector.bias)
        if previous is None:  # layer 0
            previous = cell.zero_state(x.shape[0], x.device)
        if self.no_recurrence:  # RMoE-NP: the cell never sees the previous layer's state
            cell_input = cell.zero_state(x.shape[0], x.device)
        else:
            cell_input = tuple(t.detach() for t in previous) if self.detach else previous
        state = cell(projected, cell_input)
        logits = self.head(state[0])
        if self.residual_alpha:
            residual = self.head(previous[0])
            if self.residual_detach:
                residual = residual.detach()
            logits = logits + self.residual_alpha * residual
        return logits, state

    def forward(self, hidden_states, state, cell, projector):
        batch, seq, d = hidden_states.shape
        x = hidden_states.reshape(-1, d)
        logits, state = self.route(x, state, cell, projector)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in torch.unique(experts).tolist():  # only the experts some token chose
            rows, slot = torch.where(experts == e)
            y = self.experts[e](x[rows]) * weights[rows, slot, None].to(x.dtype)
            out.index_add_(0, rows, y)
        return out.reshape(batch, seq, d), state, logits


class LlamaMoeRNNDecoderLayer(GradientCheckpointingLayer):
    """h = x + Attn(RMSNorm(x)); y = h + MoE(RMSNorm(h)); MoE = routed (+ the shared expert)."""

    def __init__(self, config: LlamaMoeRNNConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.block_sparse_moe = LlamaMoeRNNSparseMoeBlock(config)
        self.mlp_share = None
        if config.add_moe_share_expert:
            self.mlp_share = SwiGLU(config.hidden_size, config.moe_share_expert_intermediate_size,
                                    names=("gate_proj", "up_proj", "down_proj"))
            self.moe_weight, self.share_weight = config.moe_weight, config.share_weight

    def forward(self, hidden_states, router_state, router_cell, router_projector,
                position_embeddings=None, attention_mask=None, position_ids=None,
                cache: Cache | None = None, **kwargs):
        residual = hidden_states
        attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                     position_embeddings=position_embeddings,
                                     attention_mask=attention_mask, position_ids=position_ids,
                                     cache=cache, **kwargs)
        hidden_states = residual + attended
        normed = self.post_attention_layernorm(hidden_states)
        moe_out, router_state, router_logits = self.block_sparse_moe(
            normed, router_state, router_cell, router_projector)
        if self.mlp_share is not None:
            moe_out = self.moe_weight * moe_out + self.share_weight * self.mlp_share(normed)
        return hidden_states + moe_out, router_state, router_logits


class LlamaMoeRNNPreTrainedModel(PreTrainedModel):
    config_class = LlamaMoeRNNConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaMoeRNNDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Router weights stay float32 in a bf16/fp16 model (router math is float32 anyway).
    _keep_in_fp32_modules_strict = [
        "rnn_router", "router_projector", r"block_sparse_moe\.(weight|bias)[12]", r"block_sparse_moe\.gate"]

    def _init_weights(self, module):
        """A fresh (untrained) model: N(0, initializer_range) weights, zero biases."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, RecurrentRouterCell):
            for name, param in module.named_parameters(recurse=False):
                (init.normal_(param, mean=0.0, std=std) if name.startswith("weight")
                 else init.zeros_(param))
        elif isinstance(module, LlamaMoeRNNSparseMoeBlock):
            for name, param in module.named_parameters(recurse=False):
                (init.normal_(param, mean=0.0, std=std) if name.startswith("weight")
                 else init.zeros_(param))
        elif isinstance(module, CosineRouterHead):
            init.normal_(module.expert_embedding, mean=0.0, std=std)
            init.constant_(module.logit_scale, math.log(1.0 / 0.07))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader, made strict: a tensor the config does not explain, a parameter
        the checkpoint lacks, or a shape that disagrees with config.json is an error naming each
        tensor (never a model with re-initialised or silently dropped weights). Pass
        `ignore_mismatched_sizes=True` to re-initialise misshapen ones as transformers does."""
        want_info = kwargs.pop("output_loading_info", False)
        allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        # transformers' own mismatch error does not name the tensors: collect them instead.
        model, info = super().from_pretrained(*args, output_loading_info=True,
                                              ignore_mismatched_sizes=True, **kwargs)
        problems = [f"{name}: missing from the checkpoint" for name in sorted(info["missing_keys"])]
        problems += [f"{name}: in the checkpoint, but this config's model has no such parameter"
                     for name in sorted(info["unexpected_keys"])]
        if not allow_mismatch:
            problems += [f"{name}: shape {list(got)} in the checkpoint, config.json gives {list(want)}"
                         for name, got, want in sorted(info["mismatched_keys"])]
        if problems:
            raise ValueError(f"{cls.__name__}: the checkpoint does not match its config.json "
                             "(an edited file?):\n  " + "\n  ".join(problems))
        return (model, info) if want_info else model


class LlamaMoeRNNModel(LlamaMoeRNNPreTrainedModel):
    """The decoder stack; it owns the shared router cell (and the S-proj projector)."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # loading the stack from a causal LM

    def __init__(self, config: LlamaMoeRNNConfig):
        super().__init__(config)
        p = config.moe_router_rnn_hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaMoeRNNDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.rnn_router = RecurrentRouterCell(config.moe_router_type, p)
        self.router_projector = None
        if config.rmoe_shared_projector:
            self.router_projector = nn.Linear(config.hidden_size, p, bias=config.rmoe_projector_bias)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                cache: Cache | None = None, inputs_embeds=None, use_cache: bool | None = None,
                output_router_logits: bool | None = None, **kwargs) -> MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
                            + past).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                  attention_mask=attention_mask, cache=cache,
                                  position_ids=position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)

        hidden_states, router_state, all_router_logits = inputs_embeds, None, []
        for layer in self.layers:  # the router state goes from each layer to the next
            hidden_states, router_state, router_logits = layer(
                hidden_states, router_state, self.rnn_router, self.router_projector,
                position_embeddings=position_embeddings, attention_mask=mask,
                position_ids=position_ids, cache=cache, **kwargs)
            all_router_logits.append(router_logits)
        return MoeModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states), cache=cache,
            router_logits=tuple(all_router_logits) if output_router_logits else None)


class LlamaMoeRNNForCausalLM(LlamaMoeRNNPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaMoeRNNConfig):
        super().__init__(config)
        self.model = LlamaMoeRNNModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                cache: Cache | None = None, inputs_embeds=None, labels=None,
                use_cache: bool | None = None, output_router_logits: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> MoeCausalLMOutputWithPast:
        """Causal LM forward. With `labels`, the loss is the next-token cross entropy plus,
        with `output_router_logits`, router_aux_loss_coef times Mixtral's load-balancing loss
        (that of the authors' transformers port; rmoe_jax's own balance loss differs)."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_router_logits=output_router_logits,
                             **kwargs)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))

        loss = aux_loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        if output_router_logits:
            aux_loss = load_balancing_loss_func(outputs.router_logits, self.config.num_local_experts,
                                                self.config.num_experts_per_tok, attention_mask)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits,
                                         cache=outputs.cache, router_logits=outputs.router_logits)


__all__ = ["LlamaMoeRNNForCausalLM", "LlamaMoeRNNModel", "LlamaMoeRNNPreTrainedModel"]
