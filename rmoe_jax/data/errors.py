"""The exceptions the data pipeline raises for data that is missing or that it cannot read."""

from __future__ import annotations


class DataNotPreparedError(FileNotFoundError):
    """A dataset, raw file or tokenizer model is missing.

    The message always says what to do: which file to put at which full path, or which
    command to run to prepare it. It subclasses `FileNotFoundError` so callers that
    already handle missing files keep working.
    """


class BadInputError(ValueError):
    """A file of the user's corpus cannot be read as asked: no file matches a glob, a file is
    empty, is not valid UTF-8, is not JSON or Parquet, lacks the text field or column; or a
    tokenizer file does not load.

    The message names the file (and the line, byte offset or row) and what to do about it.
    """
