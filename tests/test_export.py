"""Export -> import round trips, transformers' Mixtral, a torch RMoE, and the folder rules."""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
import torch  # required test dependencies (requirements-test.txt): a missing one fails, never skips
import transformers

from rmoe_jax import export
from rmoe_jax.model import build_model

from helpers import assert_trees_equal, random_params, small_model

# Every router and every option that changes params or the forward pass.
VARIANTS = {
    "smoe": ("linear", {}),
    "smoe_bias_shared_expert_tied": ("linear", {"router.bias": True, "moe.shared_expert": True,
                                                "moe.shared_expert_hidden": 12,
                                                "tie_embeddings": True}),
    "mlp_bias": ("mlp", {"router.bias": True}),
    "random": ("random", {}),
    "cosine": ("cosine", {}),
    "xmoe": ("xmoe", {}),
    "hyper": ("hyper", {}),
    "rmoe": ("recurrent", {}),
    "rmoe_biases_alpha_detach": ("recurrent", {"router.bias": True, "router.projector_bias": True,
                                               "router.residual_alpha": 0.5, "router.detach": True}),
    "rmoe_rnn_cosine_np": ("recurrent", {"router.cell": "rnn", "router.head": "cosine",
                                         "router.no_recurrence": True}),
    "rmoe_lstm_sproj_xmoe_shared": ("recurrent", {"router.cell": "lstm", "router.shared_projector": True,
                                                  "router.projector_bias": True, "router.head": "xmoe",
                                                  "moe.shared_expert": True}),
    "rmoe_sproj_tied_capacity": ("recurrent", {"router.shared_projector": True, "tie_embeddings": True,
                                               "moe.dispatch": "capacity", "moe.renormalize": False,
                                               "rms_norm_eps": 1e-5, "rope_theta": 5e5}),
}


# The export format's own names (layer and expert indices as \d+).
SPEC_NAMES = [re.compile(p) for p in (
    r"model\.embed_tokens\.weight", r"model\.norm\.weight", r"lm_head\.weight",
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
    r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight",
    r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w[123]\.weight",
    r"model\.layers\.\d+\.block_sparse_moe\.gate\.weight",
    r"model\.layers\.\d+\.block_sparse_moe\.weight[12]",
    r"model\.rnn_router\.(weight|bias)_[ih][rzn]")]


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, tokens):
    """One compile per distinct model: a rebuilt model equal to the original hits the cache."""
    return model.apply({"params": params}, tokens)[0]


def tokens_for(cfg, seed=1, shape=(2, 16)):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_is_exact(variant, tmp_path):
    router, overrides = VARIANTS[variant]
    cfg = small_model(router, **overrides)
    params = random_params(cfg)
    out = export.export_model(cfg, params, str(tmp_path / "export"))
    config_json = json.load(open(os.path.join(out, "config.json")))
    block = config_json["rmoe_jax"]

    cfg2, params2 = export.import_export(out)
    assert cfg2.to_dict() == cfg.to_dict()
    assert_trees_equal(params, params2)
    tokens = jnp.asarray(tokens_for(cfg))
    ours = forward(build_model(cfg), params, tokens)
    theirs = forward(build_model(cfg2), params2, tokens)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

    # Every tensor has a name of the format or is listed, with its meaning, as an extension.
    templates = block["extension_tensors"]
    assert all(doc for doc in templates.values())
    listed = [re.compile(re.escape(t).replace(r"\{i\}", r"\d+").replace(r"\{e\}", r"\d+"))
              for t in templates]
    names = list(export.read_tensors(out))
    for name in names:
        assert any(p.fullmatch(name) for p in SPEC_NAMES + listed), name
    assert all(any(p.fullmatch(n) for n in names) for p in listed)  # no stale listing
    assert (config_json["model_type"] == "mixtral") == (cfg.router.name in ("linear", "random"))
    assert block["transformers_exact"] == (variant in ("smoe", "random"))


def test_import_fails_loudly_on_unexpected_missing_or_misshapen(tmp_path):
    cfg = small_model("recurrent", **{"router.bias": True})
    out = export.export_model(cfg, random_params(cfg), str(tmp_path / "export"))
    path = os.path.join(out, "model.safetensors")
    tensors = load_file(path)

    def rewrite(change):
        t = dict(tensors)
        change(t)
        save_file(t, path, metadata={"format": "pt"})
        with pytest.raises(export.ExportError) as info:
            export.import_export(out)
        return str(info.value)

    msg = rewrite(lambda t: t.pop("model.layers.1.block_sparse_moe.bias2"))
    assert "model.layers.1.block_sparse_moe.bias2: missing" in msg
    msg = rewrite(lambda t: t.update({"model.layers.0.block_sparse_moe.gate.weight": np.zeros((4, 32), np.float32)}))
    assert "model.layers.0.block_sparse_moe.gate.weight: unexpected" in msg
    msg = rewrite(lambda t: t.update({"model.rnn_router.weight_hz": np.zeros((8, 9), np.float32)}))
    assert "model.rnn_router.weight_hz: shape [8, 9], expected [8, 8]" in msg


