"""Every router of the paper's section 2, one small module each, selected by name.

One interface for all: `router(x, router_state, shared) -> (logits, new_router_state)` with
  x            `[tokens, d_model]`  the MoE block's input (post-attention RMSNorm output)
  router_state `[tokens, state]`    carried across layers (width 0 for stateless routers)
  shared       dict of parameters shared by all layers (the RMoE cell, an S-proj projector);
               created outside the layer scan by `SharedRouterParams`, empty otherwise
  logits       `[tokens, num_experts]` float32
Stateless routers return the state untouched, so one decoder layer serves every router.
Router math runs in float32 whatever the model's compute dtype. The `model.router.init` choice
is the modules' `init_scheme` field: a field named `init` would hide flax's `Module.init`, and
a router could not be initialised on its own (as `aot --steps parts` does).

Their facts (axes, weight decay, frozen, export names) are in `rmoe_jax.param_table`; params named
`frozen_*` are the ones it marks frozen (never updated by the optimizer).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.ad_checkpoint import checkpoint_name

from rmoe_jax.model import recurrent

FROZEN_PREFIX = "frozen"
# The recurrent router's cell input x' and new state h, which every remat policy keeps (why:
# `transformer.REMAT_POLICIES`).
ROUTER_RESIDUALS = ("router_cell_input", "router_state")
MAX_LOGIT_SCALE = math.log(100.0)  # cap the learnable inverse temperature, as CLIP does


def _torch_uniform(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dense(features: int, use_bias: bool, init: str, init_std: float, fan_in: int, name: str):
    """A float32 Dense with the router init: N(0, std) or PyTorch's default U(+-1/sqrt(fan_in))."""
    if init == "torch":
        kernel_init = bias_init = _torch_uniform(fan_in)
    else:
        kernel_init, bias_init = nn.initializers.normal(init_std), nn.initializers.zeros
    return nn.Dense(features, use_bias=use_bias, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=kernel_init, bias_init=bias_init, name=name)


class LinearRouter(nn.Module):
    """SMoE: logits = x W (+ b)."""

    num_experts: int
    use_bias: bool = False
    init_scheme: str = "normal"
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x, router_state, shared):
        gate = dense(self.num_experts, self.use_bias, self.init_scheme, self.init_std, x.shape[-1],
                     "gate")
        return gate(x.astype(jnp.float32)), router_state


class MLPRouter(nn.Module):
    """SMoE-MLP: a two-layer GELU MLP d -> hidden -> E."""

    num_experts: int
    hidden: int = 256
    use_bias: bool = False
    init_scheme: str = "normal"
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x, router_state, shared):
        x = x.astype(jnp.float32)
        h = dense(self.hidden, True, self.init_scheme, self.init_std, x.shape[-1], "hidden")(x)
        h = nn.gelu(h, approximate=False)
        out = dense(self.num_experts, self.use_bias, self.init_scheme, self.init_std, self.hidden,
                    "gate")
        return out(h), router_state


class RandomRouter(nn.Module):
    """RandomSMoE: a random linear router that is never trained (its kernel is `frozen`)."""

    num_experts: int
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x, router_state, shared):
        kernel = self.param(f"{FROZEN_PREFIX}_kernel", nn.initializers.normal(self.init_std),
                            (x.shape[-1], self.num_experts))
        return x.astype(jnp.float32) @ kernel, router_state


class CosineHead(nn.Module):
    """Cosine similarity of (optionally down-projected) tokens with learnable expert embeddings.

    CosineMoE: project_dim = 0 (compare in the input space). XMoE: project_dim = q.
    logits = cos(z, e_j) * exp(logit_scale), logit_scale = log(1 / temperature), learnable.
    """

    num_experts: int
    project_dim: int = 0
    temperature_init: float = 0.07
    init_scheme: str = "normal"
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32)
        if self.project_dim:
            down = dense(self.project_dim, False, self.init_scheme, self.init_std, x.shape[-1],
                         "down")
            x = down(x)
        embed_init = nn.initializers.normal(self.init_std)
        experts = self.param("expert_embedding", embed_init, (self.num_experts, x.shape[-1]))
        logit_scale = self.param("logit_scale", nn.initializers.constant(
            math.log(1.0 / self.temperature_init)), ())
        cosine = _l2_normalize(x) @ _l2_normalize(experts).T
        return cosine * jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class CosineRouter(nn.Module):
    """CosineMoE (project_dim = 0) and XMoE (project_dim = q) as routers."""

    num_experts: int
    project_dim: int = 0
    temperature_init: float = 0.07
    init_scheme: str = "normal"
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x, router_state, shared):
        head = CosineHead(self.num_experts, self.project_dim, self.temperature_init,
                          self.init_scheme, self.init_std, name="head")
        return head(x), router_state


