"""Tokenizers with one interface: bytes (vocab 256), SentencePiece (a `.model` file, trained
here or brought along) and Hugging Face `tokenizer.json` files (the `tokenizers` library).

Interface (`Tokenizer`):
  vocab_size: int                      ids are in [0, vocab_size)
  pad_id: int                          filler for padded positions (always weight 0)
  bos_id: int | None                   put before every document when packing; None = no
                                       separator (bytes: the stream is exactly the raw bytes)
  encode(text: str | bytes) -> int32 [n]
  encode_batch(texts) -> list of int32 [n_i]
  decode(ids: int [n]) -> str
  stream_dtype: the narrowest numpy dtype holding every id (uint8 for bytes), so a packed
                split costs 1 byte/token for enwik8 rather than 4.

The byte tokenizer makes the loss exactly bits per byte (= per character for ASCII text, and
the enwik8 BPC convention) once divided by ln 2.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import ml_collections
import numpy as np
import sentencepiece as spm
import tokenizers as hf_tokenizers
from etils import epath

from rmoe_jax.data.errors import BadInputError, DataNotPreparedError

TOKENIZERS = ("byte", "sentencepiece", "huggingface")
# SentencePiece special ids (fixed so padding is a real, never-predicted token, id 0).
SP_PAD_ID, SP_UNK_ID, SP_BOS_ID, SP_EOS_ID = 0, 1, 2, 3
# byte_fallback reserves 256 byte pieces; with the 4 specials and '\n' this is the floor.
SP_MIN_VOCAB = 256 + 4 + 1


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int | None

    @property
    def stream_dtype(self) -> np.dtype: ...

    def encode(self, text: str | bytes) -> np.ndarray: ...

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]: ...

    def decode(self, ids) -> str: ...


def _narrowest_dtype(vocab_size: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.int32)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255. No separator, no specials: the stream is the raw bytes."""

    vocab_size = 256
    pad_id = 0
    bos_id = None
    stream_dtype = np.dtype(np.uint8)

    def encode(self, text: str | bytes) -> np.ndarray:
        """int32 [len(utf-8 bytes)]; a numpy view, so 5 MB encode in milliseconds."""
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """Bytes -> str; invalid UTF-8 (e.g. a window cut inside a character) becomes U+FFFD."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"byte ids must be in [0, 255], got range [{ids.min()}, {ids.max()}]")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model loaded from a file; `bos_id` separates documents."""

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = str(model_path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        except (OSError, RuntimeError) as e:
            raise BadInputError(f"data.sentencepiece_model: {self.model_path} does not load as a "
                             f"SentencePiece model ({str(e)[:200]})") from None
        self.vocab_size = int(self._sp.get_piece_size())
        # Models trained elsewhere may lack pad/bos; fall back to id 0 / no separator.
        self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else 0
        self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None
        self.stream_dtype = _narrowest_dtype(self.vocab_size)

    @staticmethod
    def _text(text: str | bytes) -> str:
        # SentencePiece takes str; a byte split boundary may cut a UTF-8 character.
        return text if isinstance(text, str) else bytes(text).decode("utf-8", errors="replace")

    def encode(self, text: str | bytes) -> np.ndarray:
        return np.asarray(self._sp.encode(self._text(text)), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        ids = self._sp.encode([self._text(t) for t in texts], num_threads=os.cpu_count() or 1)
        return [np.asarray(x, dtype=np.int32) for x in ids]

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])


# Names the common tokenizer.json files give their specials, most specific first.
HF_BOS_NAMES = ("<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>", "[BOS]", "<|bos|>")
HF_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|eos|>")
HF_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


def _template_specials(config: dict) -> tuple[str | None, str | None]:
    """The special tokens a `TemplateProcessing` post-processor puts before and after a single
    sequence (Llama: `<s> $A`, so BOS `<s>`); (None, None) for any other post-processor."""
    processor = config.get("post_processor") or {}
    if processor.get("type") == "Sequence":
        processor = next((p for p in processor.get("processors", [])
                          if p.get("type") == "TemplateProcessing"), {})
    if processor.get("type") != "TemplateProcessing":
        return None, None
    pieces = processor.get("single", [])
    first_sequence = next((i for i, p in enumerate(pieces) if "Sequence" in p), len(pieces))
    before = [p["SpecialToken"]["id"] for p in pieces[:first_sequence] if "SpecialToken" in p]
    after = [p["SpecialToken"]["id"] for p in pieces[first_sequence:] if "SpecialToken" in p]
    return (before[0] if before else None), (after[-1] if after else None)


class HuggingFaceTokenizer:
    """A Hugging Face `tokenizer.json`, loaded with the `tokenizers` library (no transformers).

    The document separator (`bos_id`) is taken from the file: the BOS its post-processor
    template puts before a sequence, else a special token named like a BOS (`<s>`,
    `<|begin_of_text|>`, ...), else one named like an EOS (`<|endoftext|>`, `</s>`: GPT-2
    style files have only that), else none. Text is encoded without the post-processor's
    specials; the packer puts the separator before every document itself.
    """

    def __init__(self, path: str | os.PathLike):
        import json

        self.model_path = str(path)
        try:
            self._tok = hf_tokenizers.Tokenizer.from_file(self.model_path)
            with open(self.model_path, encoding="utf-8") as f:
                config = json.load(f)
        except Exception as e:  # noqa: BLE001 - the library raises bare Exceptions
            raise BadInputError(f"data.tokenizer_file: {self.model_path} does not load as a Hugging "
                             f"Face tokenizer.json ({type(e).__name__}: {str(e)[:200]})") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        specials = {t["content"] for t in config.get("added_tokens", []) if t.get("special")}
        template_bos, template_eos = _template_specials(config)

        def first(names) -> int | None:
            for name in names:
                if name and (name in specials or name in (template_bos, template_eos)):
                    token_id = self._tok.token_to_id(name)
                    if token_id is not None:
                        return int(token_id)
            return None

        self.bos_id = first((template_bos,) + HF_BOS_NAMES + (template_eos,) + HF_EOS_NAMES)
        pad = first(HF_PAD_NAMES)
        self.pad_id = pad if pad is not None else (self.bos_id if self.bos_id is not None else 0)
        self.stream_dtype = _narrowest_dtype(self.vocab_size)

    def encode(self, text: str | bytes) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch([SentencePieceTokenizer._text(t) for t in texts],
                                           add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                skip_special_tokens=False)