def test_smoe_export_loads_in_transformers_mixtral(tmp_path):
    worst = 0.0
    for tied in (False, True):
        cfg = small_model("linear", tie_embeddings=tied, rms_norm_eps=1e-5, rope_theta=500.0)
        params = random_params(cfg, seed=3)
        out = export.export_model(cfg, params, str(tmp_path / f"smoe_{tied}"))
        config_json = json.load(open(os.path.join(out, "config.json")))
        assert config_json["rope_theta"] == 500.0 and config_json["rms_norm_eps"] == 1e-5
        assert ("lm_head.weight" in export.read_tensors(out)) == (not tied)
        hf = transformers.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32)
        hf.eval()
        assert hf.config.rope_parameters["rope_theta"] == 500.0
        assert hf.config.rms_norm_eps == 1e-5 and hf.config.tie_word_embeddings == tied
        tokens = tokens_for(cfg, seed=4, shape=(3, 16))
        ours = np.asarray(forward(build_model(cfg), params, jnp.asarray(tokens)))
        with torch.no_grad():
            theirs = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
        diff = float(np.abs(ours - theirs).max())
        worst = max(worst, diff)
        assert diff < 1e-4, (tied, diff)
    print(f"max |logits - Mixtral logits| = {worst:.2e}")

    # Back from transformers: what save_pretrained writes imports exactly, also without our
    # config block (a Mixtral trained or fine-tuned elsewhere).
    hf.save_pretrained(str(tmp_path / "resaved"))
    config_json = json.load(open(tmp_path / "resaved" / "config.json"))
    del config_json["rmoe_jax"]
    json.dump(config_json, open(tmp_path / "resaved" / "config.json", "w"))
    cfg2, params2 = export.import_export(str(tmp_path / "resaved"))
    assert (cfg2.router.name, cfg2.tie_embeddings, cfg2.rope_theta, cfg2.rms_norm_eps) == (
        "linear", True, 500.0, 1e-5)
    assert_trees_equal(params, params2)


def test_rmoe_export_matches_a_torch_gru_router_on_mixtral(tmp_path):
    from torch_rmoe_reference import load_torch_rmoe

    cfg = small_model("recurrent", num_layers=4)
    params = random_params(cfg, seed=5)
    out = export.export_model(cfg, params, str(tmp_path / "rmoe"))
    reference = load_torch_rmoe(out)
    tokens = tokens_for(cfg, seed=6, shape=(3, 16))
    ours = np.asarray(forward(build_model(cfg), params, jnp.asarray(tokens)))
    with torch.no_grad():
        theirs = reference(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    diff = float(np.abs(ours - theirs).max())
    print(f"max |logits - torch RMoE logits| = {diff:.2e}")
    assert diff < 1e-4
    # The comparison can see the recurrence: restarting from h = 0 in every layer changes it.
    for gate in (layer.mlp.gate for layer in reference.model.layers):
        gate.layer = 0
    with torch.no_grad():
        no_recurrence = reference(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - no_recurrence).max() > 1e-2


def test_refuses_a_non_empty_target_unless_overwrite(tmp_path):
    cfg = small_model("linear")
    params = random_params(cfg)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(export.ExportError, match="not empty"):
        export.export_model(cfg, params, str(target))
    assert os.listdir(target) == ["keep.txt"]
    export.export_model(cfg, params, str(target), overwrite=True)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary leftovers
    empty = tmp_path / "empty"
    empty.mkdir()
    export.export_model(cfg, params, str(empty))  # an empty folder is fine


def test_bfloat16_export_writes_bf16_tensors(tmp_path):
    cfg = small_model("recurrent", **{"router.cell": "lstm"})
    params = random_params(cfg)
    out = export.export_model(cfg, params, str(tmp_path / "bf16"), dtype="bfloat16")
    with safe_open(os.path.join(out, "model.safetensors"), framework="np") as f:
        dtypes = {f.get_tensor(name).dtype for name in f.keys()}
    assert dtypes == {np.dtype(ml_dtypes.bfloat16)}
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    cfg2, params2 = export.import_export(out)
    rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    assert_trees_equal(rounded, params2)  # float32 params holding the bf16 values


def test_tiny_max_shard_size_writes_an_index_that_loads(tmp_path):
    cfg = small_model("linear")
    params = random_params(cfg)
    out = export.export_model(cfg, params, str(tmp_path / "sharded"), max_shard_size="20KB")
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert len(shards) > 3 and all(f.startswith("model-") and "-of-" in f for f in shards)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(
        t.nbytes for t in export.to_torch_tensors(cfg, params).values())
    for shard in shards:  # every shard within the limit unless it holds one big tensor
        size = sum(t.nbytes for t in load_file(os.path.join(out, shard)).values())
        assert size <= 20_000 or len(load_file(os.path.join(out, shard))) == 1
    _, params2 = export.import_export(out)
    assert_trees_equal(params, params2)
    hf = transformers.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32)
    np.testing.assert_array_equal(  # the last shard's tensor too
        hf.lm_head.weight.detach().numpy(), np.asarray(params["lm_head"]["kernel"]).T)


