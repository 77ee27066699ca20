"""The base class of this project's TFDS builders: one workaround for TFDS 4.9.10 without TF.

`DatasetBuilder.code_path` (used to look for a `checksums.tsv` beside the builder when
`download_and_prepare` makes its download manager) touches `importlib_resources.abc`, the
backport package TFDS only declares for Python < 3.9. On 3.9+ without it, preparing any
builder defined inside a package dies with `ModuleNotFoundError: importlib_resources`.
Our builders download nothing through TFDS (enwik8 fetches its zip itself), so `code_path`
is simply this module file's path: no checksums file there means no URL infos, as intended.
"""

from __future__ import annotations

import inspect

import tensorflow_datasets as tfds
from etils import epath


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """`GeneratorBasedBuilder` whose `code_path` needs no `importlib_resources`."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:  # pylint: disable=invalid-overridden-method
        return epath.Path(inspect.getfile(cls))
