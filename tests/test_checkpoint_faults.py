"""Fault injection: damaged checkpoints, resume refusals, a second run on a live workdir, torn
metrics lines. Each asserts the message, and that no good checkpoint was lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from etils import epath

from rmoe_jax import export
from rmoe_jax.checkpoint import Checkpointer, CheckpointError, verify_step
from rmoe_jax.config import ConfigError
from rmoe_jax.train import read_metrics, run
from rmoe_jax.train.workdir_lock import LOCK_FILE
from train_helpers import tiny_config

SETTINGS = dict(train__schedule="constant", train__warmup_steps=3, train__eval_every=0,
                train__checkpoint_every=3, train__keep_checkpoints=3, mesh__data=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir with checkpoints at steps 3 and 6 (and its per-step losses)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    run(tiny_config(train__num_steps=6, **SETTINGS), str(workdir))
    return workdir


def copy_of(trained, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(trained, target)
    return target


def largest_state_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def random_bytes(step_dir):
    path = largest_state_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 3)
        f.write(np.random.default_rng(0).bytes(512))
    return path


def truncate(step_dir):
    path = largest_state_file(step_dir)
    os.truncate(path, path.stat().st_size // 2)
    return path


def garble(relative):
    def fault(step_dir):
        path = step_dir / relative
        path.write_text(path.read_text()[:-7] + "}{garbage")
        return path
    return fault


FAULTS = {
    "random_bytes": random_bytes,
    "truncated": truncate,
    "config_json": garble("config/config.json"),
    "orbax_metadata": garble("state/_METADATA"),
    "data_state": garble("data/process_0-of-1.json"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_every_fault_is_reported_by_step_and_file(fault, trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    step_dir = workdir / "checkpoints" / "6"
    assert verify_step(epath.Path(step_dir)) == []  # intact as saved
    path = FAULTS[fault](step_dir)
    problems = verify_step(epath.Path(step_dir))
    assert problems and str(path) in problems[0], problems
    # Export and evaluate read through load_workdir: they refuse it, naming step and file.
    with pytest.raises(export.DamagedCheckpointError, match=rf"step 6 .*damaged: {path}"):
        export.load_workdir(str(workdir))
    assert export.load_workdir(str(workdir), step=3).step == 3  # the older one is fine
    # Training falls back to step 3, keeping the damaged step aside (not deleted).
    notes = []
    with Checkpointer(workdir / "checkpoints") as ckpt:
        chosen = ckpt.choose_step(None, damaged_dir=epath.Path(workdir / "damaged"),
                                  superseded_dir=epath.Path(workdir / "superseded"), log=notes.append)
        assert chosen == 3 and ckpt.all_steps() == [3]
    assert "checkpoint step 6 is damaged" in notes[0] and str(path) in notes[0]
    assert (workdir / "damaged" / "6" / path.relative_to(step_dir)).exists()


def test_training_resumes_from_the_newest_intact_step_and_reproduces_the_losses(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    random_bytes(workdir / "checkpoints" / "6")
    before = {r["step"]: r["loss"] for r in read_metrics(str(workdir), "train")}
    final = run(tiny_config(train__num_steps=6, **SETTINGS), str(workdir))
    assert final["stopped"] == "completed" and final["checkpoint_step"] == 6
    after = {r["step"]: r["loss"] for r in read_metrics(str(workdir), "train")}
    assert sorted(after) == list(range(1, 7))  # steps 4-6 redone, each logged once
    assert after == before  # from the intact step 3, the same losses again, bitwise
    assert (workdir / "checkpoints_damaged" / "6").is_dir()
    assert verify_step(epath.Path(workdir / "checkpoints" / "6")) == []


def test_resume_step_picks_an_earlier_checkpoint_and_keeps_the_later_ones(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    final = run(tiny_config(train__num_steps=6, train__resume_step=3, **SETTINGS), str(workdir))
    assert final["checkpoint_step"] == 6
    assert (workdir / "checkpoints_superseded" / "6").is_dir()
    with pytest.raises(ConfigError, match=r"train.resume_step=5: no such checkpoint .*complete steps: 3, 6"):
        run(tiny_config(train__num_steps=6, train__resume_step=5, **SETTINGS), str(workdir))


def test_no_intact_checkpoint_is_refused_not_retrained(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    for step in (3, 6):
        truncate(workdir / "checkpoints" / str(step))
    with pytest.raises(ConfigError, match="no intact checkpoint left"):
        run(tiny_config(train__num_steps=6, **SETTINGS), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints_damaged")) == ["3", "6"]  # kept


@pytest.mark.parametrize("change,field", [
    ({"model__router__no_recurrence": True}, "model.router.no_recurrence"),  # same params
    ({"train__schedule": "cosine", "train__num_steps": 9}, "train.schedule"),
])
def test_resume_refuses_a_changed_model_or_schedule_naming_the_field(change, field, trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    settings = {**SETTINGS, "train__num_steps": 6, **change}
    with pytest.raises(ConfigError, match=rf"{field}: checkpoint has"):
        run(tiny_config(**settings), str(workdir))
    flag = "allow_model_change" if field.startswith("model") else "allow_schedule_change"
    assert f"train.{flag}=True" in str(pytest.raises(ConfigError, run, tiny_config(**settings),
                                                     str(workdir)).value)


def test_extending_a_cosine_run_is_refused(tmp_path):
    cosine = {**SETTINGS, "train__schedule": "cosine"}
    run(tiny_config(train__num_steps=3, **cosine), str(tmp_path))
    with pytest.raises(ConfigError, match=r"train.num_steps: checkpoint has 3, config has 6"):
        run(tiny_config(train__num_steps=6, **cosine), str(tmp_path))
    final = run(tiny_config(train__num_steps=6, train__allow_schedule_change=True, **cosine), str(tmp_path))
    assert final["step"] == 6


def test_a_second_run_on_a_live_workdir_is_refused_and_a_stale_lock_taken_over(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    lock = workdir / LOCK_FILE
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename, "started": "now"}))
        with pytest.raises(ConfigError, match=rf"in use by another training run \(process {live.pid}"):
            run(tiny_config(train__num_steps=6, **SETTINGS), str(workdir))
        assert Checkpointer(workdir / "checkpoints").all_steps() == [3, 6]  # untouched
    finally:
        live.kill()
        live.wait()
    # The same lock once its process is gone: stale, taken over, released at the end.
    final = run(tiny_config(train__num_steps=6, **SETTINGS), str(workdir))
    assert final["step"] == 6 and not lock.exists()


def test_torn_metrics_line_and_stale_rows_before_the_first_checkpoint(tmp_path):
    # A run killed before its first checkpoint left rows (eval step 0, steps 1-2) and a torn line.
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"split": "eval", "step": 0, "loss": 5.0}\n'
                       '{"split": "train", "step": 1, "loss": 5.5}\n{"split": "train", "ste')
    run(tiny_config(train__num_steps=3, **{**SETTINGS, "train__eval_every": 3}), str(tmp_path))
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 3]
    assert all(line.startswith("{") and line.endswith("}") for line in metrics.read_text().splitlines())
    # A torn last line after a checkpoint: the resume drops it and appends after it.
    with open(metrics, "a") as f:
        f.write('{"split": "train", "step": 4, "lo')
    run(tiny_config(train__num_steps=4, **{**SETTINGS, "train__eval_every": 3}), str(tmp_path))
    steps = [r["step"] for r in read_metrics(str(tmp_path), "train")]
    assert steps == [1, 2, 3, 4]
    json.loads(metrics.read_text().splitlines()[-1])  # every line is whole


def test_kill_9_at_arbitrary_points_then_resume_gives_the_straight_losses(tmp_path):
    """Three SIGKILLs at arbitrary moments (mid-step, mid-save, mid-start), then one plain
    re-run: every step logged once, the losses bitwise those of an uninterrupted run, every
    checkpoint left on disk intact."""
    import signal
    import time

    from train_helpers import REPO, SUBPROCESS_SETTINGS, run_train, train_cmd

    settings = dict(SUBPROCESS_SETTINGS, train__num_steps=14, train__checkpoint_every=2,
                    train__keep_checkpoints=10, train__log_every=1)
    straight = run_train(tmp_path / "straight", **settings)
    assert straight.returncode == 0, straight.stderr[-2000:]
    workdir = tmp_path / "killed"
    rng = np.random.default_rng(7)
    for _ in range(3):
        proc = subprocess.Popen(train_cmd(workdir, **settings), cwd=REPO, env=dict(os.environ),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = len(read_metrics(str(workdir), "train")) + int(rng.integers(1, 4))
        deadline = time.time() + 180
        while len(read_metrics(str(workdir), "train")) < target and proc.poll() is None:
            assert time.time() < deadline, "training did not progress"
            time.sleep(float(rng.uniform(0.01, 0.2)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    final = run_train(workdir, **settings)
    assert final.returncode == 0, final.stderr[-2000:]
    losses = lambda w: [(r["step"], r["loss"]) for r in read_metrics(str(w), "train")]  # noqa: E731
    assert losses(workdir) == losses(tmp_path / "straight")
    for step_dir in (workdir / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            assert verify_step(epath.Path(step_dir)) in ([], None), step_dir