def test_workdir_checkpoint_exports_through_the_cli(tmp_path):
    """A workdir written with the trainer's Checkpointer -> CLI export -> import gives its params."""
    import optax

    from rmoe_jax.checkpoint import Checkpointer
    from rmoe_jax.config import default_config
    from rmoe_jax.train.state import TrainState

    config = default_config()
    config.model = small_model("recurrent")
    params = random_params(config.model)
    state = TrainState(step=jnp.asarray(7, jnp.int32), params=jax.tree.map(jnp.asarray, params),
                       opt_state=optax.adam(1e-3).init(params))
    workdir = tmp_path / "run"
    config_json = json.loads(config.to_json_best_effort())
    with Checkpointer(str(workdir / "checkpoints"), async_save=False) as ckpt:
        ckpt.save(3, state, data_state={"epoch": 0}, config=config_json)
        ckpt.save(7, state, data_state={"epoch": 1}, config=config_json)

    loaded = export.load_workdir(str(workdir), step=3)
    assert loaded.step == 3 and loaded.config.model.to_dict() == config.model.to_dict()
    assert_trees_equal(params, loaded.params)
    out = tmp_path / "exported"
    assert export.main(["--workdir", str(workdir), "--out", str(out)]) == 0
    block = json.load(open(out / "config.json"))["rmoe_jax"]
    assert block["source"]["step"] == 7 and block["tokenizer"] == {"type": "byte"}
    assert block["data"]["dataset"] == config.data.dataset
    cfg2, params2 = export.import_export(str(out))
    assert_trees_equal(params, params2)
    # A second export into the same folder is refused (exit status 2), the first kept.
    assert export.main(["--workdir", str(workdir), "--out", str(out), "--step", "3"]) == 2
    assert json.load(open(out / "config.json"))["rmoe_jax"]["source"]["step"] == 7
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "x"), "--step", "5"]) == 2


def test_sentencepiece_model_travels_with_the_export(tmp_path):
    from rmoe_jax.config import data_config
    from rmoe_jax.data import make_tokenizer, train_sentencepiece
    from rmoe_jax.generate import encode_prompt

    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "of", "and", "to", "thou", "art", "my", "lord"]
    docs = [(" ".join(rng.choice(words, 400)) + "\n").encode() for _ in range(5)]
    model_file = train_sentencepiece(docs, str(tmp_path / "sp" / "sp.model"), 285)
    data = data_config()
    data.tokenizer = "sentencepiece"
    data.sentencepiece_model = str(model_file)
    cfg = small_model("recurrent", vocab_size=288)
    out = export.export_model(cfg, random_params(cfg), str(tmp_path / "export"), data_config=data,
                              tokenizer_file=str(model_file))
    assert open(os.path.join(out, "tokenizer.model"), "rb").read() == model_file.read_bytes()
    config_json = json.load(open(os.path.join(out, "config.json")))
    assert config_json["rmoe_jax"]["tokenizer"] == {"type": "sentencepiece", "file": "tokenizer.model"}
    assert (config_json["bos_token_id"], config_json["pad_token_id"]) == (2, 0)
    exported = export.read_export(out)
    assert exported.data_config.sentencepiece_model == os.path.join(out, "tokenizer.model")
    tokenizer = make_tokenizer(exported.data_config)
    assert encode_prompt(tokenizer, "the king")[0] == tokenizer.bos_id == 2
    assert tokenizer.decode(encode_prompt(tokenizer, "the king")) == "the king"


