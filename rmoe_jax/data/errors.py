"""The one exception the data pipeline raises for data that is not where it should be."""

from __future__ import annotations


class DataNotPreparedError(FileNotFoundError):
    """A dataset, raw file or tokenizer model is missing.

    The message always says what to do: which file to put at which full path, or which
    command to run to prepare it. It subclasses `FileNotFoundError` so callers that
    already handle missing files keep working.
    """
