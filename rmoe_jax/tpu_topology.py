"""Abstract TPU devices of a pod slice, on a machine without a TPU (libtpu must be installed).

    devices = topology_devices("v5p:2x2x1")   # 4 abstract TPU v5p chips
    jax.jit(step).lower(<ShapeDtypeStructs sharded over a Mesh of them>).compile()

Names are `GENERATION:TOPOLOGY`: v4 and v5p slices are 3-D (`v5p:2x2x1`, `v5p:4x4x4`), v5e and
v6e slices 2-D (`v6e:2x2`, `v6e:4x8`). `pip install libtpu==0.0.42.1` (what `jax[tpu]==0.10.2`
pins) provides the TPU compiler.

libtpu, loaded without a TPU attached, warns that it cannot determine the accelerator type and
the worker hostnames (it asks the Cloud metadata server); `configure_libtpu_env` sets the
variables that answer those questions, only where they are unset and before libtpu is loaded.
"""

from __future__ import annotations

import math
import os
import re

# generation -> (dimensions of the topology, TensorCores per chip as counted by the accelerator
# type name: a v5p-8 slice is 4 chips, a v6e-8 slice 8 chips).
GENERATIONS = {"v4": (3, 2), "v5p": (3, 2), "v5e": (2, 1), "v6e": (2, 1)}
_NAME = re.compile(r"^(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)$")


class TopologyError(ValueError):
    """A topology name that is malformed or unknown; the message lists what is accepted."""


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """`'v5p:2x2x1'` -> `('v5p', (2, 2, 1))`; raises `TopologyError` naming the problem."""
    match = _NAME.match(name.strip())
    examples = "v5p:2x2x1, v5p:4x4x4, v4:2x2x2, v5e:2x2, v6e:2x2, v6e:4x8"
    if not match:
        generation = name.split(":")[0]
        if generation not in GENERATIONS:
            raise TopologyError(f"unknown TPU topology {name!r}: the generation {generation!r} is not "
                                f"one of {', '.join(GENERATIONS)} (examples: {examples})")
        raise TopologyError(f"unknown TPU topology {name!r}: expected GENERATION:AxBxC "
                            f"(examples: {examples})")
    generation, dims = match.group(1), tuple(int(d) for d in match.group(2).split("x"))
    want = GENERATIONS[generation][0]
    if len(dims) != want or min(dims) < 1:
        raise TopologyError(f"unknown TPU topology {name!r}: {generation} slices have {want} "
                            f"dimensions, e.g. {generation}:{'x'.join(['2'] * want)}")
    return generation, dims


def accelerator_type(name: str) -> str:
    """The Cloud accelerator type of a topology: `v5p:2x2x1` -> `v5p-8`, `v6e:2x2` -> `v6e-4`."""
    generation, dims = parse_topology(name)
    return f"{generation}-{math.prod(dims) * GENERATIONS[generation][1]}"


def configure_libtpu_env(name: str) -> None:
    """Answer libtpu's start-up questions so it does not warn (only variables not already set).

    Call before libtpu is loaded (the first TPU topology or backend of the process): later
    calls change nothing libtpu reads.
    """
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no Cloud metadata server here
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(name))
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    # Several processes (pytest workers, parallel CLIs) may compile at once; nothing runs on a
    # chip, so libtpu's one-process-per-host lock only gets in the way.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def libtpu_available() -> bool:
    """Whether the libtpu package (the TPU compiler) is installed."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str) -> list:
    """The abstract devices (one per chip) of the TPU slice `name`, for lowering and compiling."""
    parse_topology(name)  # fails early, before libtpu is loaded
    if not libtpu_available():
        raise RuntimeError("compiling for a TPU topology needs libtpu: pip install libtpu==0.0.42.1 "
                           "(the version jax[tpu]==0.10.2 pins)")
    configure_libtpu_env(name)
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as error:  # libtpu's own message for a shape it does not know
        raise TopologyError(f"libtpu does not know the TPU topology {name!r}: {error}") from error
    return list(topology.devices)
