"""The paper's 0.91B-parameter Llama-style MoE pre-training (Table 3; PAPER.md section 4).

    python train.py --config configs/llama_0p91b.py --workdir runs/llama_rmoe
    python train.py --config configs/llama_0p91b.py --workdir runs/llama_smoe \
        --config.model.router.name=linear

24 layers, d = 1280, 20 heads (RoPE, SwiGLU, RMSNorm), sequence 4096, no dropout, init std 0.02;
16 experts of FFN 448, top-4; GRU router with p = 128 and no biases (projector and gate);
vocabulary 96,512 (a sentencepiece model trained on the corpus); AdamW betas (0.9, 0.95),
weight decay 0.1 (not on norms or biases), clip 1.0; lr 4.2e-4, 2000 warmup steps, cosine to
4.2e-5; global batch 1120 sequences (4.6M tokens), 5000 steps (~23B tokens; the paper's "5k
steps = 20B tokens"); balance loss 0.01 over all layers' logits concatenated (the official HF
port's form); bfloat16 compute with float32 params.

The data is a TFDS catalog dataset (C4 English) that must be prepared as array_record in
`data.data_dir` first (`python -m rmoe_jax.data.prepare --dataset c4/en:3.1.0 --data_dir DIR`).

`configs/llama_0p91b.py:files` is the same recipe on your own files with your own
tokenizer.json (model.vocab_size must hold its vocabulary; 96,512 as in the paper):

    python -m rmoe_jax.data.prepare --config configs/llama_0p91b.py:files \
        --config.data.train_files='/data/corpus/*.jsonl.gz' \
        --config.data.tokenizer_file=/data/tokenizer.json --config.data.data_dir=/data/tfds
    python train.py --config configs/llama_0p91b.py:files --workdir runs/llama_rmoe \
        --config.data.train_files='/data/corpus/*.jsonl.gz' \
        --config.data.tokenizer_file=/data/tokenizer.json --config.data.data_dir=/data/tfds

Validation and test are then 0.05% of the documents each, held out of the train files
(give `data.validation_files` / `data.test_files` to use files of your own instead).
The default layout is pure FSDP over all devices (`mesh.fsdp=-1`, experts replicated, the
dropless dispatch local to each chip) with 7 micro-batches of 160 sequences (5 per chip on 32
chips). Fit the batch to the hardware with `--config.train.grad_accum_steps=K` (the global
batch stays 1120) and the mesh with `--config.mesh.*` (e.g. `--config.mesh.fsdp=4
--config.mesh.expert=8 --config.train.grad_accum_steps=7` for expert parallelism).
"""

from rmoe_jax.config import default_config


SOURCES = ("c4", "files")


def get_config(source: str = "c4"):
    """`source`: c4 (the TFDS catalog's C4 English) or files (your files, a tokenizer.json)."""
    if source not in SOURCES:
        raise ValueError(f"configs/llama_0p91b.py:{source}: the source is one of {', '.join(SOURCES)}")
    config = default_config()

    model = config.model
    model.vocab_size = 96_512
    model.d_model = 1280
    model.num_layers = 24
    model.num_heads = 20
    model.num_kv_heads = 20
    model.max_seq_len = 4096
    model.rope_theta = 10000.0
    model.dropout_rate = 0.0
    model.init_std = 0.02
    model.dtype = "bfloat16"
    model.param_dtype = "float32"
    # `full`: the shortest v5p roofline measured (1.800 s against `dots`' 1.957 s from one tree;
    # dots needs 53 GiB, more than a v6e chip has); it fits both 32-chip slices (30 GiB per chip;
    # README, "0.91B on 32 chips").
    model.remat_policy = "full"
    # One fused XLA attention per layer (the TPU tables in the README were compiled so);
    # chunking (e.g. 512) skips most of the causal mask's masked half at seq 4096.
    model.attention_chunk = 0
    model.moe.num_experts = 16
    model.moe.top_k = 4
    model.moe.expert_hidden = 448
    model.moe.balance_coef = 0.01
    model.moe.balance_aggregation = "concat"
    router = model.router
    router.name = "recurrent"
    router.hidden_size = 128
    router.bias = False
    router.projector_bias = False
    router.init = "normal"

    data = config.data
    data.dataset = "c4/en:3.1.0"
    data.feature_key = "text"
    data.tokenizer = "sentencepiece"
    data.sentencepiece_vocab_size = 96_512
    data.seq_len = 4096
    data.eval_split = "validation"
    if source == "files":
        data.dataset = "files"
        data.tokenizer = "huggingface"
        data.tokenizer_file = ""  # --config.data.tokenizer_file=/path/to/tokenizer.json
        data.train_files = ""  # --config.data.train_files='/path/to/corpus/*.jsonl.gz'
        data.heldout_fraction = 0.0005  # of a corpus of millions of documents

    # Pure FSDP over every device, 7 micro-batches of 160: the fastest layout measured for 32
    # chips (README, "0.91B on 32 chips"; v5p and v6e). The micro-batch must divide over
    # the chips (160 over 32); --config.mesh.* and --config.train.grad_accum_steps refit it.
    mesh = config.mesh
    mesh.data, mesh.fsdp, mesh.expert, mesh.tensor = 1, -1, 1, 1

    train = config.train
    train.batch_size = 1120
    train.grad_accum_steps = 7
    train.num_steps = 5000
    train.learning_rate = 4.2e-4
    train.schedule = "cosine"
    train.warmup_steps = 2000
    train.final_learning_rate = 4.2e-5
    train.beta1 = 0.9
    train.beta2 = 0.95
    train.eps = 1e-8
    train.weight_decay = 0.1
    train.grad_clip_norm = 1.0
    train.log_every = 10
    train.eval_every = 500
    train.eval_batches = 20
    train.eval_batch_size = 64
    train.checkpoint_every = 250
    train.keep_checkpoints = 3
    return config
