"""The paper's routing analyses (the paper, section 6) over router outputs recorded in an eval pass.

Array conventions: L layers, N tokens, E experts, k experts chosen per token. Recorded router
probabilities are the full softmax `probs [L, N, E]` the model sows as
`intermediates['layers']['moe']['router_probs']`; tokens are in (sequence, position) order, so
`N = num_sequences * seq_len` and a sequence is one capacity group.

Pure functions (NumPy; no model needed):
  bin_probabilities(probs, bins)          probabilities -> integer bin labels (100 fixed bins on [0, 1])
  token_mutual_information(a, b)          per-token MI of two label vectors over the E entries
  mutual_information_matrix(probs)        [L, L] cross-layer MI, averaged over tokens
  gate_entropy(probs)                     [L] mean of -sum g ln g
  inner_balance(probs)                    [L] median over tokens of top-1 / top-2 probability
  outer_balance(probs, k)                 [L] mean over tokens of the sum of the top-k probabilities
  expert_load(probs, k)                   [L, E] fraction of the N*k routing slots per expert
  capacity_drop_ratio(probs, k, seq_len, capacity_factor)   [L] share of slots dropped by
                                          capacity dispatch (the model's slot-major order)
  expert_similarity(moe_params)           [L] mean of the E x E Gram matrix of expert signatures
  summarize_routing(probs, k, ...)        all of the above routing numbers in one JSON-able dict

Model-level (JAX):
  record_routing(model, params, batches)  run the model, collect router probs and losses
  router_grad_norms(model, params, batch) router gradient norm of the LM loss vs the balance loss
  load_trained(workdir)                   config, model and params of a run's latest checkpoint
  analyze_workdir(workdir, ...)           everything above for one run; writes JSON + PNG plots

Definitions (the paper, section 6):
- Mutual information: for one token and two layers, each layer's E probabilities are binned
  into 100 equal-width bins on [0, 1]; the two label vectors (E entries each) are treated as
  E paired samples and their MI computed exactly as sklearn's `mutual_info_score` does
  (natural log); the result is averaged over tokens. The diagonal is the per-layer entropy of
  the binned labels, the largest value any off-diagonal entry of that row can reach.
- Expert similarity: per expert, each weight matrix (w1, w3: [d, f]; w2: [f, d]) is averaged
  over the FFN dimension f to a d-vector, each vector L2-normalised, the vectors concatenated;
  the similarity of a layer is the mean of the full E x E Gram matrix, diagonal included. We
  divide the Gram matrix by the number of concatenated matrices (3) so that a single expert's
  self-similarity is 1 and the value is a mean cosine in [-1, 1] (the paper's unscaled value is
  3x ours).
- Router gradient norm: global L2 norm over every router parameter
  (`params['layers']['moe']['router']` and `params['router_shared']`, frozen ones excluded) of
  the gradient of the LM (cross-entropy) loss alone and of the balance loss alone, the latter
  with its coefficient, i.e. the part that enters the training loss.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping

import numpy as np

DEFAULT_BINS = 100
ANALYSIS_DIR = "analysis"


# -- pure NumPy analyses --------------------------------------------------------------------------

def bin_probabilities(probs: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Integer labels 0..bins-1 of probabilities in `bins` equal-width bins on [0, 1] (1.0 goes in
    the last bin), as `np.digitize(p, np.linspace(0, 1, bins + 1)[1:-1])` would give."""
    probs = np.asarray(probs, np.float64)
    return np.clip(np.floor(probs * bins), 0, bins - 1).astype(np.int32)


def _equal_counts(labels: np.ndarray) -> np.ndarray:
    """`eq[..., e, e'] = labels[..., e] == labels[..., e']` for labels `[..., E]`."""
    return labels[..., :, None] == labels[..., None, :]


