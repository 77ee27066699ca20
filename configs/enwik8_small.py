"""enwik8, the paper's "small" setting (the depth sweep of PAPER.md section 5).

    python train.py --config configs/enwik8_small.py --workdir runs/small_rmoe
    python train.py --config configs/enwik8_small.py:smoe --workdir runs/small_smoe \
        --config.model.num_layers=12

As configs/enwik8_medium.py but d = 264, 6 layers, 60k steps, 3000 warmup steps (8 heads of
size 32, since RoPE needs an even head size and 264 / 8 = 33). Every router row
of configs/enwik8_medium.py (its docstring lists them) works here the same way, as the config
argument or as `--config.model.router.*` overrides; the depth sweep is
`--config.model.num_layers=6|12|18|24|32`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import enwik8_medium  # noqa: E402  (configs/ is not a package)


def get_config(row: str | None = None):
    config = enwik8_medium.get_config()
    config.model.d_model = 264
    config.model.num_layers = 6
    # 264 / 8 heads = 33 is odd, which RoPE cannot rotate in pairs: keep the paper's 8 heads
    # with an explicit even head size (attention width 8 * 32 = 256 instead of 264).
    config.model.head_dim = 32
    config.model.moe.expert_hidden = 264  # expert FFN = d, as in the medium model
    config.train.num_steps = 60_000
    config.train.warmup_steps = 3000
    if row:
        enwik8_medium.apply_row(config, row)
    return config
