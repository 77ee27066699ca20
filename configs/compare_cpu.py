"""The CPU-scale router comparison (results/compare_cpu/): deep and narrow, ~8 min a run on 2 cores.

    python -m rmoe_jax.compare --config configs/compare_cpu.py --routers smoe,rmoe,rmoe_np \
        --seeds 2 --out runs/compare_cpu

12 layers (the paper's gain grows with depth, so depth is favoured over width), d_model 64,
4 heads of 16, 8 experts top-2 of FFN 64, GRU router with p = 32; byte-level Shakespeare,
sequences of 64 bytes, batch 16 (short sequences: more updates for the same tokens). Capacity dispatch with capacity factor E / k = 4, which can
never drop a token (every expert has a slot for every token of its sequence), so it computes
exactly what dropless dispatch computes, and on CPU it is ~2-4x faster than `ragged_dot`.
Router biases and PyTorch-default init, as the paper's enwik8 code. AdamW lr 3e-3, cosine to 3e-4 after 30 warmup steps. The number of steps is sized to the CPU
budget; see results/compare_cpu/README.md for what was run.
"""

from rmoe_jax.config import default_config


def get_config():
    config = default_config()

    model = config.model
    model.vocab_size = 256
    model.d_model = 64
    model.num_layers = 12
    model.num_heads = 4
    model.num_kv_heads = 4
    model.max_seq_len = 64
    model.dropout_rate = 0.0
    model.moe.num_experts = 8
    model.moe.top_k = 2
    model.moe.expert_hidden = 64
    model.moe.dispatch = "capacity"
    model.moe.capacity_factor = 4.0  # = E / k: no token can be dropped
    model.moe.balance_coef = 0.01
    model.moe.balance_aggregation = "sum"
    model.router.name = "recurrent"
    model.router.hidden_size = 32
    # The enwik8 code's router set-up (as configs/enwik8_medium.py): biases on, PyTorch-default
    # uniform init for the gate, projector and GRU. With N(0, 0.02) everywhere the GRU state
    # starts near 0 and RMoE's routing stayed uniform through a 20-step probe: in a run this
    # short the router would barely get to route.
    model.router.bias = True
    model.router.projector_bias = True
    model.router.init = "torch"

    config.data.dataset = "shakespeare"
    config.data.tokenizer = "byte"
    config.data.seq_len = 64

    train = config.train
    train.batch_size = 16
    train.num_steps = 350
    train.learning_rate = 3e-3
    train.schedule = "cosine"
    train.warmup_steps = 30
    train.final_learning_rate = 3e-4
    train.weight_decay = 0.01
    train.beta2 = 0.98
    train.grad_clip_norm = 1.0
    train.log_every = 25
    train.eval_every = 50
    train.eval_batches = 4  # the curve; the final val/test numbers use --eval_batches
    train.eval_at_start = False
    train.checkpoint_every = 100
    train.keep_checkpoints = 1
    return config
