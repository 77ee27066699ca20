"""The data pipeline: TFDS builders (array_record, no TensorFlow), tokenizers, packing, loaders.

Public API:
  make_train_iterator(data, *, batch_size, seed, process_index=0, process_count=1)
  make_eval_batches(data, *, split, batch_size, process_index=0, process_count=1, max_batches=0)
  dataset_info(data) -> DatasetInfo (vocab_size, tokenizer, pad_id, bos_id, ...)
  split_stats(data, split), token_stream(data, split), packed_windows(data, split)
  make_tokenizer(data), ByteTokenizer, SentencePieceTokenizer, HuggingFaceTokenizer,
  train_sentencepiece(...)
  prepare_dataset(data), read_documents(data, split), resolve_data_dir(data_dir)
  DataNotPreparedError, BadInputError

`data` is the `data` sub-config of `rmoe_jax.config` (see `data_config()`).
Prepare ahead of time with `python -m rmoe_jax.data.prepare --help`.
"""

import importlib

# Attribute -> the module defining it. Imported on first use (PEP 562), so importing one light
# submodule (tokenizers, in every preparation worker) does not pay for grain and TFDS.
_EXPORTS = {
    "DataNotPreparedError": "errors", "BadInputError": "errors",
    "DatasetInfo": "loader", "EvalBatches": "loader", "TrainIterator": "loader",
    "dataset_info": "loader", "make_eval_batches": "loader", "make_train_iterator": "loader",
    "packed_windows": "loader", "split_stats": "loader", "token_stream": "loader",
    "PackedWindows": "packing", "concat_documents": "packing", "num_windows": "packing",
    "dataset_dir": "sources", "prepare_dataset": "sources", "read_documents": "sources",
    "resolve_data_dir": "sources",
    "ByteTokenizer": "tokenizers", "HuggingFaceTokenizer": "tokenizers",
    "SentencePieceTokenizer": "tokenizers", "Tokenizer": "tokenizers",
    "make_tokenizer": "tokenizers", "sentencepiece_model_path": "tokenizers",
    "train_sentencepiece": "tokenizers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
