"""enwik8, the paper's "medium" setting (Table 1, 5, 6; PAPER.md section 4).

    python train.py --config configs/enwik8_medium.py --workdir runs/enwik8_rmoe
    python train.py --config configs/enwik8_medium.py:smoe --workdir runs/enwik8_smoe

8 layers, d = 352, 8 heads, 16 experts top-2 of FFN 352, sequence 512, dropout 0.1, balance
weight 0.01 (summed over layers); Adam lr 7e-4, 4000 warmup steps then constant; batch 48;
80k steps; router biases on and PyTorch-default ("torch") router/GRU initialisation, as the
enwik8 code has them. Metric: bits per byte (= per character) on the validation split.
Our backbone is a Llama-style pre-norm decoder, not the paper's Transformer-XL one: compare
routers with each other, not absolute BPC with the paper.

The router is chosen by `model.router.name` plus its options. Each paper row is either a config
argument after the file name (`configs/enwik8_medium.py:ROW`; any name of `python -m
rmoe_jax.compare --help`'s table works too, e.g. `rmoe_np`) or the equivalent overrides:

Table 1
    rmoe        (default)                      --config.model.router.name=recurrent
    smoe        SMoE                           --config.model.router.name=linear
    hyper       HyperMoE                       --config.model.router.name=hyper
    mlp         SMoE-MLP                       --config.model.router.name=mlp
    random      RandomSMoE                     --config.model.router.name=random
    cosine      CosineMoE                      --config.model.router.name=cosine
    xmoe        XMoE (q = 16)                  --config.model.router.name=xmoe --config.model.router.xmoe_dim=16
Table 5 (recurrence ablations; all keep name=recurrent)
    np          RMoE-NP                        --config.model.router.no_recurrence=True
    detach      RMoE + detach                  --config.model.router.detach=True
    np_r0.5     NP + r-alpha 0.5               --config.model.router.no_recurrence=True --config.model.router.residual_alpha=0.5
    np_r1.0     NP + r-alpha 1.0               --config.model.router.no_recurrence=True --config.model.router.residual_alpha=1.0
    (a detached residual: add --config.model.router.residual_detach=True)
Table 6 (projector / cell)
    sproj_gru   S-proj + GRU                   --config.model.router.shared_projector=True
    rnn         L-proj + RNN                   --config.model.router.cell=rnn
    lstm        L-proj + LSTM                  --config.model.router.cell=lstm
Table 2 (XMoE(q) vs XMoE(q) + GRU, q in 8, 16, 32)
    xmoe8 / xmoe16 / xmoe32                    --config.model.router.name=xmoe --config.model.router.xmoe_dim=q
    xmoe8_gru / xmoe16_gru / xmoe32_gru        --config.model.router.name=recurrent --config.model.router.head=xmoe --config.model.router.xmoe_dim=q
Shared expert (DeepSeekMoE style, official code's 0.5 * moe + 0.5 * shared)
    shared      --config.model.moe.shared_expert=True
"""

from rmoe_jax import router_rows
from rmoe_jax.config import default_config
from rmoe_jax.router_rows import ROUTERS, resolve

# The rows this file names, by their short names: each is a row of the one registry
# (rmoe_jax/router_rows.py, shared with compare and bench); ROWS shows their router / moe fields.
ROW_NAMES = ("rmoe", "smoe", "hyper", "mlp", "random", "cosine", "xmoe", "np", "detach", "np_r0.5",
             "np_r1.0", "sproj_gru", "rnn", "lstm", "xmoe8", "xmoe16", "xmoe32", "xmoe8_gru",
             "xmoe16_gru", "xmoe32_gru", "shared")
ROWS = {row: {key.replace("model.router.", "").replace("model.", ""): value
              for key, value in ROUTERS[resolve(row)].overrides.items()} for row in ROW_NAMES}


def apply_row(config, row: str):
    """Set the fields of one paper row (a name above, or any name of the registry)."""
    return router_rows.apply_row(config, row)


def get_config(row: str | None = None):
    config = default_config()

    model = config.model
    model.vocab_size = 256
    model.d_model = 352
    model.num_layers = 8
    # All 8 layers unrolled: on CPU the rolled scan's per-layer slicing and stacking cost 11% of
    # the step (BENCHMARKS.md, "CPU step"); compile time stays ~10 s.
    model.scan_unroll = 8
    model.num_heads = 8
    model.num_kv_heads = 8
    model.max_seq_len = 512
    model.dropout_rate = 0.1
    model.moe.num_experts = 16
    model.moe.top_k = 2
    model.moe.expert_hidden = 352
    model.moe.balance_coef = 0.01
    model.moe.balance_aggregation = "sum"
    model.moe.dispatch = "dropless"
    router = model.router
    router.name = "recurrent"
    router.hidden_size = 128
    router.bias = True
    router.projector_bias = True
    router.init = "torch"

    data = config.data
    data.dataset = "enwik8"
    data.tokenizer = "byte"
    data.seq_len = 512

    train = config.train
    train.batch_size = 48
    train.num_steps = 80_000
    train.learning_rate = 7e-4
    train.schedule = "constant"
    train.warmup_steps = 4000
    train.beta1 = 0.9
    train.beta2 = 0.999
    train.eps = 1e-8
    train.weight_decay = 0.0  # Adam, not AdamW
    train.grad_clip_norm = 1.0
    train.log_every = 100
    train.eval_every = 2000
    train.eval_batches = 0  # the whole validation split
    train.checkpoint_every = 2000
    train.keep_checkpoints = 3

    if row:
        apply_row(config, row)
    return config
