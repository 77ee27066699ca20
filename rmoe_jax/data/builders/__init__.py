"""The TFDS builders this project owns, one module per dataset.

Importing this package registers `shakespeare` and `enwik8` with TFDS, so
`tfds.data_source('shakespeare', split=..., data_dir=...)` finds them by name. `files` (your
own files) is always opened through its builder, whose config is derived from the files.
"""

from rmoe_jax.data.builders import enwik8, files, shakespeare

OWN_DATASETS = ("shakespeare", "enwik8", "files")

__all__ = ["OWN_DATASETS", "enwik8", "files", "shakespeare"]
