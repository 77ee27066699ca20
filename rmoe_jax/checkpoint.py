"""Checkpoints: an Orbax `CheckpointManager` holding, per step, the train state, the data
iterator's state (one file per process) and the config (JSON).

Saves are asynchronous (the device arrays are copied, then written by a background thread) and
atomic: Orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames it when every item is
complete, and only finalized steps are ever listed or restored. A process killed mid-save leaves
at most a temporary directory (removed on the next start); the older steps are untouched (Orbax
deletes steps beyond `keep` only after the new step is finalized).

Layout::

    <directory>/<step>/state/     the TrainState pytree (Orbax StandardSave)
    <directory>/<step>/data/      process_<i>-of-<n>.json: the data iterator state of process i
    <directory>/<step>/config/    config.json
    <directory>/<step>/rmoe_manifest.json   size and CRC-32 of every file above

Integrity: once a step is finalized, process 0 writes its manifest (`write_manifests`, called
after each save has finished). `verify_step` re-reads every file and compares: random bytes,
a truncated file, a garbled JSON or a missing file are reported by step and file. A step
without a manifest (written by an older version, or killed in the instant between finalizing
and writing the manifest) is complete by Orbax's rename but unverified.

Reading a workdir (`load_workdir`: export, evaluate, generate, analyses): the params of one
step (no optimizer state) as numpy arrays, with its config, through a read-only manager that
never creates, cleans up or deletes anything (a live training run may be writing the next
step), after `verify_step` and a check of the param tree against the config and for NaN/inf.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import zlib
from typing import Any, Callable, List, Optional

import jax
import ml_collections
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.futures import future as ocp_future
from orbax.checkpoint._src.handlers import async_checkpoint_handler

from rmoe_jax.config_json import ConfigJSONError, full_config_from_dict
from rmoe_jax.model import abstract_params

STATE, DATA, CONFIG = "state", "data", "config"
MANIFEST = "rmoe_manifest.json"
CHECKPOINT_DIR = "checkpoints"  # a workdir's checkpoints: <workdir>/checkpoints/<step>/
_CHUNK = 16 << 20  # bytes read at a time when checksumming (checkpoint files can be GBs)


# -- integrity ------------------------------------------------------------------------------------

def _digest(path: epath.Path) -> tuple[int, int]:
    """(size, CRC-32) of a file, read in chunks."""
    size, crc = 0, 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return size, crc


def _step_files(step_dir: epath.Path) -> list[str]:
    """Every file under a step directory, relative to it (the manifest excluded)."""
    out, pending = [], [step_dir]
    while pending:  # epath has no recursive glob (it would mean one request per file on GCS)
        for path in pending.pop().iterdir():
            if path.is_dir():
                pending.append(path)
            elif path.name not in (MANIFEST, MANIFEST + ".tmp"):
                out.append(str(path.relative_to(step_dir)))
    return sorted(out)


def write_manifest(step_dir: epath.Path) -> None:
    """Record size and CRC-32 of every file of a finalized step (atomically: tmp + rename)."""
    files = {name: list(_digest(step_dir / name)) for name in _step_files(step_dir)}
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": 1, "files": files}, indent=0))
    tmp.rename(step_dir / MANIFEST)


def verify_step(step_dir: epath.Path) -> Optional[list[str]]:
    """Problems found in a step's files (empty: intact), or None when it has no manifest."""
    step_dir = epath.Path(step_dir)
    manifest = step_dir / MANIFEST
    if not manifest.exists():
        return None
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"{manifest}: unreadable manifest ({type(e).__name__})"]
    problems = []
    present = set(_step_files(step_dir))
    for name, (size, crc) in sorted(expected.items()):
        path = step_dir / name
        if name not in present:
            problems.append(f"{path}: missing")
            continue
        got_size, got_crc = _digest(path)
        if got_size != size:
            problems.append(f"{path}: {got_size} bytes, {size} when saved (truncated or extended)")
        elif got_crc != crc:
            problems.append(f"{path}: contents changed since it was saved (checksum mismatch)")
    problems += [f"{step_dir / name}: not part of the saved checkpoint" for name in sorted(present - set(expected))]
    return problems


def _encode(state: Any) -> Any:
    """JSON-able form of a data iterator state (bytes become base64)."""
    if isinstance(state, (bytes, bytearray)):
        return {"__bytes_b64__": base64.b64encode(bytes(state)).decode("ascii")}
    return state


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict) and set(obj) == {"__bytes_b64__"}:
        return base64.b64decode(obj["__bytes_b64__"])
    return obj


