"""The training loop end to end on the real corpus: learning, bitwise resume in a new process,
preemption (SIGTERM), non-finite loss, bad configs. Subprocesses run train.py itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from rmoe_jax.checkpoint import Checkpointer
from rmoe_jax.config import ConfigError
from rmoe_jax.train import NonFiniteLossError, read_metrics, run, validate_all
from train_helpers import REPO, SUBPROCESS_SETTINGS, run_train, tiny_config, train_cmd


def tensorboard_tags(logdir) -> set[str]:
    """Scalar tags in the TensorBoard event files (TFRecord framing, parsed by hand)."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = set()
    for path in logdir.iterdir():
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            tags.update(v.tag for v in event.summary.value)
            i += 12 + n + 4
    return tags


def unigram_entropy_nats(config) -> float:
    """Entropy of the byte distribution of the raw training text (independent of the model)."""
    from rmoe_jax.data import read_documents

    raw = np.frombuffer(b"".join(read_documents(config.data, config.data.train_split)), np.uint8)
    counts = np.bincount(raw, minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_tiny_config_learns_real_text(tmp_path):
    config = tiny_config(train__num_steps=100, train__warmup_steps=10, train__learning_rate=6e-3,
                         train__final_learning_rate=6e-4, train__eval_every=50,
                         train__checkpoint_every=100, mesh__data=1)
    final = run(config, str(tmp_path))
    entropy = unigram_entropy_nats(config)
    assert 3.0 < entropy < 4.0  # English bytes: ~3.3 nats
    assert final["step"] == 100 and final["stopped"] == "completed"
    # A fresh model is near uniform over 256 bytes; training must beat the unigram model.
    assert abs(final["initial_eval_loss"] - np.log(256)) < 0.5
    assert final["eval_loss"] < entropy - 0.4, (final, entropy)
    assert final["eval_loss"] < final["initial_eval_loss"] - 2.0
    assert final["eval_bits_per_byte"] == pytest.approx(final["eval_loss"] / np.log(2))
    train = read_metrics(str(tmp_path), "train")
    assert [r["step"] for r in train] == list(range(1, 101))
    assert np.mean([r["loss"] for r in train[-10:]]) < np.mean([r["loss"] for r in train[:10]]) - 1.5
    evals = read_metrics(str(tmp_path), "eval")
    assert [r["step"] for r in evals] == [0, 50, 100]
    tags = tensorboard_tags(tmp_path / "tensorboard")
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/aux_loss", "train/balance_loss",
                "train/tokens_per_sec", "eval/loss", "eval/bits_per_byte", "moe/expert_load/layer01/expert03",
                "moe/dropped_fraction/layer01"):
        assert tag in tags, sorted(tags)
    interval = read_metrics(str(tmp_path), "interval")[-1]
    assert np.asarray(interval["stats/expert_load"]).shape == (2, 4) and interval["tokens_per_sec"] > 0
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [100]
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 100


def _state_leaves(workdir, step):
    tree = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    import jax

    return jax.tree_util.tree_flatten_with_path(tree)[0]


def test_resume_in_new_process_is_bitwise_identical(tmp_path):
    # Constant schedule (the first half must not see a different lr), dropout on (the per-step
    # rng must survive the restart), and conftest's 8 fake devices as a data x fsdp x expert
    # mesh (sharded params and optimizer state, experts on different devices).
    common = dict(train__schedule="constant", train__warmup_steps=3, train__eval_every=0,
                  train__checkpoint_every=4, model__dropout_rate=0.1,
                  mesh__data=2, mesh__fsdp=2, mesh__expert=2)
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(tiny_config(train__num_steps=12, **common), str(straight))
    run(tiny_config(train__num_steps=6, **common), str(split))
    proc = run_train(split, train__num_steps=12, **common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and proc.stdout.split("resumed from")[1].split()[0].endswith("/6")

    losses_a = [(r["step"], r["loss"]) for r in read_metrics(str(straight), "train")]
    losses_b = [(r["step"], r["loss"]) for r in read_metrics(str(split), "train")]
    assert [s for s, _ in losses_a] == list(range(1, 13))
    assert losses_b == losses_a  # bitwise: the JSON floats round-trip float32 exactly
    assert len({loss for _, loss in losses_a}) == 12

    leaves_a, leaves_b = _state_leaves(straight, 12), _state_leaves(split, 12)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, a), (_, b) in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    # ... and the params did move between the two checkpoints of the straight run.
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for (_, a), (_, b) in zip(_state_leaves(straight, 8), leaves_a))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    cmd = train_cmd(tmp_path, train__num_steps=100_000, train__checkpoint_every=100_000, train__log_every=1,
                    **SUBPROCESS_SETTINGS)
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while len(read_metrics(str(tmp_path), "train")) < 3:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM" in out
    final = json.loads(out.split("final metrics: ")[1].splitlines()[0])
    assert final["stopped"] == "preempted"
    last = read_metrics(str(tmp_path), "train")[-1]["step"]
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [last] == [final["step"]]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny_config(train__num_steps=20, train__checkpoint_every=5, train__eval_every=0,
                         train__inject_nan_at_step=7, train__grad_accum_steps=2, mesh__data=1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 8 .*Last good checkpoint: step 5"):
        run(config, str(tmp_path))
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [5]
    for path, leaf in _state_leaves(tmp_path, 5):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64))), path
    assert read_metrics(str(tmp_path), "train")[-1]["step"] == 7
    # Resuming that workdir with a different model is refused, naming the field.
    with pytest.raises(ConfigError, match=r"model\.d_model: checkpoint has 64, config has 32"):
        run(tiny_config(train__num_steps=20, mesh__data=1, model__d_model=32), str(tmp_path))


def test_bad_config_messages_name_every_field(tmp_path):
    proc = run_train(tmp_path, timeout=120, train__batch_size=0, train__learning_rate=-1.0,
                     model__router__name="bogus", model__moe__top_k=9)
    assert proc.returncode == 2
    for field in ("train.batch_size", "train.learning_rate", "model.router.name", "model.moe.top_k"):
        assert field in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_vocab_smaller_than_tokenizer_is_reported():
    config = tiny_config(model__vocab_size=100)
    with pytest.raises(ConfigError, match=r"model\.vocab_size: 100 is smaller than the tokenizer's vocabulary \(256\)"):
        validate_all(config)
    validate_all(tiny_config())  # the unchanged config is fine


@pytest.mark.slow
def test_tiny_config_as_shipped(tmp_path):
    """configs/tiny.py unchanged (the README default): a few minutes on 2 cores."""
    from train_helpers import load_config_module

    config = load_config_module("tiny").get_config()
    final = run(config, str(tmp_path))
    assert final["eval_loss"] < unigram_entropy_nats(config) - 1.0, final