def token_mutual_information(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MI (nats) between label vectors `a` and `b` `[..., E]`, one value per leading index.

    The E entries are E paired samples (x_e, y_e). With c_x(e) the number of entries sharing
    a's label of e, c_y(e) the same for b and c_xy(e) those sharing both,
    MI = sum_cells c_xy/E ln(E c_xy / (c_x c_y)) = mean_e ln(E c_xy(e) / (c_x(e) c_y(e))).
    """
    a, b = np.asarray(a), np.asarray(b)
    num = a.shape[-1]
    eq_a, eq_b = _equal_counts(a), _equal_counts(b)
    c_a = eq_a.sum(-1)
    c_b = eq_b.sum(-1)
    c_ab = (eq_a & eq_b).sum(-1)
    mi = np.mean(np.log(num * c_ab / (c_a * c_b).astype(np.float64)), axis=-1)
    return np.maximum(mi, 0.0)  # exact zeros can come out as -1e-16


def mutual_information_matrix(probs: np.ndarray, bins: int = DEFAULT_BINS,
                              chunk: int = 2048) -> np.ndarray:
    """Cross-layer MI of routing distributions `[L, N, E]` -> symmetric `[L, L]` (mean over tokens)."""
    probs = np.asarray(probs)
    num_layers, num_tokens, num = probs.shape
    labels = bin_probabilities(probs, bins)
    total = np.zeros((num_layers, num_layers), np.float64)
    for start in range(0, num_tokens, chunk):
        lab = labels[:, start:start + chunk]  # [L, n, E]
        eq = _equal_counts(lab)  # [L, n, E, E] bool
        counts = eq.sum(-1).astype(np.float64)  # [L, n, E]
        log_c = np.log(counts)
        for i in range(num_layers):
            for j in range(i, num_layers):
                c_ij = (eq[i] & eq[j]).sum(-1)
                mi = np.mean(np.log(num * c_ij) - log_c[i] - log_c[j], axis=-1)
                total[i, j] += np.sum(np.maximum(mi, 0.0))
    total /= num_tokens
    return np.triu(total) + np.triu(total, 1).T


def gate_entropy(probs: np.ndarray) -> np.ndarray:
    """Mean over tokens of -sum_e g ln g, per layer: `[L, N, E]` -> `[L]` (ln E when uniform)."""
    p = np.asarray(probs, np.float64)
    return np.mean(-np.sum(p * np.log(np.maximum(p, 1e-30)), axis=-1), axis=-1)


def _sorted_desc(probs: np.ndarray) -> np.ndarray:
    return -np.sort(-np.asarray(probs, np.float64), axis=-1)


def inner_balance(probs: np.ndarray) -> np.ndarray:
    """Median over tokens of top-1 / top-2 probability, per layer (1 = the two tie)."""
    s = _sorted_desc(probs)
    return np.median(s[..., 0] / np.maximum(s[..., 1], 1e-30), axis=-1)


def outer_balance(probs: np.ndarray, top_k: int) -> np.ndarray:
    """Mean over tokens of the sum of the top-k probabilities (before renormalisation), per layer."""
    return np.mean(np.sum(_sorted_desc(probs)[..., :top_k], axis=-1), axis=-1)


def top_k_indices(probs: np.ndarray, top_k: int) -> np.ndarray:
    """Indices of the k largest probabilities, largest first `[..., k]` (ties: lower index first,
    as `jax.lax.top_k`)."""
    probs = np.asarray(probs)
    return np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]


def expert_load(probs: np.ndarray, top_k: int) -> np.ndarray:
    """Fraction of the N*k top-k routing slots that go to each expert: `[L, N, E]` -> `[L, E]`."""
    probs = np.asarray(probs)
    num = probs.shape[-1]
    idx = top_k_indices(probs, top_k)  # [L, N, k]
    load = np.stack([np.bincount(layer.reshape(-1), minlength=num) for layer in idx])
    return load / float(idx.shape[1] * idx.shape[2])


def capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert per group, as `rmoe_jax.model.moe.expert_capacity`."""
    return max(1, math.ceil(top_k * group_size * capacity_factor / num_experts))


def capacity_drop_ratio(probs: np.ndarray, top_k: int, seq_len: int, capacity_factor: float) -> np.ndarray:
    """Share of the top-k routing slots that capacity dispatch drops, per layer.

    Each sequence of `seq_len` tokens is a group with `capacity(seq_len, E, k, cf)` slots per
    expert, filled slot-major (every token's 1st choice, in token order, then every 2nd choice,
    ...), as `rmoe_jax.model.moe.capacity_dispatch` does. `probs [L, N, E]`, N a multiple of
    seq_len. Returns `[L]`.
    """
    probs = np.asarray(probs)
    num_layers, num_tokens, num = probs.shape
    if num_tokens % seq_len:
        raise ValueError(f"{num_tokens} tokens are not a whole number of sequences of {seq_len}")
    cap = capacity(seq_len, num, top_k, capacity_factor)
    idx = top_k_indices(probs, top_k).reshape(num_layers, -1, seq_len, top_k)  # [L, G, S, k]
    slot_major = np.swapaxes(idx, 2, 3).reshape(num_layers, idx.shape[1], -1)  # [L, G, k*S]
    one_hot = slot_major[..., None] == np.arange(num)  # [L, G, k*S, E]
    position = np.cumsum(one_hot, axis=2) - 1
    position = np.take_along_axis(position, slot_major[..., None], axis=-1)[..., 0]
    return np.mean(position >= cap, axis=(1, 2))


def expert_signatures(w1: np.ndarray, w3: np.ndarray | None, w2: np.ndarray | None) -> np.ndarray:
    """Per expert: each matrix averaged over the FFN dimension, L2-normalised, concatenated.

    w1, w3 `[..., E, d, f]`, w2 `[..., E, f, d]` (any may be None except w1) -> `[..., E, m*d]`.
    """
    parts = [np.mean(np.asarray(w1, np.float64), axis=-1)]
    if w3 is not None:
        parts.append(np.mean(np.asarray(w3, np.float64), axis=-1))
    if w2 is not None:
        parts.append(np.mean(np.asarray(w2, np.float64), axis=-2))
    parts = [v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-30) for v in parts]
    return np.concatenate(parts, axis=-1)


