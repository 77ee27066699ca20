"""Command-line mistakes: exit status 2 and one `error:` line naming the flag, file or field (a
traceback only with --verbosity), nothing written; no libtpu noise on a machine without a TPU.

The real commands run in subprocesses (their exit status is the point); a flag mistake is
reported before JAX is imported, so most of them take a fraction of a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from rmoe_jax import cli, platforms
from rmoe_jax.config import default_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPO = "error: --config.model.num_expert: no such field (did you mean --config.model.moe.num_experts?)"


def run(*args: str, env: dict | None = None, timeout: int = 180) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_error_line(result, expected: str, prefix: bool = False) -> None:
    code, out, err = result
    assert code == 2, (code, out, err)
    assert out == "" and err.count("\n") == 1, (out, err)
    line = err.rstrip("\n")
    assert line.startswith(expected) if prefix else line == expected, line


@pytest.mark.parametrize("command", [
    ["train.py", "--workdir", "{tmp}/run"],
    ["-m", "rmoe_jax.aot"],
    ["-m", "rmoe_jax.compare", "--out", "{tmp}/run"],
    ["-m", "rmoe_jax.param_count"],
])
def test_a_misspelled_override_in_every_config_cli(command, tmp_path):
    args = [a.format(tmp=tmp_path) for a in command]
    assert_one_error_line(run(*args, "--config", "configs/tiny.py", "--config.model.num_expert=4"),
                          TYPO)
    assert not (tmp_path / "run").exists()


def test_aot_topology_and_param_count_values():
    assert_one_error_line(run("-m", "rmoe_jax.aot", "--config", "configs/tiny.py", "--topology",
                              "v5p:3x3"),
                          "error: --topology v5p:3x3: unknown TPU topology 'v5p:3x3': v5p slices "
                          "have 3 dimensions, e.g. v5p:2x2x2")
    code, out, err = run("-m", "rmoe_jax.param_count", "--config", "configs/tiny.py",
                         "--config.model.moe.top_k=20")
    assert code == 2 and out == "" and "model.moe.top_k: 20 is larger than num_experts=8" in err
    assert "Traceback" not in err


def test_train_flag_and_config_mistakes(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("an earlier run's file")
    train = ["train.py", "--workdir", str(workdir)]
    tiny = ["--config", "configs/tiny.py"]
    assert_one_error_line(run(*train, "--config", "configs/nope.py"),
                          f"error: --config configs/nope.py: no such file ({REPO}/configs/nope.py); "
                          "pass a config file such as configs/tiny.py", prefix=True)
    assert_one_error_line(run(*train, *tiny, "--config.model.moe.num_experts=four"),
                          "error: --config.model.moe.num_experts=four: 'four' is not an int (the "
                          "config's value: 8)")
    assert_one_error_line(run(*train, *tiny, "--config.model.router.bias=maybe"),
                          "error: --config.model.router.bias=maybe: 'maybe' is not a bool (True "
                          "or False) (the config's value: False)")
    assert_one_error_line(run(*train), "error: --config is required (e.g. --config "
                                       "configs/tiny.py)")
    assert_one_error_line(run(*train, *tiny, "--workdri=x"),
                          "error: Unknown command line flag 'workdri'", prefix=True)
    assert_one_error_line(run(*train, *tiny, "extra"),
                          "error: unexpected argument 'extra'", prefix=True)
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    raise RuntimeError('boom')\n")
    assert_one_error_line(run(*train, "--config", str(broken)),
                          f"error: --config {broken}: loading the config failed: RuntimeError: "
                          "boom (add --verbosity=1 for the traceback)")
    # --verbosity: the traceback, then the same line.
    code, _, err = run(*train, *tiny, "--config.model.num_expert=4", "--verbosity=1")
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.rstrip("\n").splitlines()[-1] == TYPO
    assert sorted(os.listdir(workdir)) == ["keep.txt"]  # nothing written, nothing lost


def test_train_refuses_a_workdir_it_cannot_write_before_any_work(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("keep me")
    tiny = ["--config", "configs/tiny.py"]
    assert_one_error_line(run("train.py", *tiny, "--workdir", str(plain)),
                          f"error: --workdir {plain}: is a file, not a directory", prefix=True)
    assert_one_error_line(run("train.py", *tiny, "--workdir", str(plain / "sub")),
                          f"error: --workdir {plain / 'sub'}: {plain} is a file", prefix=True)
    assert plain.read_text() == "keep me"
    # /sys cannot hold new folders (read-only, or no permission), whoever runs the tests.
    assert_one_error_line(run("train.py", *tiny, "--workdir", "/sys/rmoe_jax_test_run"),
                          "error: --workdir /sys/rmoe_jax_test_run: cannot create", prefix=True)


def test_train_with_a_garbage_enwik8_zip(tmp_path):
    data_dir = tmp_path / "data"
    zip_path = data_dir / "downloads" / "manual" / "enwik8.zip"
    zip_path.parent.mkdir(parents=True)
    zip_path.write_bytes(b"this is not a zip file" * 100)
    args = ["train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"),
            "--config.data.dataset=enwik8", "--config.data.allow_download=False",
            f"--config.data.data_dir={data_dir}"]
    assert_one_error_line(run(*args), f"error: {zip_path} is not a readable zip file (File is "
                                      "not a zip file): replace it with enwik8.zip", prefix=True)
    assert zip_path.read_bytes() == b"this is not a zip file" * 100
    assert not (tmp_path / "run").exists()  # the data failed before any work
    with zipfile.ZipFile(zip_path, "w") as zf:  # a zip of the wrong size: names the fields
        zf.writestr("enwik8", b"x" * 1000)
    code, _, err = run(*args)
    assert code == 2 and err.count("\n") == 1 and "data.enwik8_train_bytes=90000000" in err


# -- the helpers behind the messages ----------------------------------------------------------

def test_overrides_suggest_the_field_and_check_its_type():
    config = default_config()
    assert cli.suggest_fields(config, "model.num_expert") == ["model.moe.num_experts"]
    assert cli.suggest_fields(config, "modle.router.nmae") == ["model.router.name"]
    with pytest.raises(cli.CliError, match=r"^--set model.router.nmae: no such field \(did you "
                                           r"mean --set model.router.name\?\)$"):
        cli.apply_overrides(config, {"model.router.nmae": "linear"})
    with pytest.raises(cli.CliError, match="expected an int like the config's value 8"):
        cli.apply_overrides(config, {"model.num_layers": "2"})
    cli.apply_overrides(config, {"model.num_layers": 2, "train.learning_rate": 1})  # int -> float
    assert (config.model.num_layers, config.train.learning_rate) == (2, 1.0)


def test_writable_dir_problem(tmp_path):
    assert cli.writable_dir_problem(str(tmp_path / "new" / "run"), "--workdir") is None
    assert not (tmp_path / "new").exists()  # the check creates nothing
    (tmp_path / "f").write_text("")
    assert "is a file" in cli.writable_dir_problem(str(tmp_path / "f"), "--out", write=False)


# -- platforms ----------------------------------------------------------------------------------

def test_platform_choice():
    assert platforms.choose({}, tpu=False, non_tpu="cpu") == "cpu"
    assert platforms.choose({}, tpu=True, non_tpu="cpu") is None  # a TPU VM: JAX's own choice
    assert platforms.choose({"JAX_PLATFORMS": ""}, tpu=False, non_tpu="cpu") is None
    assert platforms.choose({"JAX_PLATFORMS": "cpu"}, tpu=False, non_tpu="cuda,cpu") is None
    assert platforms.choose({"JAX_FORCE_TPU_INIT": "1"}, tpu=False, non_tpu="cpu") is None


@pytest.mark.skipif(platforms.tpu_attached(), reason="a TPU is attached: JAX should use it")
def test_no_libtpu_noise_without_a_tpu():
    """JAX_PLATFORMS unset, libtpu installed (requirements-test.txt): importing rmoe_jax first
    keeps JAX from starting libtpu, which would print its errors. ALLOW_MULTIPLE_LIBTPU_LOAD
    makes libtpu start even while another process (a test compiling for TPU) holds its lock."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    code, out, err = run("-c", "import rmoe_jax, os, jax; print(os.environ['JAX_PLATFORMS'], "
                               "jax.devices()[0].platform)", env=env)
    assert (code, out, err) == (0, "cpu cpu\n", "")
