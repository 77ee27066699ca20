"""The router-comparison runner (rmoe_jax.compare) and the analysis CLI (rmoe_jax.analyze) on a
toy config: 2 routers x 1 seed x 3 steps give a complete table; a re-run resumes (skips)."""

import csv
import json
import os
import subprocess
import sys

import pytest

from rmoe_jax import analyze, compare
from rmoe_jax.config import set_fields, validate
from tests.train_helpers import REPO, load_config_module

TOY = {
    "model.d_model": 32,
    "model.num_layers": 2,
    "model.num_heads": 2,
    "model.num_kv_heads": 2,
    "model.max_seq_len": 32,
    "model.moe.num_experts": 4,
    "model.moe.expert_hidden": 32,
    "model.moe.capacity_factor": 2.0,
    "model.router.hidden_size": 16,
    "data.seq_len": 32,
    "train.batch_size": 8,
    "train.num_steps": 3,
    "train.warmup_steps": 1,
    "train.log_every": 1,
    "train.eval_every": 0,  # no in-loop eval: one compile less per router (the runner evaluates)
    "train.eval_batches": 1,
    "train.checkpoint_every": 3,
    "train.async_checkpoints": False,
    "train.compilation_cache_dir": "",  # in-process: keep the cache conftest configured
}


def toy_config():
    config = load_config_module("compare_cpu").get_config()
    return set_fields(config, TOY)


def test_every_router_row_gives_a_valid_config_that_only_changes_the_router():
    base = toy_config()
    base_dict = base.to_dict()
    for name in compare.ROUTERS:
        config = compare.run_config(base, name, seed=3)
        validate(config)
        assert config.train.seed == 3
        d = config.to_dict()
        for section in ("data", "train", "mesh"):
            assert d[section] == {**base_dict[section], **({"seed": 3} if section == "train" else {})}
        changed_moe = {k for k in d["model"]["moe"] if d["model"]["moe"][k] != base_dict["model"]["moe"][k]}
        assert changed_moe <= {"shared_expert"}, name


def test_paper_rows_are_nameable():
    labels = {r.label for r in compare.ROUTERS.values()}
    for row in ("SMoE", "HyperMoE", "SMoE-MLP", "RandomSMoE", "CosineMoE", "XMoE (q=16)", "RMoE",  # Table 1
                "RMoE-NP", "RMoE + detach", "NP + r0.5", "NP + r1.0",  # Table 5
                "S-proj + GRU", "L-proj + RNN", "L-proj + LSTM",  # Table 6
                "XMoE (q=8) + GRU", "XMoE (q=32) + GRU"):  # Table 2
        assert row in labels
    assert compare.ROUTERS["smoe"].overrides["model.router.name"] == "linear"
    assert compare.ROUTERS["rmoe_np"].overrides["model.router.no_recurrence"] is True
    with pytest.raises(ValueError, match="unknown router"):
        compare.parse_routers("smoe,nope")