class DataStateHandler(async_checkpoint_handler.AsyncCheckpointHandler):
    """Saves one JSON file per process (each process reads its own shard of the data)."""

    @staticmethod
    def _filename(directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    async def async_save(self, directory: epath.Path, args: "DataStateSave") -> Optional[List[Any]]:
        text = json.dumps(_encode(args.state))  # serialise now: the iterator moves on

        async def write():
            self._filename(directory).write_text(text)

        return [ocp_future.CommitFutureAwaitingContractedSignals(write(), name="data_state_save")]

    def save(self, directory: epath.Path, args: "DataStateSave"):
        self._filename(directory).write_text(json.dumps(_encode(args.state)))

    def restore(self, directory: epath.Path, args: "DataStateRestore" = None) -> Any:
        path = self._filename(directory)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: the checkpoint was written by a different number of processes "
                f"than the {jax.process_count()} running now")
        return _decode(json.loads(path.read_text()))

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def _config_handler() -> ocp.JsonCheckpointHandler:
    """The handler of the CONFIG item (its `config.json`), for writing and for reading."""
    return ocp.JsonCheckpointHandler(filename="config.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, missing, or not the requested one."""


def _listing(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if steps else "none"


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_state: Any
    config: dict


class Checkpointer:
    """Save / restore (state, data-iterator state, config) by step, keeping the newest `keep`."""

    def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
        self.directory = epath.Path(directory)
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(STATE, ocp.args.StandardSave, ocp.StandardCheckpointHandler())
        registry.add(STATE, ocp.args.StandardRestore, ocp.StandardCheckpointHandler())
        registry.add(DATA, DataStateSave, DataStateHandler())
        registry.add(DATA, DataStateRestore, DataStateHandler())
        json_handler = _config_handler()
        registry.add(CONFIG, ocp.args.JsonSave, json_handler)
        registry.add(CONFIG, ocp.args.JsonRestore, json_handler)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              handler_registry=registry)

    # -- queries -------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    # -- save ----------------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, data_state: Any, config: dict) -> bool:
        """Start saving `step` (returns at once when async). False when it already exists."""
        if step in self._manager.all_steps():
            return False
        started = self._manager.save(
            step,
            args=ocp.args.Composite(**{
                STATE: ocp.args.StandardSave(state),
                DATA: DataStateSave(data_state),
                CONFIG: ocp.args.JsonSave(config),
            }),
            force=True,
        )
        self.write_manifests()  # Orbax finished the previous save before starting this one
        return started

    def wait(self) -> None:
        """Block until every started save is finalized (complete on disk), with its manifest."""
        self._manager.wait_until_finished()
        self.write_manifests()

    def write_manifests(self) -> None:
        """Write the manifest of every finalized step that lacks one (process 0 only)."""
        if jax.process_index() != 0:
            return
        for step in self._manager.all_steps():
            step_dir = self.directory / str(step)
            try:
                if not (step_dir / MANIFEST).exists():
                    write_manifest(step_dir)
            except (FileNotFoundError, NotADirectoryError):
                pass  # removed meanwhile by the keep-N policy

    def verify(self, step: int) -> Optional[list[str]]:
        """`verify_step` of one step: problems (empty = intact) or None (no manifest)."""
        return verify_step(self.directory / str(step))

    def set_aside(self, step: int, folder: epath.Path) -> epath.Path:
        """Move a step out of the manager's reach into `folder` (kept, never deleted)."""
        folder.mkdir(parents=True, exist_ok=True)
        target, n = folder / str(step), 1
        while target.exists():
            target, n = folder / f"{step}.{n}", n + 1
        (self.directory / str(step)).rename(target)
        self._manager.reload()
        return target

    def choose_step(self, requested: Optional[int], *, damaged_dir: epath.Path,
                    superseded_dir: epath.Path, log: Callable[[str], None]) -> Optional[int]:
        """The step to resume from: `requested`, or else the newest intact one.

        Damaged steps (a manifest that does not match the files) are moved to `damaged_dir`
        and reported; with `requested`, later steps are moved to `superseded_dir` (so the new
        saves of those steps never collide with them). None: nothing to resume from.
        Raises CheckpointError when `requested` does not exist or is damaged, or when
        checkpoints exist but none is intact.
        """
        steps = sorted(self.all_steps())
        if requested is not None:
            if requested not in steps:
                raise CheckpointError(f"train.resume_step={requested}: no such checkpoint in "
                                      f"{self.directory} (complete steps: {_listing(steps)})")
            problems = self.verify(requested)
            if problems:
                raise CheckpointError(f"train.resume_step={requested}: the checkpoint is damaged: "
                                      + "; ".join(problems))
            for later in (s for s in steps if s > requested):
                moved = self.set_aside(later, superseded_dir)
                log(f"resuming from step {requested}: later checkpoint {later} moved to {moved}")
            return requested
        for step in reversed(steps):
            problems = self.verify(step)
            if not problems:
                if problems is None:
                    log(f"checkpoint step {step} has no checksum manifest (an older version or a "
                        "save interrupted just after it completed): restoring it unverified")
                return step
            moved = self.set_aside(step, damaged_dir)
            log(f"checkpoint step {step} is damaged: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                + f"; moved to {moved}; falling back to the previous checkpoint")
        if steps:
            raise CheckpointError(f"no intact checkpoint left in {self.directory}: every step was "
                                  f"damaged (moved to {damaged_dir}); move the workdir aside to "
                                  "train from scratch")
        return None

    # -- restore -------------------------------------------------------------------------------
    def restore(self, step: Optional[int], abstract_state: Any) -> Restored:
        """Restore `step` (None = latest) onto the shapes/dtypes/shardings of `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(abstract_state),
                DATA: DataStateRestore(),
                CONFIG: ocp.args.JsonRestore(),
            }),
        )
        return Restored(step=step, state=restored[STATE], data_state=restored[DATA],
                        config=restored[CONFIG])

    def restore_config(self, step: Optional[int] = None) -> dict:
        step = self.latest_step() if step is None else step
        restored = self._manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
        return restored[CONFIG]

    def close(self) -> None:
        self.wait()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- reading a training workdir (read-only) -------------------------------------------------------

class DamagedCheckpointError(FileNotFoundError):
    """A checkpoint whose files fail their checksums or hold non-finite values."""


@dataclasses.dataclass
class WorkdirCheckpoint:
    config: ml_collections.ConfigDict  # the full experiment config saved with the step
    params: Any  # numpy arrays, the model's param tree
    step: int
    workdir: str


def _flat(tree) -> dict[tuple[str, ...], Any]:
    return {tuple(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_tree(params, abstract, where: str) -> None:
    got, want = _flat(params), _flat(abstract)
    problems = [f"{'/'.join(p)}: missing" for p in sorted(set(want) - set(got))]
    problems += [f"{'/'.join(p)}: unexpected" for p in sorted(set(got) - set(want))]
    problems += [f"{'/'.join(p)}: shape {tuple(np.shape(got[p]))}, the config gives "
                 f"{tuple(want[p].shape)}" for p in sorted(set(got) & set(want))
                 if tuple(np.shape(got[p])) != tuple(want[p].shape)]
    if problems:
        raise ConfigJSONError(f"{where} does not match its model config:\n  "
                              + "\n  ".join(problems))


def _non_finite(tensors: dict[str, Any]) -> list[str]:
    """'name (count of size values)' for every floating tensor holding NaN or inf."""
    bad = []
    for name, tensor in tensors.items():
        array = np.asarray(tensor)
        if np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16:
            count = int(array.size - np.count_nonzero(np.isfinite(array)))
            if count:
                bad.append(f"{name} ({count:,} of {array.size:,} values)")
    return bad


def _checkpoint_manager(directory: str):
    """A read-only Orbax manager over `<workdir>/checkpoints`.

    Read-only on purpose: `Checkpointer` creates the directory and cleans up unfinished
    (temporary) step directories when it opens one, which would delete the save in progress of
    a run that is still training. The item names and the config handler are `Checkpointer`'s;
    the state is read as a plain pytree (only the params of it, as numpy arrays).
    """
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler())
    registry.add(CONFIG, ocp.args.JsonRestore, _config_handler())
    options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           cleanup_tmp_directories=False)
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


def load_workdir(workdir: str, step: Optional[int] = None) -> WorkdirCheckpoint:
    """The model params (only: no optimizer state) and config of a training workdir.

    `step=None` takes the latest complete checkpoint. Params come back as numpy arrays.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} not found: --workdir must be a training workdir "
                                "(the folder given to train.py --workdir)")
    manager = _checkpoint_manager(directory)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {directory}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; complete "
                                    f"steps: {', '.join(map(str, steps))}")
        problems = verify_step(epath.Path(directory) / str(step))
        if problems:  # never read a checkpoint whose files changed since they were saved
            raise DamagedCheckpointError(
                f"the checkpoint at step {step} in {directory} is damaged: " + "; ".join(problems)
                + f". Complete steps: {', '.join(map(str, steps))}; pick another with --step")
        saved = manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
        config = full_config_from_dict(saved[CONFIG])
        target = {"params": abstract_params(config.model)}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        restored = manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                          partial_restore=True)}))
    finally:
        manager.close()
    params = restored[STATE]["params"]
    _check_tree(params, target["params"], f"checkpoint {directory}/{step}")
    bad = _non_finite({"/".join(path): x for path, x in _flat(params).items()})
    if bad:
        raise DamagedCheckpointError(
            f"the checkpoint at step {step} in {directory} holds non-finite values (NaN or inf) "
            f"in {len(bad)} tensor{'s' if len(bad) > 1 else ''}: {', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}")
    return WorkdirCheckpoint(config=config, params=params, step=int(step), workdir=workdir)


def _quiet_logs() -> None:
    """Orbax logs every restore (and that our read-only manager skips items) at WARNING."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
