"""The README default: a CPU-sized RMoE that learns Shakespeare in a few minutes.

    python train.py --config configs/tiny.py --workdir /tmp/rmoe_tiny

4 layers, d_model 128, 4 heads, 8 experts (top-2, FFN 128 each), GRU router with p = 64, byte
tokens, sequences of 128 bytes, batch 8. Any router of the paper is one override away, e.g.
`--config.model.router.name=linear` (SMoE); see configs/enwik8_medium.py for the full list.
"""

from rmoe_jax.config import default_config


def get_config():
    config = default_config()

    model = config.model
    model.vocab_size = 256
    model.d_model = 128
    model.num_layers = 4
    model.num_heads = 4
    model.num_kv_heads = 4
    model.max_seq_len = 128
    model.dropout_rate = 0.0
    model.moe.num_experts = 8
    model.moe.top_k = 2
    model.moe.expert_hidden = 128
    model.moe.balance_coef = 0.01
    model.router.name = "recurrent"
    model.router.hidden_size = 64

    config.data.dataset = "shakespeare"
    config.data.tokenizer = "byte"
    config.data.seq_len = 128

    train = config.train
    train.batch_size = 8
    train.num_steps = 400
    train.learning_rate = 3e-3
    train.schedule = "cosine"
    train.warmup_steps = 40
    train.final_learning_rate = 3e-4
    train.weight_decay = 0.01
    train.beta2 = 0.98
    train.grad_clip_norm = 1.0
    train.log_every = 20
    train.eval_every = 100
    train.eval_batches = 16
    train.checkpoint_every = 200
    train.keep_checkpoints = 2
    return config
