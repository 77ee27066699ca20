"""RMoE exports run in transformers (issue 16): AutoModelForCausalLM with trust_remote_code.

Every recurrent-router export carries rmoe_jax/hf_remote's modeling and configuration files
and an `auto_map`. Checked here, per variant (together they cover GRU / RNN / LSTM cells, router
biases on and off, RMoE-NP, S-proj, a shared expert, renormalize off, the residual term,
cosine / XMoE heads, tied embeddings), against our own model with random O(1) params:
  * float32 logits within 1e-4 of our forward,
  * greedy `generate` (20 new tokens, KV cache) equal to `rmoe_jax.generate`'s greedy output,
  * `save_pretrained` -> `rmoe_jax.export.import_export` giving back exactly our params;
plus bf16 loading, a refused variant, and edited exports failing with the tensor's name.

No network: the remote code lands in a temporary HF_MODULES_CACHE, with HF_HUB_OFFLINE=1.
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch  # required test dependencies (requirements-test.txt): a missing one fails, never skips
import transformers
from safetensors.numpy import load_file, save_file

from rmoe_jax import export, hf_remote
from rmoe_jax.generate import SamplingConfig, generate
from rmoe_jax.model import build_model

from helpers import assert_trees_equal, random_params, small_model

# One export per entry; each combines a few options so the file stays fast.
VARIANTS = {
    "gru_biases_shared_expert": {"router.bias": True, "router.projector_bias": True,
                                 "moe.shared_expert": True, "moe.shared_expert_hidden": 12,
                                 "moe.shared_weight": 0.7, "moe.routed_weight": 0.4},
    "gru_no_biases_tied": {"tie_embeddings": True},  # the authors' RMoE tensors only
    "rnn_np_sproj_cosine": {"router.cell": "rnn", "router.no_recurrence": True,
                            "router.shared_projector": True, "router.projector_bias": True,
                            "router.head": "cosine"},
    "lstm_sproj_xmoe_residual_unrenormalized": {
        "router.cell": "lstm", "router.shared_projector": True, "router.head": "xmoe",
        "router.residual_alpha": 0.5, "router.residual_detach": True, "router.detach": True,
        "moe.renormalize": False},
}
SCALE = 0.3  # random_params: O(1) weights, so every token's top-k choice is clear-cut
LOGIT_TOLERANCE = 1e-4
MEASURED: dict[str, float] = {}  # variant -> max |logit difference|, printed at the end


@pytest.fixture(scope="module", autouse=True)
def offline_hf_cache(tmp_path_factory):
    """transformers copies remote code into HF_MODULES_CACHE: use a fresh one, offline."""
    import huggingface_hub.constants
    import transformers.dynamic_module_utils

    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_MODULES_CACHE", str(home / "modules"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        # Read at import time, so patched too (transformers may already be imported).
        mp.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(home / "modules"))
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield home
    if MEASURED:
        print("\nmax |logits - our logits| (float32): "
              + ", ".join(f"{k} {v:.1e}" for k, v in sorted(MEASURED.items())))


def our_logits(cfg, params, tokens):
    return np.asarray(build_model(cfg).apply({"params": params}, jnp.asarray(tokens))[0])


def load_hf(folder, **kwargs):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                              **kwargs)
    return model.eval()


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def tokens_for(cfg, seed, shape):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)


_EXPORTS: dict = {}


def exported(variant, tmp_path_factory):
    """(cfg, params, folder, loaded model) of one variant, exported and loaded once."""
    if variant not in _EXPORTS:
        cfg = small_model("recurrent", max_seq_len=32, **VARIANTS[variant])
        params = random_params(cfg, seed=2, scale=SCALE)
        folder = export.export_model(cfg, params, str(tmp_path_factory.mktemp(variant) / "export"))
        _EXPORTS[variant] = (cfg, params, folder, load_hf(folder))
    return _EXPORTS[variant]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_our_forward(variant, tmp_path_factory):
    cfg, params, folder, model = exported(variant, tmp_path_factory)
    assert type(model).__name__ == "LlamaMoeRNNForCausalLM"
    assert model.dtype == torch.float32
    tokens = tokens_for(cfg, seed=1, shape=(2, 16))
    diff = float(np.abs(our_logits(cfg, params, tokens) - hf_logits(model, tokens)).max())
    MEASURED[variant] = diff
    assert diff < LOGIT_TOLERANCE, diff


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generate_matches_ours(variant, tmp_path_factory):
    cfg, params, folder, model = exported(variant, tmp_path_factory)
    prompt = tokens_for(cfg, seed=3, shape=(2, 5))
    ours = generate(cfg, params, prompt, max_new_tokens=20, sampling=SamplingConfig(greedy=True))
    with torch.no_grad():
        out = model.generate(torch.as_tensor(prompt, dtype=torch.long), max_new_tokens=20,
                             do_sample=False, use_cache=True, return_dict_in_generate=True)
    assert out.cache is not None and out.cache.get_seq_length() > 0  # it decoded with a KV cache
    np.testing.assert_array_equal(out.sequences.numpy(), ours)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_pretrained_imports_back_exactly(variant, tmp_path_factory, tmp_path):
    cfg, params, folder, model = exported(variant, tmp_path_factory)
    model.save_pretrained(str(tmp_path / "resaved"))
    assert set(hf_remote.FILES) <= set(os.listdir(tmp_path / "resaved"))  # still loadable
    cfg2, params2 = export.import_export(str(tmp_path / "resaved"))
    assert cfg2.to_dict() == cfg.to_dict()
    assert_trees_equal(params, params2)
    if variant == "lstm_sproj_xmoe_residual_unrenormalized":
        # Also without our config block (e.g. edited elsewhere): the rmoe_* fields suffice.
        path = tmp_path / "resaved" / "config.json"
        config_json = json.loads(path.read_text())
        del config_json["rmoe_jax"]
        path.write_text(json.dumps(config_json))
        cfg3, params3 = export.import_export(str(tmp_path / "resaved"))
        for field in ("cell", "shared_projector", "bias", "projector_bias", "residual_alpha",
                      "residual_detach", "detach", "head", "no_recurrence"):
            assert cfg3.router[field] == cfg.router[field], field
        assert cfg3.moe.renormalize is False
        assert_trees_equal(params, params3)


def test_export_folder_ships_the_code_and_auto_map(tmp_path_factory):
    cfg, params, folder, model = exported("gru_biases_shared_expert", tmp_path_factory)
    for name in hf_remote.FILES:
        with open(os.path.join(folder, name)) as a, open(hf_remote.path(name)) as b:
            assert a.read() == b.read(), name
    config_json = json.load(open(os.path.join(folder, "config.json")))
    assert config_json["auto_map"] == hf_remote.AUTO_MAP
    assert config_json["rmoe_jax"]["remote_code_files"] == list(hf_remote.FILES)
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__name__ == "LlamaMoeRNNConfig" and config.model_type == "llama_moe_rnn"
    # The authors' LlamaMoeRNNConfig field names, and ours under rmoe_*.
    assert (config.moe_router_type, config.moe_router_rnn_hidden_size) == ("gru", 8)
    assert (config.add_moe_share_expert, config.moe_share_expert_intermediate_size) == (True, 12)
    assert (config.share_weight, config.moe_weight) == (0.7, 0.4)
    assert config.rmoe_router_bias and config.rmoe_projector_bias and config.rmoe_renormalize
    # The stack alone (AutoModel) loads from the same folder.
    base = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(base).__name__ == "LlamaMoeRNNModel"


def test_bfloat16_loading(tmp_path_factory, tmp_path):
    cfg, params, folder, model = exported("lstm_sproj_xmoe_residual_unrenormalized", tmp_path_factory)
    bf16 = load_hf(folder, dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in bf16.named_parameters()}
    assert dtypes["model.layers.0.block_sparse_moe.experts.0.w1.weight"] == torch.bfloat16
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    # The router stays float32 (its math is float32 either way).
    assert dtypes["model.rnn_router.weight_ii"] == torch.float32
    assert dtypes["model.router_projector.weight"] == torch.float32
    assert dtypes["model.layers.1.block_sparse_moe.gate.down.weight"] == torch.float32
    assert dtypes["model.layers.1.block_sparse_moe.gate.expert_embedding"] == torch.float32
    tokens = tokens_for(cfg, seed=1, shape=(2, 16))
    ours = our_logits(cfg, params, tokens)
    # A bf16 export (`--dtype bfloat16`) loads as bf16 by default (config.json's dtype).
    bf16_export = export.export_model(cfg, params, str(tmp_path / "bf16"), dtype="bfloat16")
    from_bf16_export = load_hf(bf16_export)
    assert from_bf16_export.dtype == torch.bfloat16
    for model in (bf16, from_bf16_export):
        theirs = hf_logits(model, tokens)
        diff = np.abs(ours - theirs)
        agree = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
        print(f"\nbf16: max |logits - our float32 logits| = {diff.max():.3f}, mean {diff.mean():.4f}"
              f" (logits up to {np.abs(ours).max():.1f}); same argmax at {agree:.0%} of positions")
        # Loose: bf16 rounding can flip a near-tie routing choice here and there.
        assert diff.mean() < 0.1 and diff.max() < 1.0, (diff.mean(), diff.max())
        assert agree > 0.9, agree
    with torch.no_grad():  # generate runs in bf16 too
        out = bf16.generate(torch.as_tensor(tokens[:, :5], dtype=torch.long), max_new_tokens=4,
                            do_sample=False)
    assert out.shape == (2, 9)


def test_capacity_dispatch_is_refused_naming_the_field(tmp_path):
    cfg = small_model("recurrent", **{"moe.dispatch": "capacity"})
    params = random_params(cfg)
    assert export.remote_code_problems(cfg)[0].startswith("model.moe.dispatch: 'capacity'")
    with pytest.raises(export.ExportError, match=r"model\.moe\.dispatch: 'capacity'"):
        export.export_model(cfg, params, str(tmp_path / "refused"), remote_code=True)
    assert not (tmp_path / "refused").exists()
    # Left to decide (the API default), it is exported without the code: transformers cannot
    # pick up a model that would run half-right, and our import still reads it.
    folder = export.export_model(cfg, params, str(tmp_path / "weights_only"))
    assert not set(hf_remote.FILES) & set(os.listdir(folder))
    config_json = json.load(open(os.path.join(folder, "config.json")))
    assert "auto_map" not in config_json and config_json["rmoe_jax"]["remote_code_files"] == []
    assert "model.moe.dispatch" in " ".join(config_json["rmoe_jax"]["transformers_notes"])
    with pytest.raises(ValueError):
        transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert_trees_equal(params, export.import_export(folder)[1])


def test_edited_export_fails_naming_the_tensor(tmp_path_factory, tmp_path):
    cfg, params, folder, model = exported("gru_biases_shared_expert", tmp_path_factory)

    def edited(change_config=None, change_tensors=None):
        target = tmp_path / f"edited{len(os.listdir(tmp_path))}"
        shutil.copytree(folder, target)
        if change_config:
            config_json = json.loads((target / "config.json").read_text())
            change_config(config_json)
            (target / "config.json").write_text(json.dumps(config_json))
        if change_tensors:
            tensors = load_file(str(target / "model.safetensors"))
            change_tensors(tensors)
            save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ValueError) as info:
            load_hf(str(target))
        return str(info.value)

    msg = edited(change_config=lambda c: c.update(moe_router_rnn_hidden_size=6))
    assert "model.rnn_router.weight_ir: shape [8, 8] in the checkpoint, config.json gives [6, 6]" in msg
    assert "model.layers.2.block_sparse_moe.weight2: shape [4, 8]" in msg
    msg = edited(change_tensors=lambda t: t.update(
        {"model.layers.1.block_sparse_moe.weight2": np.zeros((4, 7), np.float32)}))
    assert "model.layers.1.block_sparse_moe.weight2: shape [4, 7]" in msg
    msg = edited(change_tensors=lambda t: t.pop("model.layers.0.block_sparse_moe.bias2"))
    assert "model.layers.0.block_sparse_moe.bias2: missing" in msg
    msg = edited(change_config=lambda c: c.update(rmoe_router_bias=False))
    assert "model.layers.0.block_sparse_moe.bias2: in the checkpoint, but" in msg
    msg = edited(change_config=lambda c: c.update(moe_router_type="gru2"))
    assert "moe_router_type='gru2'" in msg


def test_cli_refuses_a_capacity_rmoe_unless_asked_to_skip_the_code(tmp_path, monkeypatch, capsys):
    from rmoe_jax.config import default_config

    config = default_config()
    config.model = small_model("recurrent", **{"moe.dispatch": "capacity"})
    params = random_params(config.model)
    checkpoint = export.WorkdirCheckpoint(config=config, params=params, step=4,
                                          workdir=str(tmp_path / "run"))
    monkeypatch.setattr(export.writer, "load_workdir", lambda workdir, step=None: checkpoint)
    out = tmp_path / "out"
    assert export.main(["--workdir", str(tmp_path / "run"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.moe.dispatch: 'capacity'" in err and "--skip_remote_code" in err
    assert not out.exists()
    assert export.main(["--workdir", str(tmp_path / "run"), "--out", str(out),
                        "--skip_remote_code"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert "auto_map" not in json.loads((out / "config.json").read_text())


def test_fine_tuning_step_reaches_the_shared_cell(tmp_path_factory):
    """Training in transformers: a loss with the balance term, gradients through the cell."""
    cfg, params, folder, _ = exported("gru_biases_shared_expert", tmp_path_factory)
    model = load_hf(folder).train()
    tokens = torch.as_tensor(tokens_for(cfg, seed=5, shape=(2, 12)), dtype=torch.long)
    out = model(tokens, labels=tokens, output_router_logits=True)
    assert out.aux_loss is not None and len(out.router_logits) == cfg.num_layers
    out.loss.backward()
    for name in ("model.rnn_router.weight_hz", "model.layers.0.block_sparse_moe.weight1",
                 "model.layers.2.block_sparse_moe.bias2", "model.layers.1.mlp_share.up_proj.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and float(grad.abs().max()) > 0, name
    # A fresh model from the config alone (e.g. to train from scratch) builds and runs.
    fresh = transformers.AutoModelForCausalLM.from_config(model.config, trust_remote_code=True)
    assert torch.isfinite(fresh(tokens).logits).all()
