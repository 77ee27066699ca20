"""Checkpoints: round trip, keep-N, atomicity; a process SIGKILLed mid-save resumes cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np

from rmoe_jax.checkpoint import Checkpointer
from rmoe_jax.train import read_metrics
from train_helpers import REPO, SUBPROCESS_SETTINGS, run_train, train_cmd


def _tree(seed):
    rng = np.random.default_rng(seed)
    return {"step": jnp.asarray(seed, jnp.int32),
            "params": {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
                       "b": jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16)}}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_round_trip_keep_n_and_data_state(tmp_path):
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for step in (10, 20, 30):
            data_state = {"grain": {"next_index": step}} if step != 20 else b"\x00raw\xffbytes"
            assert ckpt.save(step, _tree(step), data_state=data_state, config={"step": step})
        assert not ckpt.save(30, _tree(30), data_state={}, config={})  # already there
        ckpt.wait()
        assert ckpt.all_steps() == [20, 30]
        restored = ckpt.restore(None, _abstract(_tree(0)))
        assert restored.step == 30 and restored.config == {"step": 30}
        assert restored.data_state == {"grain": {"next_index": 30}}
        for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(_tree(30))):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        assert ckpt.restore(20, _abstract(_tree(0))).data_state == b"\x00raw\xffbytes"


def test_unfinished_step_directories_are_ignored(tmp_path):
    with Checkpointer(tmp_path, keep=3) as ckpt:
        ckpt.save(5, _tree(5), data_state={}, config={})
    # What a process killed mid-save leaves behind: a temporary directory, never renamed.
    partial = tmp_path / "9.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_text("half written")
    with Checkpointer(tmp_path, keep=3) as ckpt:
        assert ckpt.latest_step() == 5
        assert ckpt.restore(None, _abstract(_tree(0))).step == 5


HANG_ON_SAVE = textwrap.dedent("""
    # train.py, except that writing the data state of step $RMOE_TEST_HANG_STEP hangs (after
    # touching $RMOE_TEST_MARKER), so the test can SIGKILL the process in the middle of that save.
    import os, pathlib, re, runpy, sys, time
    sys.path.insert(0, {repo!r})
    from orbax.checkpoint._src.futures import future as ocp_future
    from rmoe_jax import checkpoint as ck

    original = ck.DataStateHandler.async_save

    async def async_save(self, directory, args):
        match = re.search(r"(\\d+)\\.orbax-checkpoint-tmp", str(directory))
        if match and match.group(1) == os.environ["RMOE_TEST_HANG_STEP"]:
            async def hang():
                pathlib.Path(os.environ["RMOE_TEST_MARKER"]).write_text(str(directory))
                time.sleep(600)
            return [ocp_future.CommitFutureAwaitingContractedSignals(hang(), name="hang")]
        return await original(self, directory, args)

    ck.DataStateHandler.async_save = async_save
    sys.argv[0] = os.path.join({repo!r}, "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def test_sigkill_during_save_resumes_from_last_complete_checkpoint(tmp_path):
    script = tmp_path / "hang_on_save.py"
    script.write_text(HANG_ON_SAVE.format(repo=str(REPO)))
    workdir, marker = tmp_path / "run", tmp_path / "saving"
    settings = dict(train__num_steps=12, train__checkpoint_every=4, train__keep_checkpoints=3,
                    **SUBPROCESS_SETTINGS)
    env = dict(os.environ, RMOE_TEST_HANG_STEP="8", RMOE_TEST_MARKER=str(marker))
    proc = subprocess.Popen(train_cmd(workdir, script=str(script), **settings), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the save of step 8 never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    ckpt_dir = workdir / "checkpoints"
    assert any(".orbax-checkpoint-tmp" in name for name in os.listdir(ckpt_dir))  # the torn save
    with Checkpointer(ckpt_dir, keep=3) as ckpt:
        assert ckpt.all_steps() == [4]
    killed_losses = {r["step"]: r["loss"] for r in read_metrics(str(workdir), "train")}
    assert max(killed_losses) >= 8

    proc = run_train(workdir, **settings)  # the same command, without the hang
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and proc.stdout.split("resumed from")[1].split()[0].endswith("/4")
    with Checkpointer(ckpt_dir, keep=3) as ckpt:
        assert ckpt.all_steps() == [4, 8, 12]  # step 4 was not lost
    assert not any(".orbax-checkpoint-tmp" in name for name in os.listdir(ckpt_dir))
    records = read_metrics(str(workdir), "train")
    assert [r["step"] for r in records] == list(range(1, 13))  # the killed run's extra records went
    resumed = {r["step"]: r["loss"] for r in records}
    # The steps redone after the restart are the very steps the killed process had computed.
    for step in range(5, 9):
        assert resumed[step] == killed_losses[step], step
