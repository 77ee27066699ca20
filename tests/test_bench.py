"""Smoke test of the benchmark harness (`python -m rmoe_jax.bench`) on a toy shape: every variant
builds, runs interleaved and lands in the Markdown table. Nothing here is timed or asserted
about speed."""

import json
import os

import pytest

from rmoe_jax import bench, cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOY_CONFIG = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("tiny", {os.path.join(REPO, "configs", "tiny.py")!r})
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)


def get_config():
    config = tiny.get_config()
    m = config.model
    m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 64, 32, 2, 4, 4
    m.max_seq_len = 16
    m.moe.num_experts, m.moe.expert_hidden = 4, 32
    m.router.hidden_size = 8
    config.data.seq_len = 16
    return config
"""


def test_bench_writes_table(tmp_path):
    config = tmp_path / "toy.py"
    config.write_text(TOY_CONFIG)
    out = tmp_path / "bench.md"
    # Two compiled train steps (rmoe, smoe); e4 is the rmoe program itself (4 experts, dropless).
    table = bench.main(["--config", str(config), "--batch_size", "2", "--steps", "1", "--repeats", "2",
                        "--experts", "4", "--matmul_n", "64", "--threads", "1",
                        "--variants", "rmoe,smoe,experts,attn_fused,matmul,mixtral_torch",
                        "--config.model.attention_chunk=4", "--config.model.router.hidden_size=4",
                        "--profile", str(tmp_path / "profile"), "--out", str(out)])
    text = out.read_text()
    assert table in text
    for row in ("| rmoe |", "| smoe |", "| e4 |", "| attn_fused |", "| mixtral_torch |",
                "attention chunk 4", "fused / chunked attention step time", "RMoE / SMoE step time",
                "tokens/s, rmoe_jax RMoE / transformers Mixtral", "MFU of RMoE", "Measured matmul peak",
                "Where one `rmoe` step's time goes", "| router (backward) |", "| attention (forward) |",
                "Where one `attn_fused` step's time goes"):
        assert row in text, row
    raw = json.loads((tmp_path / "bench.json").read_text())
    assert len(raw["rmoe"]["times"]) == 2 and all(t > 0 for t in raw["rmoe"]["times"])
    assert raw["rmoe"]["model_flops"] > 0 and raw["rmoe"]["peak_bytes"] > 0
    assert raw["e4"]["times"] == raw["rmoe"]["times"]
    # The table's ratios are the JSON's per-round times, recomputed here: medians of rounds.
    import statistics

    def median(name):
        return statistics.median(raw[name]["times"])

    for label, a, b in (("RMoE / SMoE step time", "rmoe", "smoe"),
                        ("fused / chunked attention step time", "attn_fused", "rmoe"),
                        ("tokens/s, rmoe_jax RMoE / transformers Mixtral", "mixtral_torch", "rmoe")):
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert float(row.split("|")[2]) == pytest.approx(median(a) / median(b), abs=6e-4), label
    # Both JAX variants are the same model shape: the analytic FLOPs differ only by the router.
    assert raw["rmoe"]["model_flops"] > raw["smoe"]["model_flops"] > 0


def test_config_overrides_parse_and_refuse_unknown_fields(tmp_path, capsys):
    config = tmp_path / "toy.py"
    config.write_text(TOY_CONFIG)
    # --config.FIELD=VALUE (ml_collections.config_flags, as train.py and compare): each value
    # parsed as the config field's type.
    base = bench.parse_args(["--config", str(config), "--config.model.num_layers=2",
                             "--config.model.dtype=bfloat16", "--config.train.learning_rate=0.5"]).base_config
    assert (base.model.num_layers, base.model.dtype, base.train.learning_rate) == (2, "bfloat16", 0.5)
    # Each mistake: exit status 2 and one line naming the field or file (tests/test_cli_errors.py).
    for args, message in (
            (["--config.model.num_layer=2"],
             "error: --config.model.num_layer: no such field (did you mean --config.model.num_layers?)"),
            (["--config.model.num_layers=two"], "error: --config.model.num_layers=two: 'two' is not an int"),
            (["--config.model.num_layers"], "error: Missing value for flag --config.model.num_layers"),
            (["--batch_size=two"], "error: --batch_size=two: invalid literal for int()"),
            (["--nope=1"], "error: Unknown command line flag 'nope'")):
        with pytest.raises(SystemExit) as info:
            bench.main(["--config", str(config), "--variants", "matmul", *args])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as info:
        bench.main(["--config", str(tmp_path / "nope.py"), "--variants", "matmul"])
    assert info.value.code == 2
    assert f"error: --config {tmp_path / 'nope.py'}: no such file" in capsys.readouterr().err


def test_format_table_ratios():
    args = bench.parse_args(["--config", os.path.join(REPO, "configs", "tiny.py"), "--batch_size", "2",
                             "--seq_len", "16"])

    def variant(name, times, flops=1e9):
        return bench.Variant(name, None, compile_s=1.0, peak_bytes=2**20, xla_flops=flops,
                             model_flops=flops, tokens=32, times=times)

    variants = {"rmoe": variant("rmoe", [1.0, 2.0, 1.0]), "smoe": variant("smoe", [1.0, 1.0, 1.0]),
                "capacity": variant("capacity", [0.5, 0.5, 0.5]), "e8": variant("e8", [1.0, 1.0, 1.0]),
                "e64": variant("e64", [2.0, 2.0, 2.0]), "mixtral_torch": variant("mixtral_torch", [3.0] * 3),
                "matmul": variant("matmul", [0.5, 0.5, 0.5], flops=4e9)}
    text = bench.format_table(variants, args, "rmoe", "test")
    assert "| RMoE / SMoE step time | 1.000 | 1.000 | <= 1.03 |" in text
    assert "| capacity / dropless step time | 0.500 | 0.500 | - |" in text
    assert "| dropless step time, 64 / 8 experts | 2.000 | 2.000 | < 1.3 |" in text
    assert "| tokens/s, rmoe_jax RMoE / transformers Mixtral | 3.000 | 3.000 | >= 1.5 |" in text
    assert "| MFU of RMoE (model FLOPs / measured matmul peak) | 0.125 | - | >= 0.35 |" in text
    assert "Measured matmul peak: 8.0 GFLOP/s" in text


def test_model_flops_formula():
    config = cli.load_config_file(os.path.join(REPO, "configs", "enwik8_medium.py"))
    flops, active = bench.model_flops_per_step(config.model, batch_size=2, seq_len=512)
    m = config.model
    assert flops == 2 * 512 * (6 * active + 6 * m.num_layers * 512 * m.d_model)
    # active: attention 4 d^2 and 2 of 16 SwiGLU experts (3 d f each) per layer dominate.
    d, f = m.d_model, m.moe.expert_hidden
    assert active > m.num_layers * (4 * d * d + 2 * 3 * d * f)
    # RMoE's one GRU cell is applied in every layer: its FLOPs count L times.
    smoe = config.copy_and_resolve_references()
    smoe.model.router.name = "linear"
    _, smoe_active = bench.model_flops_per_step(smoe.model, batch_size=2, seq_len=512)
    p = m.router.hidden_size
    gru = 2 * 3 * p * p + 2 * 3 * p  # W_i, W_h (3p x p each) and their biases
    assert active - smoe_active > m.num_layers * gru
