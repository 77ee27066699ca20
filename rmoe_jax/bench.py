"""Train-step benchmark: variants measured side by side in one run, reported as medians and ratios.

    python -m rmoe_jax.bench --config configs/enwik8_medium.py --batch_size 4 --steps 2 \
        --repeats 5 --out BENCHMARKS.run.md

Every variant is the real training step (`make_optimizer` + `make_train_step`, `jax.jit` with
the state donated), built from `--config FILE[:row]` (plus any `--config.FIELD=VALUE` overrides,
e.g. `--config.model.num_layers=2`, applied to all of them) with one change each:

    rmoe            the config as given (the RMoE router, its dispatch, its number of experts)
    smoe            model.router.name = linear                   (RMoE / SMoE ratio)
    capacity        model.moe.dispatch = capacity                (capacity / dropless ratio)
    dropless        model.moe.dispatch = dropless
    e<N>            model.moe.num_experts = N (dropless, same top-k and tokens)
    attn_fused      model.attention_chunk = 0: one fused attention (fused / chunked ratio)
    scan_rolled     model.scan_unroll = 1: the layer scan not unrolled (rolled / as-given ratio)
    matmul          a float32 N x N jnp.dot (the machine's dense matmul peak, for MFU)
    mixtral_torch   transformers' MixtralForCausalLM of the same shape, AdamW, PyTorch CPU

Timing: after compiling every variant (compile time = lower + compile) and one warm-up step, the
harness runs `--repeats` rounds; each round times `--steps` consecutive steps of every variant in
turn (A B C A B C ...), blocking only after the last one, so noise from other processes hits all
variants alike. Reported: median seconds per step over the rounds, and ratios of medians.
`--profile DIR` then traces one more step of each JAX variant and tells where its time goes
(attention, experts, router, ..., forward and backward: `rmoe_jax/step_profile.py`).

Model FLOPs per step (analytic): tokens * (6 * N_active + 6 * L * S * d), where N_active is every
parameter a token touches (top_k of num_experts experts, attention, router, norms, LM head; not the
input embedding table, which is a lookup; the shared GRU cell of RMoE counted once per layer, as
it is applied in every layer) and 6 * L * S * d counts causal attention scores
(QK^T and AV: 4 * S * d forward per token and layer, halved by the causal mask, x3 for the
backward). MFU = model FLOPs per step / step time / measured matmul FLOP/s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import resource
import re
import statistics
import sys
import time
import types
from typing import Callable

import numpy as np


# ----------------------------------------------------------------------------------------------
# Configs

def variant_config(base, *, row: str | None = None, dispatch: str | None = None,
                   num_experts: int | None = None, batch_size: int, seq_len: int,
                   capacity_factor: float | None = None):
    config = base.copy_and_resolve_references() if hasattr(base, "copy_and_resolve_references") else base
    config = json_roundtrip(config)
    config.data.seq_len = seq_len
    config.model.max_seq_len = max(int(config.model.max_seq_len), seq_len)
    config.train.batch_size = batch_size
    config.train.grad_accum_steps = 1
    if row is not None:  # a paper row of the one registry (rmoe_jax/router_rows.py)
        from rmoe_jax.router_rows import apply_row

        apply_row(config, row)
    if dispatch is not None:
        config.model.moe.dispatch = dispatch
    if capacity_factor is not None:
        config.model.moe.capacity_factor = capacity_factor
    if num_experts is not None:
        config.model.moe.num_experts = num_experts
    return config


def json_roundtrip(config):
    import ml_collections
    return ml_collections.ConfigDict(config.to_dict())


# ----------------------------------------------------------------------------------------------
# FLOPs

def model_flops_per_step(model_config, batch_size: int, seq_len: int) -> tuple[float, int]:
    """(analytic training FLOPs per step, active params counted) -- see the module docstring."""
    from rmoe_jax.model import count_params

    counts = count_params(model_config)
    embed_table = model_config.vocab_size * model_config.d_model
    active = counts["active"] - (0 if model_config.tie_embeddings else embed_table)
    # The shared router parameters (RMoE's one GRU cell, a shared projector) are stored once but
    # applied in every layer: count them once per layer.
    active += (model_config.num_layers - 1) * shared_router_params(model_config)
    tokens = batch_size * seq_len
    attention = 6 * model_config.num_layers * seq_len * model_config.d_model
    return float(tokens) * (6 * active + attention), int(active)


def shared_router_params(model_config) -> int:
    """Parameters of `params['router_shared']` (0 for routers without one)."""
    import jax
    import jax.numpy as jnp

    from rmoe_jax.model import build_model

    model = build_model(model_config)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params.get("router_shared", {}))))


# ----------------------------------------------------------------------------------------------
# Variants: each exposes run(steps) (blocks at the end) and a few facts

@dataclasses.dataclass
class Variant:
    name: str
    run: Callable[[int], None]
    compile_s: float = float("nan")
    peak_bytes: float = float("nan")
    xla_flops: float = float("nan")
    model_flops: float = float("nan")
    tokens: int = 0
    note: str = ""
    times: list = dataclasses.field(default_factory=list)  # seconds per step, one per round
    # Per step, one per round, from getrusage (the whole process: the variant timed alone then):
    faults: list = dataclasses.field(default_factory=list)  # minor page faults
    system_s: list = dataclasses.field(default_factory=list)  # kernel CPU seconds (all threads)
    hlo_text: str = ""  # the compiled step's HLO (for --profile); empty for non-JAX variants

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


def jax_train_variant(name: str, config, *, seed: int = 0, note: str = "") -> Variant:
    import jax
    import jax.numpy as jnp
    import ml_collections

    from rmoe_jax import parallel
    from rmoe_jax.aot import report_from_compiled
    from rmoe_jax.train.experiment import build_experiment

    seq_len, batch_size = int(config.data.seq_len), int(config.train.batch_size)
    # One device, as the peer runs: a 1x1x1x1 mesh over the first device.
    mesh = parallel.make_mesh(ml_collections.ConfigDict({a: 1 for a in parallel.MESH_AXES}),
                              jax.devices()[:1])
    experiment = build_experiment(config, mesh, seed=seed)
    state = experiment.init_state()
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.model.vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "weights": jnp.ones((batch_size, seq_len), jnp.float32)}
    step = experiment.train_step()
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    report = report_from_compiled(name, compiled)
    holder = {"state": state}

    def run(steps: int) -> None:
        s = holder["state"]
        metrics = None
        for _ in range(steps):
            s, metrics = compiled(s, batch)
        jax.block_until_ready((s, metrics))
        holder["state"] = s

    flops, _ = model_flops_per_step(config.model, batch_size, seq_len)
    return Variant(name, run, compile_s=compile_s, peak_bytes=report.peak_bytes, xla_flops=report.flops,
                   model_flops=flops, tokens=batch_size * seq_len, note=note, hlo_text=compiled.as_text())


def matmul_variant(n: int) -> Variant:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    start = time.perf_counter()
    compiled = dot.lower(a, b).compile()
    compile_s = time.perf_counter() - start

    def run(steps: int) -> None:
        out = None
        for _ in range(steps):
            out = compiled(a, b)
        jax.block_until_ready(out)

    return Variant("matmul", run, compile_s=compile_s, model_flops=2.0 * n ** 3,
                   note=f"jnp.dot float32 {n}x{n} @ {n}x{n}")


def mixtral_variant(model_config, batch_size: int, seq_len: int, train_config, threads: int) -> Variant:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    moe = model_config.moe
    cfg = MixtralConfig(
        vocab_size=model_config.vocab_size, hidden_size=model_config.d_model,
        intermediate_size=moe.expert_hidden, num_hidden_layers=model_config.num_layers,
        num_attention_heads=model_config.num_heads, num_key_value_heads=model_config.num_kv_heads,
        num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
        max_position_embeddings=max(seq_len, int(model_config.max_seq_len)),
        tie_word_embeddings=bool(model_config.tie_embeddings), output_router_logits=True,
        router_aux_loss_coef=float(moe.balance_coef), use_cache=False)
    model = MixtralForCausalLM(cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=float(train_config.learning_rate),
                            betas=(float(train_config.beta1), float(train_config.beta2)),
                            eps=float(train_config.eps), weight_decay=float(train_config.weight_decay))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model_config.vocab_size, (batch_size, seq_len + 1), generator=gen)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, :-1].contiguous()
    clip = float(train_config.grad_clip_norm)

    def one_step():
        out = model(input_ids=inputs, labels=labels)
        out.loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    def run(steps: int) -> None:
        for _ in range(steps):
            one_step()

    attn = getattr(model.config, "_attn_implementation", "?")
    return Variant("mixtral_torch", run, compile_s=0.0, tokens=batch_size * seq_len,
                   note=f"transformers MixtralForCausalLM, attn={attn}, torch {torch.__version__}, "
                        f"{threads} threads, AdamW")


# ----------------------------------------------------------------------------------------------
# The run

def measure(variants: list[Variant], steps: int, repeats: int, log=print) -> None:
    for v in variants:  # warm-up: first-call costs (allocations, thread pools) out of the timing
        v.run(1)
    for r in range(repeats):
        for v in variants:
            usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            v.run(steps)
            v.times.append((time.perf_counter() - start) / steps)
            after = resource.getrusage(resource.RUSAGE_SELF)
            v.faults.append((after.ru_minflt - usage.ru_minflt) / steps)
            v.system_s.append((after.ru_stime - usage.ru_stime) / steps)
        log(f"round {r + 1}/{repeats}: " + ", ".join(f"{v.name} {v.times[-1]:.3f}s" for v in variants))


def _fmt_bytes(b: float) -> str:
    return "-" if not math.isfinite(b) else f"{b / 2**20:,.0f}"


def format_table(variants: dict[str, Variant], args, base_name: str, env: str) -> str:
    peak = variants["matmul"].model_flops / variants["matmul"].median if "matmul" in variants else float("nan")
    lines = [f"Environment: {env}",
             f"Shape: `{args.config}`, batch {args.batch_size} x seq {args.seq_len}, "
             f"{args.steps} steps x {args.repeats} interleaved rounds (median of rounds).",
             "",
             f"Measured matmul peak: {peak / 1e9:.1f} GFLOP/s (float32 jnp.dot, {args.matmul_n}^3)."
             if math.isfinite(peak) else "Matmul peak: not measured.",
             "",
             "| variant | median s/step | min s/step | tokens/s | compile s | peak MiB (compiled) | "
             "model GFLOP/step | XLA GFLOP/step | MFU | page faults/step | system s/step | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key, v in variants.items():
        if key == "matmul":
            continue
        med = v.median
        tps = v.tokens / med if v.tokens else float("nan")
        mfu = v.model_flops / med / peak if math.isfinite(v.model_flops) and math.isfinite(peak) else float("nan")
        lines.append(
            f"| {key} | {med:.3f} | {min(v.times):.3f} | {tps:,.0f} | "
            f"{v.compile_s:.1f} | {_fmt_bytes(v.peak_bytes)} | "
            + (f"{v.model_flops / 1e9:.1f}" if math.isfinite(v.model_flops) else "-") + " | "
            + (f"{v.xla_flops / 1e9:.1f}" if math.isfinite(v.xla_flops) else "-") + " | "
            + (f"{mfu:.1%}" if math.isfinite(mfu) else "-") + " | "
            + (f"{statistics.median(v.faults):,.0f} | {statistics.median(v.system_s):.2f} | "
               if v.faults else "- | - | ")
            + (v.note if key == v.name else f"the {v.name} program, timed once") + " |")

    def ratio(a, b):
        if a in variants and b in variants:
            return variants[a].median / variants[b].median
        return None

    def paired(a, b):  # median over rounds of the ratio within a round (same noise for both)
        if a in variants and b in variants:
            return statistics.median(x / y for x, y in zip(variants[a].times, variants[b].times))
        return None

    lines += ["", "| ratio | ratio of medians | median of per-round ratios | target |",
              "|---|---:|---:|---|"]
    capacity_ref = "dropless" if "dropless" in variants else base_name
    rows = [("RMoE / SMoE step time", base_name, "smoe", "<= 1.03"),
            ("capacity / dropless step time", "capacity", capacity_ref, "-"),
            ("fused / chunked attention step time", "attn_fused", base_name, "-"),
            ("rolled / as-given layer scan step time", "scan_rolled", base_name, "-")]
    sweep = sorted((int(k[1:]), k) for k in variants if k.startswith("e") and k[1:].isdigit())
    if len(sweep) >= 2:
        lo, hi = sweep[0], sweep[-1]
        rows.append((f"dropless step time, {hi[0]} / {lo[0]} experts", hi[1], lo[1], "< 1.3"))
        for n, key in sweep[1:-1]:
            rows.append((f"dropless step time, {n} / {lo[0]} experts", key, lo[1], "-"))
    # tokens/s ratio = inverse step-time ratio at equal tokens
    rows.append(("tokens/s, rmoe_jax RMoE / transformers Mixtral", "mixtral_torch", base_name, ">= 1.5"))
    for label, a, b, target in rows:
        if a in variants and b in variants:
            lines.append(f"| {label} | {ratio(a, b):.3f} | {paired(a, b):.3f} | {target} |")
    if math.isfinite(peak) and base_name in variants:
        v = variants[base_name]
        mfu = v.model_flops / v.median / peak
        lines.append(f"| MFU of RMoE (model FLOPs / measured matmul peak) | {mfu:.3f} | - | >= 0.35 |")
    return "\n".join(lines) + "\n"


DEFAULT_CONFIG = "configs/enwik8_medium.py"
DEFAULT_VARIANTS = "rmoe,smoe,capacity,dropless,experts,attn_fused,scan_rolled,matmul,mixtral_torch"
_HELP_FLAGS = ("-h", "-help", "--help", "-?", "--helpshort", "--helpfull")


def define_flags(flag_values, argv: list[str]) -> None:
    """The bench's flags on `flag_values` (a fresh `flags.FlagValues()` per call: absl flags are
    process-global, and tests call `main` several times). `argv` is the whole command line: the
    `--config.FIELD=VALUE` overrides are read from it (config_flags reads sys.argv otherwise)."""
    from absl import flags
    from ml_collections import config_flags

    fv = dict(flag_values=flag_values)
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "config file[:row]; override any field "
                                    "for every variant with --config.FIELD=VALUE, e.g. "
                                    "--config.model.num_layers=2", lock_config=True, sys_argv=argv, **fv)
    flags.DEFINE_integer("batch_size", 4, "batch size", **fv)
    flags.DEFINE_integer("seq_len", 0, "0: the config's data.seq_len", **fv)
    flags.DEFINE_integer("steps", 2, "steps timed per variant per round", **fv)
    flags.DEFINE_integer("repeats", 5, "interleaved rounds", **fv)
    flags.DEFINE_string("experts", "8,16,64", "dropless expert-count sweep (fixed top-k)", **fv)
    flags.DEFINE_string("variants", DEFAULT_VARIANTS,
                        "comma list from: rmoe, smoe, capacity, dropless, experts, attn_fused, scan_rolled, matmul, "
                        "mixtral_torch", **fv)
    flags.DEFINE_float("capacity_factor", 0.0, "capacity variant's factor; 0 = the config's", **fv)
    flags.DEFINE_integer("matmul_n", 2048, "matmul variant's N (N x N float32 jnp.dot)", **fv)
    flags.DEFINE_integer("threads", 0, "torch threads; 0 = os.cpu_count()", **fv)
    flags.DEFINE_float("dropout", -1.0, ">= 0 overrides model.dropout_rate", **fv)
    flags.DEFINE_string("profile", "", "after timing, trace one more step of each JAX variant into "
                        "DIR/<variant> (jax.profiler, Perfetto) and add where its time goes to the output",
                        **fv)
    flags.DEFINE_string("out", "", "write the Markdown table here (and raw times to .json)", **fv)
    import absl.logging  # noqa: F401 (defines --verbosity, which the error lines point to)

    flags.DEFINE_flag(flags.FLAGS["verbosity"], flag_values, module_name="absl.logging")


def parse_args(argv=None) -> types.SimpleNamespace:
    """The command line (without the program name; None: sys.argv[1:]) -> one attribute per flag:
    `config` is the `--config` argument as given, `base_config` the loaded config with the
    `--config.FIELD=VALUE` overrides. A mistake: one `error:` line, exit status 2 (`rmoe_jax.cli`)."""
    from absl import flags

    from rmoe_jax import cli

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(re.match(r"^--?config(=|$)", a) for a in args):
        args = ["--config", DEFAULT_CONFIG, *args]  # the default, loaded (and checked) like a given one
    command = ["rmoe_jax.bench", *args]
    flag_values = flags.FlagValues()
    define_flags(flag_values, command)
    if any(a in _HELP_FLAGS for a in args):
        print(f"usage: python -m rmoe_jax.bench [--config FILE[:row]] [--config.FIELD=VALUE ...] "
              f"[--flag=value ...]\n\n{__doc__.split(chr(10) * 2)[0]}\n\n{flag_values.get_help()}")
        raise SystemExit(0)
    cli.parse_flags(command, flag_values=flag_values)
    names = ("batch_size", "seq_len", "steps", "repeats", "experts", "variants", "capacity_factor",
             "matmul_n", "threads", "dropout", "profile", "out")
    return types.SimpleNamespace(config=flag_values["config"].config_filename,
                                 base_config=flag_values["config"].value,
                                 **{name: flag_values[name].value for name in names})


def main(argv=None) -> str:
    args = parse_args(argv)  # a mistake in a flag, --config or --config.FIELD: one line, exit 2
    import jax

    from rmoe_jax.config import ConfigError, validate

    base = args.base_config
    try:
        validate(base)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    args.seq_len = args.seq_len or int(base.data.seq_len)
    if args.dropout >= 0:
        base.model.dropout_rate = args.dropout
    wanted = [w.strip() for w in args.variants.split(",") if w.strip()]
    common = dict(batch_size=args.batch_size, seq_len=args.seq_len)
    base_dispatch = base.model.moe.dispatch
    base_experts = int(base.model.moe.num_experts)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    variants: dict[str, Variant] = {}

    def add(name, build):
        log(f"building {name} ...")
        v = build()
        v.name = name
        variants[name] = v
        log(f"  compiled in {v.compile_s:.1f}s")

    base_name = "rmoe"
    if "rmoe" in wanted:
        add("rmoe", lambda: jax_train_variant("rmoe", variant_config(base, **common),
                                              note=f"{base.model.router.name} router, {base_dispatch}, "
                                                   f"E={base_experts}, attention chunk "
                                                   f"{base.model.attention_chunk}"))
    if "smoe" in wanted:
        add("smoe", lambda: jax_train_variant("smoe", variant_config(base, row="smoe", **common),
                                              note=f"linear router, {base_dispatch}, E={base_experts}"))
    cf = args.capacity_factor or None
    if "capacity" in wanted:
        cfg = variant_config(base, dispatch="capacity", capacity_factor=cf, **common)
        add("capacity", lambda: jax_train_variant(
            "capacity", cfg, note=f"capacity dispatch, factor {cfg.model.moe.capacity_factor}"))
    if "dropless" in wanted and base_dispatch != "dropless":
        add("dropless", lambda: jax_train_variant("dropless", variant_config(base, dispatch="dropless", **common),
                                                  note="dropless dispatch"))
    if "experts" in wanted:
        for n in [int(x) for x in args.experts.split(",") if x.strip()]:
            name = f"e{n}"
            if n == base_experts and base_dispatch == "dropless" and "rmoe" in variants:
                variants[name] = variants["rmoe"]  # the same program: do not time it twice
                continue
            add(name, lambda n=n, name=name: jax_train_variant(
                name, variant_config(base, dispatch="dropless", num_experts=n, **common),
                note=f"dropless, E={n}, top-{base.model.moe.top_k}"))
    if "attn_fused" in wanted:
        cfg = variant_config(base, **common)
        cfg.model.attention_chunk = 0
        add("attn_fused", lambda: jax_train_variant(
            "attn_fused", cfg, note="one fused jax.nn.dot_product_attention (attention_chunk=0)"))
    if "scan_rolled" in wanted and base.model.scan_unroll != 1:
        rolled = variant_config(base, **common)
        rolled.model.scan_unroll = 1
        add("scan_rolled", lambda: jax_train_variant(
            "scan_rolled", rolled, note="layer scan rolled (scan_unroll=1)"))
    if "matmul" in wanted:
        add("matmul", lambda: matmul_variant(args.matmul_n))
    if "mixtral_torch" in wanted:
        threads = args.threads or os.cpu_count() or 1
        cfg = variant_config(base, **common)
        add("mixtral_torch", lambda: mixtral_variant(cfg.model, args.batch_size, args.seq_len, cfg.train, threads))

    unique = list({id(v): v for v in variants.values()}.values())
    measure(unique, args.steps, args.repeats, log)

    env = (f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} on "
           f"{jax.devices()[0].platform}, float32, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    table = format_table(variants, args, base_name, env)
    if args.profile:
        from rmoe_jax.step_profile import profile_step

        for v in unique:
            if v.hlo_text:
                log(f"profiling {v.name} ...")
                table += "\n" + profile_step(lambda v=v: v.run(1), v.hlo_text,
                                             os.path.join(args.profile, v.name), v.name)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"`python -m rmoe_jax.bench {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n")
            f.write(table)
        raw = {k: {"times": v.times, "compile_s": v.compile_s, "peak_bytes": v.peak_bytes,
                   "model_flops": v.model_flops, "xla_flops": v.xla_flops, "tokens": v.tokens, "note": v.note}
               for k, v in variants.items()}
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(raw, f, indent=1)
    return table


if __name__ == "__main__":
    main()
