"""Which JAX platforms a command uses: on a machine without a TPU, JAX never loads libtpu.

With `libtpu` installed (requirements-test.txt installs it, for the TPU AOT compiles) and
`JAX_PLATFORMS` unset, JAX tries every backend it knows, TPU first: libtpu starts, prints
"unexpected worker hostname" / "could not determine TPU accelerator type" and the backend
fails ("Unable to initialize backend 'tpu'"). `select_platforms()`, run by `import rmoe_jax`
(every entry point imports the package before JAX starts a backend), names the platforms up
front when no TPU is attached: `cpu`, or `cuda,cpu` / `rocm,cpu` where such a GPU and its JAX
plugin are both present. Nothing changes where

  * `JAX_PLATFORMS` is set (even to '': JAX then picks by itself), or `JAX_FORCE_TPU_INIT` is;
  * a TPU is attached (`/dev/accel*`, `/dev/vfio/<n>`, or a Google TPU on the PCI bus);
  * JAX already chose its platforms (`jax.config.jax_platforms` set, or backends started).

Compiling for a TPU topology on this machine (`python -m rmoe_jax.aot --topology v5p:2x2x1`,
`rmoe_jax.tpu_topology`) still loads libtpu: topologies do not go through the platform list.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (as jax._src.hardware_utils lists them).
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


def tpu_attached() -> bool:
    """Whether this machine has a TPU: a TPU device node or a TPU chip on the PCI bus."""
    if glob.glob("/dev/accel*") or [p for p in glob.glob("/dev/vfio/*")
                                    if os.path.basename(p).isdigit()]:
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() != _GOOGLE_PCI_VENDOR:
                    continue
            with open(os.path.join(os.path.dirname(vendor), "device")) as f:
                if f.read().strip() in _TPU_PCI_DEVICES:
                    return True
        except OSError:
            continue
    return False


def _plugin_installed(*names: str) -> bool:
    try:
        return any(importlib.util.find_spec(name) is not None for name in names)
    except (ImportError, ValueError):
        return False


def non_tpu_platforms() -> str:
    """The platforms for a machine without a TPU: GPUs that JAX can drive, then the CPU."""
    platforms = []
    if any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")) and \
            _plugin_installed("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins.xla_cuda13",
                              "jax_plugins.xla_cuda12"):
        platforms.append("cuda")
    if os.path.exists("/dev/kfd") and _plugin_installed("jax_rocm7_plugin", "jax_rocm60_plugin",
                                                        "jax_plugins.xla_rocm7",
                                                        "jax_plugins.xla_rocm60"):
        platforms.append("rocm")
    return ",".join(platforms + ["cpu"])


def choose(environ, tpu: bool, non_tpu: str) -> str | None:
    """The `jax_platforms` to set, or None to leave JAX's own choice alone."""
    if "JAX_PLATFORMS" in environ or "JAX_FORCE_TPU_INIT" in environ or tpu:
        return None
    return non_tpu


def select_platforms() -> str | None:
    """Set JAX's platforms when no TPU is attached (see the module docstring); returns them."""
    if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ:
        return None
    jax = sys.modules.get("jax")
    if jax is not None:
        try:
            from jax._src import xla_bridge

            if jax.config.jax_platforms or xla_bridge._backends:  # noqa: SLF001
                return None  # chosen already, or too late to choose
        except Exception:  # noqa: BLE001 - a JAX without these internals: leave it alone
            return None
    platforms = choose(os.environ, tpu_attached(), non_tpu_platforms())
    if platforms is None:
        return None
    if jax is None:
        os.environ["JAX_PLATFORMS"] = platforms  # read when jax is imported
    else:
        jax.config.update("jax_platforms", platforms)
    return platforms