def expert_gram(w1, w3=None, w2=None) -> np.ndarray:
    """E x E Gram matrix of expert signatures, divided by the number of matrices (diag = 1)."""
    sig = expert_signatures(w1, w3, w2)
    matrices = 1 + (w3 is not None) + (w2 is not None)
    return np.einsum("...ad,...bd->...ab", sig, sig) / matrices


def expert_similarity(moe_params: Mapping[str, Any]) -> np.ndarray:
    """Mean of the full E x E Gram matrix (diagonal included) per layer, from the stacked expert
    params `{'w1': [L, E, d, f], 'w3': ..., 'w2': [L, E, f, d]}` -> `[L]`."""
    gram = expert_gram(moe_params["w1"], moe_params.get("w3"), moe_params.get("w2"))
    return np.mean(gram, axis=(-2, -1))


def summarize_routing(probs: np.ndarray, top_k: int, *, seq_len: int | None = None,
                      capacity_factor: float | None = None, bins: int = DEFAULT_BINS) -> dict:
    """Every routing analysis of `probs [L, N, E]` as a JSON-able dict (lists, floats)."""
    probs = np.asarray(probs, np.float32)
    num_layers, num_tokens, num = probs.shape
    mi = mutual_information_matrix(probs, bins)
    off = ~np.eye(num_layers, dtype=bool)
    adjacent = [mi[i, i + 1] for i in range(num_layers - 1)]
    entropy = gate_entropy(probs)
    ib, ob = inner_balance(probs), outer_balance(probs, top_k)
    load = expert_load(probs, top_k)
    out = {
        "num_layers": num_layers,
        "num_tokens": num_tokens,
        "num_experts": num,
        "top_k": top_k,
        "mutual_information": {
            "matrix": mi.tolist(),
            "mean_offdiagonal": float(mi[off].mean()) if num_layers > 1 else float("nan"),
            "mean_adjacent": float(np.mean(adjacent)) if adjacent else float("nan"),
            "bins": bins,
        },
        "gate_entropy": {"per_layer": entropy.tolist(), "mean": float(entropy.mean()),
                         "max": math.log(num)},
        "inner_balance": {"per_layer": ib.tolist(), "mean": float(ib.mean())},
        "outer_balance": {"per_layer": ob.tolist(), "mean": float(ob.mean())},
        "expert_load": {
            "per_layer": load.tolist(),
            # max load x E: 1 = perfectly balanced, E = everything on one expert
            "max_over_uniform": (load.max(-1) * num).tolist(),
            "cv": (load.std(-1) / np.maximum(load.mean(-1), 1e-30)).tolist(),
        },
    }
    if seq_len is not None and capacity_factor is not None:
        drop = capacity_drop_ratio(probs, top_k, seq_len, capacity_factor)
        out["drop_ratio"] = {"per_layer": drop.tolist(), "mean": float(drop.mean()),
                             "capacity_factor": capacity_factor}
    return out


