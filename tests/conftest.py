"""Test setup: 8 fake CPU devices for mesh tests and JAX's persistent compilation cache.

Both must be configured before JAX is imported anywhere, hence here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE_DIR = os.environ.get("RMOE_JAX_TEST_CACHE", os.path.expanduser("~/.cache/rmoe_jax/jax_test_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
