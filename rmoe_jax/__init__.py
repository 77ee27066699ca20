"""rmoe_jax: the Layerwise Recurrent Router for MoE in JAX/Flax.

Importing the package first picks JAX's platforms on a machine without a TPU (no libtpu
start-up errors; see rmoe_jax/platforms.py). Every entry point imports it before JAX starts.
"""

from rmoe_jax.platforms import select_platforms as _select_platforms

_select_platforms()