def _train_tokenizer_json(path, texts, specials=("<s>", "<pad>")) -> str:
    """A byte-level BPE tokenizer.json trained here with the `tokenizers` library."""
    import tokenizers

    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320, special_tokens=list(specials),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    return str(path)


def test_tokenizer_json_travels_with_the_export_and_opens_in_transformers(tmp_path):
    from rmoe_jax.config import data_config
    from rmoe_jax.data import make_tokenizer
    from rmoe_jax.generate import encode_prompt

    text = "the king and the queen of Dänemark, 東京 "
    path = _train_tokenizer_json(tmp_path / "tokenizer.json", [text * 20])
    data = data_config()
    data.tokenizer, data.tokenizer_file = "huggingface", path
    cfg = small_model("recurrent", vocab_size=320)
    out = export.export_model(cfg, random_params(cfg), str(tmp_path / "export"), data_config=data,
                              tokenizer_file=path)
    assert open(os.path.join(out, "tokenizer.json"), "rb").read() == open(path, "rb").read()
    config_json = json.load(open(os.path.join(out, "config.json")))
    assert config_json["rmoe_jax"]["tokenizer"] == {"type": "huggingface", "file": "tokenizer.json"}
    # The separator the pipeline puts before documents (<s>, id 0 as trained) is the BOS.
    assert (config_json["bos_token_id"], config_json["pad_token_id"]) == (0, 1)
    exported = export.read_export(out)
    assert exported.data_config.tokenizer_file == os.path.join(out, "tokenizer.json")
    tokenizer = make_tokenizer(exported.data_config)
    prompt = encode_prompt(tokenizer, text)
    assert prompt[0] == tokenizer.bos_id == 0 and tokenizer.decode(prompt[1:]) == text
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert hf.encode(text, add_special_tokens=False) == prompt[1:].tolist()
    assert (hf.bos_token, hf.pad_token) == ("<s>", "<pad>")


def test_damaged_exports_are_refused_naming_the_file_field_or_tensor(tmp_path, capsys):
    """Read-side faults: each export is refused (ExportError; evaluate/generate exit 2 with one
    line) naming the file, the config.json field or the tensor, and the folder is left as it was."""
    import shutil

    from rmoe_jax import evaluate, generate

    cfg = small_model("recurrent")  # 3 layers, 4 experts
    good = export.export_model(cfg, random_params(cfg), str(tmp_path / "good"))

    def damaged(name, change):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
        with pytest.raises(export.ExportError) as info:
            export.import_export(str(folder))
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == files  # nothing touched
        return folder, str(info.value)

    def edit_config(**fields):
        def change(folder):
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, **fields}))
        return change

    _, msg = damaged("experts", edit_config(num_local_experts=8))
    assert "config.json disagrees with its tensors: num_local_experts is 8 but the tensors hold 4 " \
           "experts per layer (the last: model.layers.0.block_sparse_moe.experts.3.w1.weight)" in msg
    _, msg = damaged("layers", edit_config(num_hidden_layers=2))
    assert "num_hidden_layers is 2 but the tensors hold 3 layers (model.layers.0.* to " \
           "model.layers.2.*)" in msg

    def truncate(folder):
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    folder, msg = damaged("truncated", truncate)
    assert msg.startswith(f"{folder}/model.safetensors is damaged or truncated (")

    folder, msg = damaged("not_json", lambda f: (f / "config.json").write_text('{"rmoe_jax": {'))
    assert msg.startswith(f"{folder}/config.json is not valid JSON (")

    def poison(folder):
        path = str(folder / "model.safetensors")
        tensors = load_file(path)
        q = tensors["model.layers.1.self_attn.q_proj.weight"].copy()
        q.flat[[0, 5]] = [np.nan, np.inf]
        tensors["model.layers.1.self_attn.q_proj.weight"] = q
        save_file(tensors, path, metadata={"format": "pt"})
    folder, msg = damaged("nan", poison)
    assert f"{folder}: non-finite values (NaN or inf) in 1 tensor: " \
           f"model.layers.1.self_attn.q_proj.weight (2 of {q_size(cfg)} values)" in msg

    # The consumers of the read path refuse it too: exit status 2, one line.
    capsys.readouterr()
    assert evaluate.main(["--export", str(folder), "--split", "test"]) == 2
    assert generate.main(["--export", str(folder), "--prompt", "a", "--max_new_tokens", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") and "q_proj.weight (2 of" in line
                                 for line in err), err


def q_size(cfg) -> str:
    head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
    return f"{cfg.num_heads * head_dim * cfg.d_model:,}"
