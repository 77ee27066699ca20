"""Evaluation counts every target token of a split exactly once, the partial last window too."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmoe_jax import evaluate, export
from rmoe_jax.config import default_config
from rmoe_jax.model import build_model

from helpers import small_model

SEQ_LEN = 16
DOC_LENGTHS = (50, 37, 70)  # 157 bytes: 156 targets = 9 full windows of 16 + one of 12


@pytest.fixture
def tiny_split(tmp_path, monkeypatch):
    """A data config whose every split is three short documents (no dataset on disk needed)."""
    from rmoe_jax.data import sources

    rng = np.random.default_rng(0)
    docs = [bytes(rng.integers(32, 127, n).astype(np.uint8)) for n in DOC_LENGTHS]
    monkeypatch.setattr(sources, "read_documents", lambda data, split: list(docs))
    data = default_config().data
    data.dataset = "shakespeare"
    data.tokenizer = "byte"
    data.seq_len = SEQ_LEN
    data.data_dir = str(tmp_path / "data")  # a fresh key for the loader's stream cache
    return data, np.frombuffer(b"".join(docs), np.uint8).astype(np.int32)


def random_params(cfg, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (rng.normal(size=s.shape) * scale).astype(s.dtype),
                        export.abstract_params(cfg))


def direct_loss_sum(cfg, params, stream):
    """Sum of -log p(target) over every target of the stream, windows run one by one."""
    model = build_model(cfg)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    n = stream.size
    starts = range(0, n - 1, SEQ_LEN)
    total, count = 0.0, 0
    full = [s for s in starts if s + SEQ_LEN + 1 <= n]
    last = [s for s in starts if s + SEQ_LEN + 1 > n]
    pieces = [(np.stack([stream[s:s + SEQ_LEN] for s in full]),
               np.stack([stream[s + 1:s + SEQ_LEN + 1] for s in full]))]
    pieces += [(stream[s:n - 1][None], stream[s + 1:n][None]) for s in last]  # the short one
    for inputs, targets in pieces:
        logits = np.asarray(forward(params, jnp.asarray(inputs)), np.float64)
        logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                      keepdims=True)) - logits.max(-1, keepdims=True)
        total -= np.take_along_axis(logp, targets[..., None], -1).sum()
        count += targets.size
    return total, count


def test_every_token_counted_once_with_a_partial_last_window(tiny_split):
    data, stream = tiny_split
    cfg = small_model("recurrent", vocab_size=256)
    params = random_params(cfg)
    result = evaluate.evaluate_split(cfg, params, data, split="test", batch_size=3)
    expected_sum, expected_count = direct_loss_sum(cfg, params, stream)
    assert expected_count == stream.size - 1 == 156
    assert result["tokens"] == expected_count and result["split_targets"] == expected_count
    assert result["batches"] == 4 and result["complete"]  # 10 windows in batches of 3
    np.testing.assert_allclose(result["ce_sum"], expected_sum, rtol=1e-5)
    np.testing.assert_allclose(result["loss"], expected_sum / expected_count, rtol=1e-5)
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2))
    # Deterministic, and the batch size changes nothing but the padding.
    again = evaluate.evaluate_split(cfg, params, data, split="test", batch_size=3)
    assert again["ce_sum"] == result["ce_sum"]


def test_cli_from_a_workdir_and_from_its_export(tiny_split, tmp_path, capsys):
    import optax

    from rmoe_jax.checkpoint import Checkpointer
    from rmoe_jax.train.state import TrainState

    data, stream = tiny_split
    config = default_config()
    config.model = small_model("linear", vocab_size=256)
    config.data = data
    config.train.eval_batch_size = 4
    params = random_params(config.model, seed=1)
    state = TrainState(step=jnp.asarray(5, jnp.int32), params=jax.tree.map(jnp.asarray, params),
                       opt_state=optax.sgd(0.1).init(params))
    workdir = tmp_path / "run"
    with Checkpointer(str(workdir / "checkpoints"), async_save=False) as ckpt:
        ckpt.save(5, state, data_state={}, config=json.loads(config.to_json_best_effort()))

    assert evaluate.main(["--workdir", str(workdir), "--split", "test"]) == 0
    from_workdir = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_workdir["tokens"] == stream.size - 1 and from_workdir["step"] == 5
    assert from_workdir["batch_size"] == 4  # the run's eval batch size
    expected_sum, _ = direct_loss_sum(config.model, params, stream)
    np.testing.assert_allclose(from_workdir["ce_sum"], expected_sum, rtol=1e-5)

    out = tmp_path / "export"
    export.export_workdir(str(workdir), str(out))
    assert evaluate.main(["--export", str(out), "--split", "test", "--batch_size", "4"]) == 0
    from_export = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_export["ce_sum"] == from_workdir["ce_sum"]
    assert from_export["bits_per_byte"] == from_workdir["bits_per_byte"]
    assert evaluate.main(["--workdir", str(workdir), "--split", "test", "--step", "9"]) == 2
    assert "no checkpoint for step 9" in capsys.readouterr().err


def test_slices_of_a_split_count_their_windows(tiny_split, tmp_path, capsys):
    """`--split 'test[:50%]'` (the --help example's form): the first half of the split's windows;
    the two halves count every target of the split once. An empty slice: exit 2, one line."""
    data, stream = tiny_split
    cfg = small_model("recurrent", vocab_size=256)
    params = random_params(cfg)
    whole = evaluate.evaluate_split(cfg, params, data, split="test", batch_size=3)
    head = evaluate.evaluate_split(cfg, params, data, split="test[:50%]", batch_size=3)
    tail = evaluate.evaluate_split(cfg, params, data, split="test[50%:]", batch_size=3)
    assert head["tokens"] == 5 * SEQ_LEN and head["complete"]  # 5 of the 10 windows
    assert head["tokens"] + tail["tokens"] == whole["tokens"] == stream.size - 1
    np.testing.assert_allclose(head["ce_sum"] + tail["ce_sum"], whole["ce_sum"], rtol=1e-6)

    out = export.export_model(cfg, params, str(tmp_path / "export"), data_config=data)
    capsys.readouterr()
    assert evaluate.main(["--export", out, "--split", "test[:0%]"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: split 'test[:0%]' of shakespeare selects no windows: test has 10 "
                   f"windows of data.seq_len={SEQ_LEN} tokens, the slice keeps [0:0)\n")