# -- model-level analyses (JAX) -------------------------------------------------------------------

def _intermediate(intermediates: Mapping, name: str):
    return intermediates["layers"]["moe"][name][0]


def record_routing(model, params, batches: Iterable[Mapping[str, np.ndarray]], *,
                   max_tokens: int = 0) -> dict:
    """Run `model` (deterministic) over `batches`; collect router probs and the eval losses.

    Returns {'probs': [L, N, E] float32 (only weight-1 rows' tokens of whole sequences kept, so
    N stays a multiple of seq_len), 'ce_sum', 'weight_sum', 'balance_loss' (mean over batches),
    'stats' (the model's per-layer stats, averaged over batches)}. `max_tokens` > 0 stops once
    that many tokens are recorded.
    """
    import jax
    import jax.numpy as jnp
    import optax

    @jax.jit
    def forward(params, inputs, targets, weights):
        (logits, aux), state = model.apply({"params": params}, inputs, deterministic=True,
                                           mutable=["intermediates"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        probs = _intermediate(state["intermediates"], "router_probs")
        return probs, jnp.sum(ce * weights), jnp.sum(weights), aux["balance_loss"], aux["stats"]

    chunks, ce_sum, weight_sum, balance, stats, count, tokens = [], 0.0, 0.0, 0.0, None, 0, 0
    for batch in batches:
        inputs = np.asarray(batch["inputs"])
        weights = np.asarray(batch.get("weights", np.ones(inputs.shape, np.float32)), np.float32)
        probs, ce, w, bal, st = jax.device_get(forward(params, inputs, np.asarray(batch["targets"]),
                                                       weights))
        rows = np.all(weights > 0, axis=1)  # whole real sequences only
        batch_size, seq = inputs.shape
        probs = probs.reshape(probs.shape[0], batch_size, seq, -1)[:, rows]
        chunks.append(probs.reshape(probs.shape[0], -1, probs.shape[-1]))
        ce_sum += float(ce)
        weight_sum += float(w)
        balance += float(bal)
        stats = st if stats is None else jax.tree.map(np.add, stats, st)
        count += 1
        tokens += chunks[-1].shape[1]
        if max_tokens and tokens >= max_tokens:
            break
    if not count:
        raise ValueError("record_routing: no batches")
    return {
        "probs": np.concatenate(chunks, axis=1).astype(np.float32),
        "ce_sum": ce_sum,
        "weight_sum": weight_sum,
        "balance_loss": balance / count,
        "stats": jax.tree.map(lambda x: np.asarray(x) / count, stats),
    }


def trainable_router_leaves(grads: Mapping) -> dict[str, Any]:
    """The leaves of a params-shaped tree (e.g. gradients) at the router's trainable params, as
    `rmoe_jax.param_table` marks them (group 'router', not frozen), by '/'-joined path."""
    import jax

    from rmoe_jax import param_table

    return {name: leaf for name, leaf in
            ((param_table.path_string(path), leaf)
             for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0])
            if param_table.lookup(name).group == "router" and not param_table.lookup(name).frozen}


def _global_norm(leaves) -> float:
    return float(math.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in leaves)))


def _per_layer_norm(leaves: Mapping[str, Any]) -> list[float]:
    """Norm per layer over the stacked (per-layer) leaves; [] when there are none."""
    stacked = [x for name, x in leaves.items() if name.startswith("layers/")]
    if not stacked:
        return []
    sq = sum(np.sum(np.square(np.asarray(x, np.float64)).reshape(x.shape[0], -1), axis=1) for x in stacked)
    return np.sqrt(sq).tolist()


