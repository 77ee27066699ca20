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
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any, List, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.futures import future as ocp_future
from orbax.checkpoint._src.handlers import async_checkpoint_handler

STATE, DATA, CONFIG = "state", "data", "config"


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
        json_handler = ocp.JsonCheckpointHandler(filename="config.json")
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
        return self._manager.save(
            step,
            args=ocp.args.Composite(**{
                STATE: ocp.args.StandardSave(state),
                DATA: DataStateSave(data_state),
                CONFIG: ocp.args.JsonSave(config),
            }),
            force=True,
        )

    def wait(self) -> None:
        """Block until every started save is finalized (complete on disk)."""
        self._manager.wait_until_finished()

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
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