class HyperRouter(nn.Module):
    """HyperRouter: a frozen random hypernetwork turns a learnable embedding into W [d, E]."""

    num_experts: int
    embed_dim: int = 32
    hidden: int = 256
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x, router_state, shared):
        d_model = x.shape[-1]
        embedding = self.param("embedding", nn.initializers.normal(1.0), (self.embed_dim,))
        hyper_in = self.param(f"{FROZEN_PREFIX}_hyper_in",
                              nn.initializers.normal(1.0 / math.sqrt(self.embed_dim)),
                              (self.embed_dim, self.hidden))
        # Scaled so the generated router kernel starts with std ~ init_std.
        hyper_out = self.param(f"{FROZEN_PREFIX}_hyper_out",
                               nn.initializers.normal(self.init_std * math.sqrt(2.0 / self.hidden)),
                               (self.hidden, d_model * self.num_experts))
        kernel = (jax.nn.relu(embedding @ hyper_in) @ hyper_out).reshape(d_model, self.num_experts)
        return x.astype(jnp.float32) @ kernel, router_state


class SharedRouterParams(nn.Module):
    """Parameters every layer's recurrent router shares; created once, outside the layer scan.

    Returns {'cell': ..., 'projector': {'kernel', ['bias']}} (projector only with S-proj).
    """

    config: ml_collections.ConfigDict  # the router sub-config
    d_model: int
    init_std: float = 0.02

    @nn.compact
    def __call__(self) -> dict:
        cfg = self.config
        shared = {"cell": recurrent.CellParams(cfg.cell, cfg.hidden_size, cfg.hidden_size,
                                               cfg.init, self.init_std, name="cell")()}
        if cfg.shared_projector:
            init = (_torch_uniform(self.d_model) if cfg.init == "torch"
                    else nn.initializers.normal(self.init_std))
            projector = {"kernel": self.param("projector_kernel", init,
                                              (self.d_model, cfg.hidden_size))}
            if cfg.projector_bias:
                bias_init = _torch_uniform(self.d_model) if cfg.init == "torch" else nn.initializers.zeros
                projector["bias"] = self.param("projector_bias", bias_init, (cfg.hidden_size,))
            shared["projector"] = projector
        return shared


class RecurrentRouter(nn.Module):
    """RMoE (the paper, section 1) and its ablations.

    x'_i = Proj_i(x_i); h_i = Cell(x'_i, h_{i-1}); logits_i = head_i(h_i) [+ alpha head_i(h_{i-1})].
    The carried state is h_i (h and c for the LSTM), the same state used for routing.
    """

    config: ml_collections.ConfigDict  # the router sub-config
    num_experts: int
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x, router_state, shared):
        cfg = self.config
        x = x.astype(jnp.float32)
        if cfg.shared_projector:
            projected = x @ shared["projector"]["kernel"]
            if "bias" in shared["projector"]:
                projected = projected + shared["projector"]["bias"]
        else:
            projected = dense(cfg.hidden_size, cfg.projector_bias, cfg.init, self.init_std,
                              x.shape[-1], "projector")(x)
        projected = checkpoint_name(projected, ROUTER_RESIDUALS[0])
        previous = router_state
        if cfg.detach:
            previous = jax.lax.stop_gradient(previous)
        cell_input_state = jnp.zeros_like(previous) if cfg.no_recurrence else previous
        state = recurrent.router_step(cfg.cell)(shared["cell"], projected, cell_input_state)
        state = checkpoint_name(state, ROUTER_RESIDUALS[1])

        head = self._head()
        logits = head(recurrent.output_of(cfg.cell, state))
        if cfg.residual_alpha:
            residual = head(recurrent.output_of(cfg.cell, router_state))
            if cfg.residual_detach:
                residual = jax.lax.stop_gradient(residual)
            logits = logits + cfg.residual_alpha * residual
        return logits, state

    def _head(self):
        cfg = self.config
        if cfg.head == "linear":
            return dense(self.num_experts, cfg.bias, cfg.init, self.init_std, cfg.hidden_size, "gate")
        project_dim = cfg.xmoe_dim if cfg.head == "xmoe" else 0
        return CosineHead(self.num_experts, project_dim, cfg.temperature_init, cfg.init,
                          self.init_std, name="gate")


def router_state_size(router: ml_collections.ConfigDict) -> int:
    """Width of the state the router carries across layers (0 for stateless routers)."""
    if router.name != "recurrent":
        return 0
    return recurrent.state_size(router.cell, router.hidden_size)


def build_router(router: ml_collections.ConfigDict, num_experts: int, init_std: float,
                 name: str = "router") -> nn.Module:
    """The router module named by `router.name`."""
    common = dict(num_experts=num_experts, init_std=init_std, name=name)
    if router.name == "linear":
        return LinearRouter(use_bias=router.bias, init_scheme=router.init, **common)
    if router.name == "mlp":
        return MLPRouter(hidden=router.mlp_hidden, use_bias=router.bias, init_scheme=router.init,
                         **common)
    if router.name == "random":
        return RandomRouter(**common)
    if router.name in ("cosine", "xmoe"):
        project_dim = router.xmoe_dim if router.name == "xmoe" else 0
        return CosineRouter(project_dim=project_dim, temperature_init=router.temperature_init,
                            init_scheme=router.init, **common)
    if router.name == "hyper":
        return HyperRouter(embed_dim=router.hyper_embed_dim, hidden=router.hyper_hidden, **common)
    if router.name == "recurrent":
        return RecurrentRouter(config=router, **common)
    raise ValueError(f"model.router.name: unknown router {router.name!r}")
