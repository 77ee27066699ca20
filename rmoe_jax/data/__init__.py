"""The data pipeline: TFDS builders (array_record, no TensorFlow), tokenizers, packing, loaders.

Public API:
  make_train_iterator(data, *, batch_size, seed, process_index=0, process_count=1)
  make_eval_batches(data, *, split, batch_size, process_index=0, process_count=1, max_batches=0)
  dataset_info(data) -> DatasetInfo (vocab_size, tokenizer, pad_id, bos_id, ...)
  split_stats(data, split), token_stream(data, split), packed_windows(data, split)
  make_tokenizer(data), ByteTokenizer, SentencePieceTokenizer, train_sentencepiece(...)
  prepare_dataset(data), read_documents(data, split), resolve_data_dir(data_dir)
  DataNotPreparedError

`data` is the `data` sub-config of `rmoe_jax.config` (see `data_config()`).
Prepare ahead of time with `python -m rmoe_jax.data.prepare --help`.
"""

from rmoe_jax.data.errors import DataNotPreparedError
from rmoe_jax.data.loader import (DatasetInfo, EvalBatches, TrainIterator, dataset_info,
                                  make_eval_batches, make_train_iterator, packed_windows,
                                  split_stats, token_stream)
from rmoe_jax.data.packing import PackedWindows, concat_documents, num_windows
from rmoe_jax.data.sources import (dataset_dir, prepare_dataset, read_documents,
                                   resolve_data_dir)
from rmoe_jax.data.tokenizers import (ByteTokenizer, SentencePieceTokenizer, Tokenizer,
                                      make_tokenizer, sentencepiece_model_path,
                                      train_sentencepiece)

__all__ = [
    "ByteTokenizer", "DataNotPreparedError", "DatasetInfo", "EvalBatches", "PackedWindows",
    "SentencePieceTokenizer", "Tokenizer", "TrainIterator", "concat_documents", "dataset_dir",
    "dataset_info", "make_eval_batches", "make_tokenizer", "make_train_iterator",
    "num_windows", "packed_windows", "prepare_dataset", "read_documents",
    "resolve_data_dir", "sentencepiece_model_path", "split_stats", "token_stream",
    "train_sentencepiece",
]