def router_grad_norms(model, params, batch: Mapping[str, np.ndarray], *, balance_coef: float) -> dict:
    """Norms of d(LM loss)/d(router) and d(balance_coef * balance loss)/d(router).

    Deterministic forward (no dropout) on one batch. Returns {'lm', 'balance', 'ratio'
    (balance / lm), 'lm_per_layer', 'balance_per_layer' (per-layer router params only)}.
    """
    import jax
    import jax.numpy as jnp
    import optax

    def both(p, coef, batch):
        def losses(q):
            logits, aux = model.apply({"params": q}, batch["inputs"], deterministic=True)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            weights = jnp.asarray(batch["weights"], jnp.float32)
            lm = jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
            return lm, coef * jnp.asarray(aux["balance_loss"], jnp.float32)

        # one forward, two backward passes (one compile)
        _, vjp = jax.vjp(losses, p)
        one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
        return (trainable_router_leaves(vjp((one, zero))[0]),
                trainable_router_leaves(vjp((zero, one))[0]))

    batch = {k: np.asarray(batch[k]) for k in ("inputs", "targets", "weights")}
    r_lm, r_bal = jax.device_get(jax.jit(both)(params, jnp.float32(balance_coef), batch))
    lm, bal = _global_norm(list(r_lm.values())), _global_norm(list(r_bal.values()))
    return {
        "lm": lm,
        "balance": bal,
        "ratio": bal / lm if lm > 0 else float("nan"),
        "lm_per_layer": _per_layer_norm(r_lm),
        "balance_per_layer": _per_layer_norm(r_bal),
        "balance_coef": balance_coef,
    }


# -- loading a trained run ------------------------------------------------------------------------

def load_trained(workdir: str, step: int | None = None):
    """(config, model, params, step) of a training workdir's checkpoint (latest by default).

    Params only (no optimizer state), read-only (safe on a run still training), through
    `rmoe_jax.checkpoint.load_workdir`.
    """
    import jax

    from rmoe_jax.checkpoint import load_workdir
    from rmoe_jax.model import build_model

    loaded = load_workdir(workdir, step)
    params = jax.tree.map(jax.numpy.asarray, loaded.params)
    return loaded.config, build_model(loaded.config.model), params, loaded.step


def eval_batches(config, split: str, batches: int, batch_size: int = 0):
    """Deterministic eval batches (the first `batches` of `split`; 0 = the whole split)."""
    from rmoe_jax import data as data_lib

    from rmoe_jax.config import eval_batch_size

    size = batch_size or eval_batch_size(config.train)
    return data_lib.make_eval_batches(config.data, split=split, batch_size=int(size),
                                      max_batches=int(batches))


