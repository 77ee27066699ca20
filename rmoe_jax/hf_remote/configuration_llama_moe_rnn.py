"""Configuration of RMoE, the Layerwise Recurrent Router for Mixture-of-Experts (arXiv 2408.06793).

Written by rmoe_jax into every RMoE export, for transformers 5; imports only transformers.
Load it with `AutoConfig.from_pretrained(folder, trust_remote_code=True)`.

The field names are those of the RMoE authors' `LlamaMoeRNNConfig` (model_type
`llama_moe_rnn`), so their code can read an export's config.json too:

    moe_router_type             recurrent cell shared by all layers: "gru" or "rnn" (tanh);
                                "lstm" is an rmoe_jax extension
    moe_router_rnn_hidden_size  p: the cell's width (each layer projects d -> p first)
    moe_expert_intermediate_size, moe_num_layers, add_moe_bias,
    add_moe_share_expert, moe_share_expert_intermediate_size, share_weight, moe_weight
                                (layer output = moe_weight * routed + share_weight * shared)

The model options rmoe_jax adds on top of the authors' RMoE carry an `rmoe_` prefix:

    rmoe_router_bias        bias on each layer's router head (tensor `bias2`)
    rmoe_projector_bias     bias on the projector (`bias1`, or `model.router_projector.bias`)
    rmoe_shared_projector   S-proj: one projector d -> p shared by all layers
    rmoe_no_recurrence      RMoE-NP: every layer's cell starts from h = 0 (no state passed on)
    rmoe_detach             h_{i-1} enters the cell without gradient (changes training only)
    rmoe_residual_alpha     logits_i += alpha * head_i(h_{i-1})
    rmoe_residual_detach    ... with that residual term cut from the gradient
    rmoe_router_head        "linear" (weight2), "cosine" or "xmoe" (cosine-similarity heads)
    rmoe_xmoe_dim           down-projection width of the "xmoe" head
    rmoe_renormalize        renormalise the top-k gate weights to sum to 1
"""

from transformers.configuration_utils import PreTrainedConfig

ROUTER_CELLS = ("gru", "rnn", "lstm")
ROUTER_HEADS = ("linear", "cosine", "xmoe")


class LlamaMoeRNNConfig(PreTrainedConfig):
    """A Llama decoder whose FFNs are top-k MoE blocks routed by one shared recurrent cell."""

    model_type = "llama_moe_rnn"
    attribute_map = {"num_experts": "num_local_experts"}

    # The Llama backbone.
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pretraining_tp: int | None = 1
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    mlp_bias: bool = False

    # Mixture of experts (the authors' names).
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    moe_num_layers: int | None = None  # None: every layer
    moe_expert_intermediate_size: int | None = None  # None: intermediate_size
    add_moe_bias: bool = False
    add_moe_share_expert: bool = False
    moe_share_expert_intermediate_size: int | None = None  # None: moe_expert_intermediate_size
    share_weight: float = 0.5
    moe_weight: float = 0.5
    router_aux_loss_coef: float = 0.01
    output_router_logits: bool = False

    # The recurrent router (the authors' names).
    moe_router_type: str = "gru"
    moe_router_rnn_hidden_size: int = 128

    # rmoe_jax extensions (see the module docstring).
    rmoe_router_bias: bool = False
    rmoe_projector_bias: bool = False
    rmoe_shared_projector: bool = False
    rmoe_no_recurrence: bool = False
    rmoe_detach: bool = False
    rmoe_residual_alpha: float = 0.0
    rmoe_residual_detach: bool = False
    rmoe_router_head: str = "linear"
    rmoe_xmoe_dim: int | None = None
    rmoe_renormalize: bool = True

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_num_layers is None:
            self.moe_num_layers = self.num_hidden_layers
        if self.moe_expert_intermediate_size is None:
            self.moe_expert_intermediate_size = self.intermediate_size
        if self.moe_share_expert_intermediate_size is None:
            self.moe_share_expert_intermediate_size = self.moe_expert_intermediate_size
        super().__post_init__(**kwargs)
        problems = self.problems()
        if problems:
            raise ValueError("LlamaMoeRNNConfig cannot build this model:\n  " + "\n  ".join(problems))

    def problems(self) -> list[str]:
        """Every field this modeling code cannot honour, with why (empty: all good)."""
        out = []

        def check(ok, field, why):
            if not ok:
                out.append(f"{field}={getattr(self, field)!r}: {why}")

        check(self.moe_router_type in ROUTER_CELLS, "moe_router_type", f"not one of {ROUTER_CELLS}")
        check(self.rmoe_router_head in ROUTER_HEADS, "rmoe_router_head", f"not one of {ROUTER_HEADS}")
        check(self.rmoe_router_head != "xmoe" or (self.rmoe_xmoe_dim or 0) > 0, "rmoe_xmoe_dim",
              "the xmoe head needs a positive down-projection width")
        check(self.moe_router_rnn_hidden_size > 0, "moe_router_rnn_hidden_size", "must be > 0")
        check(self.moe_num_layers == self.num_hidden_layers, "moe_num_layers",
              "dense (non-MoE) layers are not supported: every layer must be an MoE layer")
        check(not self.add_moe_bias, "add_moe_bias", "an output bias on the MoE block is not supported")
        check(self.hidden_act == "silu", "hidden_act", "the experts are SwiGLU (silu)")
        check(0 < self.num_experts_per_tok <= self.num_local_experts, "num_experts_per_tok",
              f"must be in [1, num_local_experts={self.num_local_experts}]")
        check(self.rmoe_residual_alpha >= 0, "rmoe_residual_alpha", "must be >= 0")
        return out


__all__ = ["LlamaMoeRNNConfig"]
