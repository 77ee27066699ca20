"""Two processes x 4 CPU devices (localhost coordinator, gloo) train like one process x 8."""

import json
import os
import socket
import subprocess

import numpy as np

from rmoe_jax.checkpoint import load_workdir

from train_helpers import REPO, train_cmd

OVERRIDES = dict(train__num_steps=4, train__eval_every=0, train__checkpoint_every=4,
                 train__log_every=2, mesh__data=2, mesh__expert=4, model__moe__dispatch="dropless")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with_devices(count: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def losses(workdir) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r["loss"] for r in records if r.get("split") == "train"]


def test_two_processes_match_one(tmp_path):
    single = tmp_path / "single"
    result = subprocess.run(train_cmd(single, **OVERRIDES), cwd=REPO, env=env_with_devices(8),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    multi = tmp_path / "multi"
    port = free_port()
    processes = [
        subprocess.Popen(train_cmd(multi, **OVERRIDES) + [
            "--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            f"--process_id={i}"], cwd=REPO, env=env_with_devices(4), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]

    expected, got = losses(single), losses(multi)
    assert len(expected) == len(got) == 4
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    single_params = load_workdir(str(single)).params
    multi_params = load_workdir(str(multi)).params
    for a, b in zip(_leaves(single_params), _leaves(multi_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _leaves(tree):
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from _leaves(tree[key])
    else:
        yield np.asarray(tree)


def test_checkpoint_saved_on_one_mesh_resumes_on_another(tmp_path):
    from rmoe_jax.train import run

    from train_helpers import tiny_config

    # A constant schedule: resuming a cosine run with more steps is refused (it changes the decay).
    settings = dict(train__eval_every=0, train__checkpoint_every=2, train__log_every=2,
                    train__async_checkpoints=False, train__schedule="constant")
    straight = tmp_path / "straight"
    run(tiny_config(train__num_steps=4, mesh__data=8, **settings), str(straight))
    moved = tmp_path / "moved"
    run(tiny_config(train__num_steps=2, mesh__data=8, **settings), str(moved))
    # Resume the data-parallel checkpoint on an expert-parallel mesh: Orbax reshards it.
    run(tiny_config(train__num_steps=4, mesh__data=2, mesh__expert=4, **settings), str(moved))
    np.testing.assert_allclose(losses(moved), losses(straight), rtol=1e-5)
    for a, b in zip(_leaves(load_workdir(str(straight)).params), _leaves(load_workdir(str(moved)).params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
