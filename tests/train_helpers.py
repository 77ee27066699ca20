"""Shared by the training tests: a shrunk tiny config and a way to run train.py in a subprocess."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax

from rmoe_jax.config import set_fields

REPO = Path(__file__).resolve().parents[1]

# configs/tiny.py shrunk so that a step takes milliseconds and a compile a few seconds.
SMALL = {
    "model.d_model": 64,
    "model.num_layers": 2,
    "model.num_heads": 4,
    "model.num_kv_heads": 4,
    "model.max_seq_len": 64,
    "model.moe.num_experts": 4,
    "model.moe.expert_hidden": 64,
    "model.router.hidden_size": 32,
    "data.seq_len": 64,
    "train.batch_size": 8,
    "train.log_every": 5,
    "train.eval_batches": 4,
    "train.compilation_cache_dir": "",  # in-process: keep the cache conftest configured
}


# Shared by the single-device subprocess tests so that they compile one and the same train step
# (a constant schedule keeps num_steps out of the program; the persistent cache does the rest).
SUBPROCESS_SETTINGS = dict(train__schedule="constant", train__warmup_steps=3, train__eval_every=0,
                           mesh__data=1)


def load_config_module(name: str):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(**overrides):
    """configs/tiny.py with SMALL and `overrides` (dotted keys with '.' written as '__')."""
    config = load_config_module("tiny").get_config()
    return set_fields(config, {**SMALL, **{k.replace("__", "."): v for k, v in overrides.items()}})


def cli_overrides(**overrides) -> list[str]:
    """The same settings as `tiny_config(**overrides)`, as train.py flags."""
    merged = {**SMALL, **{k.replace("__", "."): v for k, v in overrides.items()}}
    merged["train.compilation_cache_dir"] = jax.config.jax_compilation_cache_dir or ""
    return [f"--config.{k}={v}" for k, v in merged.items()]


def train_cmd(workdir, *, script: str | None = None, **overrides) -> list[str]:
    return [sys.executable, script or str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.py"),
            "--workdir", str(workdir), *cli_overrides(**overrides)]


def run_train(workdir, *, timeout=240, script=None, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(workdir, script=script, **overrides), cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)
