"""`python -m rmoe_jax.export ...`: the export CLI (`rmoe_jax.export.cli.main`)."""

import sys

from rmoe_jax.export.cli import main

sys.exit(main())