# -- plots ----------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_expert_load(load: np.ndarray, path: str, title: str = "") -> None:
    """Heatmap layer x expert of the routing-slot fraction, relative to uniform (1/E)."""
    plt = _pyplot()
    load = np.asarray(load)
    num = load.shape[1]
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * num, 1.2 + 0.35 * load.shape[0]))
    im = ax.imshow(load * num, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title or "expert load (x uniform)")
    fig.colorbar(im, ax=ax, label="load / (1/E)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mutual_information(mi: np.ndarray, path: str, title: str = "") -> None:
    plt = _pyplot()
    mi = np.asarray(mi)
    fig, ax = plt.subplots(figsize=(4.8, 4.0))
    im = ax.imshow(mi, cmap="magma", vmin=0)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title or "cross-layer mutual information (nats)")
    if mi.shape[0] <= 12:
        for i in range(mi.shape[0]):
            for j in range(mi.shape[1]):
                ax.text(j, i, f"{mi[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if mi[i, j] < 0.6 * mi.max() else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_layer(series: Mapping[str, Iterable[float]], path: str, ylabel: str, title: str = "",
                   hline: float | None = None) -> None:
    """One line per named series over layers (e.g. gate entropy of several runs)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for name, values in series.items():
        values = list(values)
        ax.plot(range(len(values)), values, marker="o", label=name)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle="--", linewidth=0.8, label="ln E (uniform)")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- one run, end to end --------------------------------------------------------------------------

def analyze_workdir(workdir: str, *, split: str = "validation", batches: int = 8, batch_size: int = 0,
                    step: int | None = None, out_dir: str | None = None, plots: bool = True,
                    grad_norms: bool = True, loaded=None) -> dict:
    """Restore a run, record routing over `batches` eval batches of `split`, analyse, write
    `<out_dir>/analysis.json` and the plots (out_dir defaults to `<workdir>/analysis`).

    `loaded`: an already loaded `(config, model, params, step)` (skips the restore).
    """
    config, model, params, step = loaded if loaded is not None else load_trained(workdir, step)
    out_dir = out_dir or os.path.join(workdir, ANALYSIS_DIR)
    os.makedirs(out_dir, exist_ok=True)
    moe = config.model.moe
    seq_len = int(config.data.seq_len)
    recorded = record_routing(model, params, eval_batches(config, split, batches, batch_size))
    capacity_factor = float(moe.capacity_factor)
    summary = summarize_routing(recorded["probs"], int(moe.top_k), seq_len=seq_len,
                                capacity_factor=capacity_factor)
    summary["drop_ratio"]["dispatch"] = moe.dispatch
    if moe.dispatch != "capacity":
        summary["drop_ratio"]["note"] = ("dispatch is dropless: nothing was dropped; the ratio is "
                                         "what capacity dispatch with this capacity_factor would drop")
    loss = recorded["ce_sum"] / max(recorded["weight_sum"], 1.0)
    summary.update({
        "workdir": os.path.abspath(workdir),
        "step": int(step),
        "split": split,
        "router": config.model.router.to_dict(),
        "loss": loss,
        "bits_per_byte": loss / math.log(2.0) if config.data.tokenizer == "byte" else None,
        "balance_loss": recorded["balance_loss"],
    })
    summary["expert_similarity"] = {}
    sim = expert_similarity({k: np.asarray(params["layers"]["moe"][k]) for k in ("w1", "w3", "w2")})
    summary["expert_similarity"] = {"per_layer": sim.tolist(), "mean": float(sim.mean())}
    if grad_norms:
        first = next(iter(eval_batches(config, split, 1, batch_size)))
        summary["router_grad_norm"] = router_grad_norms(model, params, first,
                                                        balance_coef=float(moe.balance_coef))
    with open(os.path.join(out_dir, "analysis.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    if plots:
        name = config.model.router.name
        plot_expert_load(np.asarray(summary["expert_load"]["per_layer"]),
                         os.path.join(out_dir, "expert_load.png"), f"expert load x uniform ({name})")
        plot_mutual_information(np.asarray(summary["mutual_information"]["matrix"]),
                                os.path.join(out_dir, "mutual_information.png"),
                                f"cross-layer MI ({name})")
        plot_per_layer({name: summary["gate_entropy"]["per_layer"]},
                       os.path.join(out_dir, "gate_entropy.png"), "gate entropy (nats)",
                       "gate entropy per layer", hline=math.log(int(moe.num_experts)))
    return summary


def format_summary(summary: Mapping) -> str:
    """A few human-readable lines of an `analyze_workdir` summary."""
    fmt = lambda xs: " ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    lines = [
        f"{summary.get('workdir', '')} step {summary.get('step')} on {summary.get('split')} "
        f"({summary['num_tokens']} tokens): loss {summary.get('loss', float('nan')):.4f}",
        f"  cross-layer MI: mean off-diagonal {summary['mutual_information']['mean_offdiagonal']:.3f}, "
        f"adjacent {summary['mutual_information']['mean_adjacent']:.3f}",
        f"  gate entropy per layer: {fmt(summary['gate_entropy']['per_layer'])} (ln E = "
        f"{summary['gate_entropy']['max']:.3f})",
        f"  inner balance (median top1/top2): {fmt(summary['inner_balance']['per_layer'])}",
        f"  outer balance (mean top-k sum):   {fmt(summary['outer_balance']['per_layer'])}",
        f"  max expert load x E: {fmt(summary['expert_load']['max_over_uniform'])}",
    ]
    if "drop_ratio" in summary:
        lines.append(f"  drop ratio (capacity {summary['drop_ratio']['capacity_factor']}): "
                     f"{fmt(summary['drop_ratio']['per_layer'])}")
    if "expert_similarity" in summary:
        lines.append(f"  expert similarity: {fmt(summary['expert_similarity']['per_layer'])}")
    if "router_grad_norm" in summary:
        g = summary["router_grad_norm"]
        lines.append(f"  router grad norm: LM {g['lm']:.4g}, balance {g['balance']:.4g} "
                     f"(ratio {g['ratio']:.3g})")
    return "\n".join(lines)