def tokenizer_file(data: ml_collections.ConfigDict) -> epath.Path | None:
    """The file the tokenizer is loaded from (its model), or None for bytes."""
    if data.tokenizer == "sentencepiece":
        return sentencepiece_model_path(data)
    if data.tokenizer == "huggingface":
        return epath.Path(os.path.abspath(os.path.expanduser(data.tokenizer_file)))
    return None


def sentencepiece_model_path(data: ml_collections.ConfigDict) -> epath.Path:
    """`data.sentencepiece_model`, or `<dataset dir>/sentencepiece_<vocab>.model` when ''.

    The dataset dir is `<data_dir>/shakespeare`, `<data_dir>/enwik8/<config>`, ...
    (see `sources.dataset_dir`), i.e. beside the data the model was trained on.
    """
    if data.sentencepiece_model:
        return epath.Path(os.path.abspath(os.path.expanduser(data.sentencepiece_model)))
    from rmoe_jax.data import sources  # local: sources imports builders (TFDS), keep this light

    return sources.dataset_dir(data) / f"sentencepiece_{data.sentencepiece_vocab_size}.model"


def sentencepiece_command(data: ml_collections.ConfigDict) -> str:
    """The prepare command that trains the SentencePiece model `data` asks for."""
    from rmoe_jax.data import sources

    return (f"python -m rmoe_jax.data.prepare --dataset {data.dataset} "
            f"--data_dir {sources.resolve_data_dir(data.data_dir)} --tokenizer sentencepiece "
            f"--sentencepiece_vocab_size {data.sentencepiece_vocab_size}")


def make_tokenizer(data: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer `data.tokenizer` names.

    Raises:
      DataNotPreparedError: the SentencePiece model is missing; names the command to run.
      ValueError: unknown `data.tokenizer`.
    """
    if data.tokenizer == "byte":
        return ByteTokenizer()
    if data.tokenizer == "sentencepiece":
        path = sentencepiece_model_path(data)
        if not path.exists():
            raise DataNotPreparedError(
                f"SentencePiece model {path} not found; train it on the {data.train_split} "
                f"split with: {sentencepiece_command(data)}")
        return SentencePieceTokenizer(path)
    if data.tokenizer == "huggingface":
        path = tokenizer_file(data)
        if not data.tokenizer_file or not path.is_file():
            raise DataNotPreparedError(
                f"data.tokenizer_file: {data.tokenizer_file!r} is not a file ({path}); point it "
                "at the tokenizer.json to use with data.tokenizer=huggingface")
        return HuggingFaceTokenizer(path)
    raise ValueError(f"data.tokenizer: {data.tokenizer!r} is not one of {', '.join(TOKENIZERS)}")


def training_sentences(documents: Iterable[bytes], max_sentences: int) -> list[str]:
    """Non-empty lines of the documents; an evenly spaced subset when there are more.

    Evenly spaced (not random) so the same corpus always gives the same model.
    """
    lines = [line for doc in documents for line in doc.split(b"\n") if line.strip()]
    if max_sentences > 0 and len(lines) > max_sentences:
        keep = np.linspace(0, len(lines) - 1, max_sentences).round().astype(np.int64)
        lines = [lines[i] for i in keep]
    return [line.decode("utf-8", errors="replace") for line in lines]


def train_sentencepiece(documents: Iterable[bytes], model_path: str | os.PathLike,
                        vocab_size: int, *, model_type: str = "unigram",
                        max_sentences: int = 1_000_000) -> epath.Path:
    """Train a SentencePiece model on the lines of `documents`, write it to `model_path`.

    Options chosen so `decode(encode(text)) == text` for any text: identity normalization,
    whitespace kept as is, no dummy prefix, byte fallback for unseen characters, and '\\n'
    a piece of its own (documents are encoded whole, lines included). Ids 0..3 are
    pad, unk, bos (the document separator), eos. Written via a temporary file, so a killed
    run never leaves a half model behind.
    """
    if vocab_size < SP_MIN_VOCAB:
        raise ValueError(f"data.sentencepiece_vocab_size: must be >= {SP_MIN_VOCAB} (256 byte "
                         f"pieces + specials), got {vocab_size}")
    sentences = training_sentences(documents, max_sentences)
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=proto, vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"], pad_id=SP_PAD_ID, unk_id=SP_UNK_ID,
            bos_id=SP_BOS_ID, eos_id=SP_EOS_ID, num_threads=os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"data.sentencepiece_vocab_size: SentencePiece could not train a "
                         f"{vocab_size}-piece model on {len(sentences)} lines: {e}") from e
    path = epath.Path(model_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(proto.getvalue())
    tmp.rename(path)
    return path
