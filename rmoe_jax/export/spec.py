"""The export format's fixed facts: its version, file names and dtypes, and its error.

`ExportError` is `rmoe_jax.config_json.ConfigJSONError` (one class: a workdir's or an export's
config that does not rebuild its model raises it from there, before the export package is
involved), so `except ExportError` catches every error of an export or of its config.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from rmoe_jax.config_json import ConfigJSONError


FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"  # SentencePiece
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILES = {"sentencepiece": TOKENIZER_FILE, "huggingface": HF_TOKENIZER_FILE}
DEFAULT_MAX_SHARD_SIZE = "5GB"
EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}

# An export that cannot be written or read back; the message says what and where.
ExportError = ConfigJSONError