def test_cli_rejects_unknown_router_and_lists_names():
    cmd = [sys.executable, "-m", "rmoe_jax.compare", "--config", str(REPO / "configs" / "compare_cpu.py"),
           "--out", "/nonexistent", "--routers"]
    bad = subprocess.run(cmd + ["smoe,bogus"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown router" in bad.stderr and "rmoe_lstm" in bad.stderr
    helped = subprocess.run(cmd + ["help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "rmoe_np" in helped.stdout


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("compare"))
    agg = compare.compare(toy_config(), ["smoe", "rmoe"], [0], out, eval_batches=1, analysis_batches=1,
                          command="test", log=lambda *a: None)
    return out, agg


def test_runner_writes_a_complete_table(compared):
    out, agg = compared
    assert set(agg["rows"]) == {"smoe", "rmoe"}
    for name, row in agg["rows"].items():
        assert row["step"] == 3
        assert row["val_bpc"]["n"] == 1 and row["test_bpc"]["mean"] > 0
        assert row["params_router"] > 0 and row["params_total"] > row["params_router"]
        assert row["step_time_s"]["mean"] > 0
        assert row["mi"]["mean"] >= 0
    assert agg["rows"]["smoe"]["delta_test"]["mean"] == 0.0
    md = open(os.path.join(out, "results.md")).read()
    assert "| smoe (SMoE) | 1 |" in md and "| rmoe (RMoE) | 1 |" in md
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["router"] for r in rows] == ["smoe", "rmoe"]
    assert all(float(r["test_bpc_mean"]) > 0 and float(r["val_loss_mean"]) > 0 for r in rows)
    for png in ("loss_curves.png", "mutual_information.png", "gate_entropy.png", "expert_load.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["runs"]) == {"smoe", "rmoe"}
    # same data order and seed: the two runs differ only in the router
    a = json.load(open(os.path.join(out, "runs", "smoe_seed0", "result.json")))["config"]
    b = json.load(open(os.path.join(out, "runs", "rmoe_seed0", "result.json")))["config"]
    assert a["train"] == b["train"] and a["data"] == b["data"]


def test_rerun_resumes_without_training(compared):
    out, agg = compared
    # a field the schema no longer has (or does not have yet) does not make a finished run stale
    path = os.path.join(out, "runs", "smoe_seed0", "result.json")
    result = json.load(open(path))
    result["config"]["model"]["field_of_another_version"] = 1
    json.dump(result, open(path, "w"))
    messages = []
    again = compare.compare(toy_config(), ["smoe", "rmoe"], [0], out, eval_batches=1, analysis_batches=1,
                            command="test", log=messages.append)
    assert sum("already finished" in m for m in messages if isinstance(m, str)) == 2
    assert again["rows"]["rmoe"]["test_bpc"] == agg["rows"]["rmoe"]["test_bpc"]


def test_analyze_cli_on_a_trained_run(compared, tmp_path, capsys):
    out, _ = compared
    workdir = os.path.join(out, "runs", "rmoe_seed0")
    assert analyze.main(["--workdir", workdir, "--batches", "1", "--out", str(tmp_path)]) == 0
    summary = json.load(open(tmp_path / "analysis.json"))
    assert len(summary["mutual_information"]["matrix"]) == 2
    assert summary["router_grad_norm"]["lm"] > 0
    assert summary["drop_ratio"]["capacity_factor"] == 2.0
    for png in ("expert_load.png", "mutual_information.png", "gate_entropy.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "cross-layer MI" in capsys.readouterr().out
    assert analyze.main(["--workdir", str(tmp_path / "missing")]) == 2


def numpy_bpc(workdir: str, split: str, batches: int) -> float:
    """Bits per byte of a run's final params, from the model's logits with a float64 NumPy
    log-softmax (independent of the runner's and evaluate's accumulation)."""
    import numpy as np

    from rmoe_jax import analysis

    config, model, params, _ = analysis.load_trained(workdir)
    nll, count = 0.0, 0.0
    for batch in analysis.eval_batches(config, split, batches):
        logits, _ = model.apply({"params": params}, batch["inputs"], deterministic=True)
        logits = np.asarray(logits, np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        picked = np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
        w = np.asarray(batch["weights"], np.float64)
        nll -= float(np.sum(picked * w))
        count += float(np.sum(w))
    return nll / count / np.log(2.0)


def test_table_bpc_equals_evaluate_and_a_numpy_reference_and_deltas_are_paired(compared, capsys):
    from rmoe_jax import evaluate

    out, agg = compared
    for router in ("smoe", "rmoe"):
        workdir = os.path.join(out, "runs", f"{router}_seed0")
        row = agg["rows"][router]
        reference = numpy_bpc(workdir, "test", batches=1)
        assert row["test_bpc"]["mean"] == pytest.approx(reference, rel=1e-5)
        assert evaluate.main(["--workdir", workdir, "--split", "test", "--max_batches", "1",
                              "--batch_size", str(TOY["train.batch_size"]),
                              "--output", os.path.join(out, f"{router}_eval.json")]) == 0
        evaluated = json.load(open(os.path.join(out, f"{router}_eval.json")))
        assert evaluated["bits_per_byte"] == pytest.approx(row["test_bpc"]["mean"], rel=1e-6)
    capsys.readouterr()
    rows = agg["rows"]
    assert rows["rmoe"]["delta_test"]["mean"] == pytest.approx(
        rows["rmoe"]["test_bpc"]["mean"] - rows["smoe"]["test_bpc"]["mean"], abs=1e-9)
    assert rows["rmoe"]["delta_test"]["mean"] != 0.0  # two different models: the check can fail
