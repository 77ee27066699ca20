"""Tests of the `files` dataset: a user's own txt / jsonl(.gz) / parquet files, tokenized once.

Every expectation is computed here, independently of the pipeline: the documents are the
Python strings the test writes (split / filtered with plain `str` methods), their bytes are
`str.encode('utf-8')`, Hugging Face token ids come from the `tokenizers` library itself, and
windows are cut from the stream with plain slicing. Data dirs live under tmp_path; corpora
are tiny, and everything but one test prepares in-process (data.prepare_workers=1).
"""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import json
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers as hf

from rmoe_jax import config as config_lib
from rmoe_jax import data as data_lib
from rmoe_jax.data import file_corpus, file_tokenizing, prepare, sources
from rmoe_jax.data.builders import files as files_builder
from rmoe_jax.data.errors import BadInputError, DataNotPreparedError
from rmoe_jax.data.token_chunks import TokenChunks

SPLITS = ("train", "validation", "test")
NON_ASCII = "héllo wörld 東京 naïve"


# --- helpers -------------------------------------------------------------------------------

def make_data(data_dir, **overrides):
    data = config_lib.data_config()
    data.dataset = "files"
    data.data_dir = str(data_dir)
    data.allow_download = False  # tests never touch the network
    data.prepare_workers = 1
    for k, v in overrides.items():
        data[k] = v
    return data


def real(path) -> str:
    return os.path.realpath(str(path))


def nonblank(docs):
    """The documents the corpus keeps: not None, not whitespace only."""
    return [d for d in docs if d is not None and d.strip()]


def write_txt(path, segments, delimiter="\n\n", trailing=True):
    """A delimited text file; returns its documents (plain str.split of what was written)."""
    text = delimiter.join(segments) + (delimiter if trailing else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return nonblank(text.split(delimiter))


def write_jsonl(path, records, blank_lines=()):
    """JSONL (gzipped for .gz), alternating ASCII-escaped and raw UTF-8 lines; returns the
    documents (the 'text' values kept)."""
    lines = [json.dumps(r, ensure_ascii=bool(i % 2)) for i, r in enumerate(records)]
    for at in sorted(blank_lines, reverse=True):
        lines.insert(at, "   ")
    raw = ("\n".join(lines) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if str(path).endswith(".gz") else raw)
    return nonblank([r.get("text") for r in records])


def write_parquet(path, values, column="text", row_group_size=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: pa.array(values, pa.string()),
                             "n": pa.array(range(len(values)), pa.int64())}),
                   str(path), row_group_size=row_group_size)
    return nonblank(values)


def utf8(docs) -> bytes:
    return b"".join(d.encode("utf-8") for d in docs)


def stream_of(data, split) -> np.ndarray:
    return np.asarray(data_lib.token_stream(data, split))


def expected_windows(stream: np.ndarray, seq_len: int, pad_id: int = 0):
    """(inputs, targets, weights) per window, cut by plain slicing."""
    out = []
    for start in range(0, len(stream) - 1, seq_len):
        piece = stream[start:start + seq_len + 1].astype(np.int32)
        window = np.full(seq_len + 1, pad_id, np.int32)
        window[:len(piece)] = piece
        weights = np.zeros(seq_len, np.float32)
        weights[:len(piece) - 1] = 1.0
        out.append((window[:-1], window[1:], weights))
    return out


def train_bpe(path, texts, vocab_size=400, specials=("<|endoftext|>",), template=None):
    """A byte-level BPE tokenizer.json trained with the `tokenizers` library."""
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if template is not None:
        single, names = template
        tok.post_processor = hf.processors.TemplateProcessing(
            single=single, special_tokens=[(n, tok.token_to_id(n)) for n in names])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def tree_digest(root) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under `root`."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = (hashlib.sha256(open(p, "rb").read()).hexdigest(),
                                             os.stat(p).st_mtime_ns)
    return out


def doc_text(i: int) -> str:
    return f"doc {i} ({i * i}): {NON_ASCII} — {'abcdefghij'[i % 10] * (1 + i % 4)} 🎉 #{i}"


# --- a multi-format corpus with its own validation and test files -------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Train: a folder with a delimited txt, a jsonl.gz and a parquet file; validation: a glob
    of a txt and a jsonl.gz; test: a comma list of a parquet and a jsonl. Returns the files'
    roots and the documents of each split in sorted file order (written in another order)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = {}
    # train/: b.txt, then a.jsonl.gz, then c.parquet -> sorted a, b, c
    b = write_txt(root / "train" / "b.txt",
                  [doc_text(i) for i in range(0, 12)] + ["  \n\t ", "\n" + doc_text(99),
                                                         "two\nlines " + NON_ASCII])
    a = write_jsonl(root / "train" / "a.jsonl.gz",
                    [{"text": doc_text(i), "id": i} for i in range(20, 30)]
                    + [{"text": None}, {"text": " \n "}, {"text": "tab\tand\nnewline ☃"}],
                    blank_lines=(3,))
    c = write_parquet(root / "train" / "c.parquet",
                      [doc_text(i) for i in range(40, 47)] + [None, "   ", "last ünïcödé"])
    docs["train"] = a + b + c
    v1 = write_txt(root / "val" / "v1.txt", ["validation " + doc_text(i) for i in range(3)],
                   trailing=False)
    v0 = write_jsonl(root / "val" / "v0.jsonl.gz", [{"text": "val json " + NON_ASCII},
                                                     {"text": "second 東京 line"}])
    docs["validation"] = v0 + v1
    t2 = write_jsonl(root / "test" / "t2.jsonl", [{"text": "test json " + NON_ASCII}])
    t1 = write_parquet(root / "test" / "t1.parquet", ["test parquet 東京", "", "naïve end"])
    docs["test"] = t1 + t2
    files = dict(train_files=str(root / "train"), validation_files=str(root / "val" / "*"),
                 test_files=f"{root / 'test' / 't2.jsonl'},{root / 'test' / 't1.parquet'}")
    data_dir = tmp_path_factory.mktemp("tfds")
    data = make_data(data_dir, document_delimiter="\n\n", seq_len=16, **files)
    builder = sources.prepare_dataset(data)
    return dict(root=root, docs=docs, files=files, data=data, builder=builder)


def test_formats_counts_and_streams_match_the_files(corpus):
    data, docs, builder = corpus["data"], corpus["docs"], corpus["builder"]
    assert builder.is_prepared()
    meta = builder.info.metadata
    assert [os.path.basename(p) for p in meta["files"]["train"]] == [
        "a.jsonl.gz", "b.txt", "c.parquet"]
    for split in SPLITS:
        raw = utf8(docs[split])
        expected = {"num_documents": len(docs[split]), "num_bytes": len(raw),
                    "num_tokens": len(raw)}  # bytes: one token per byte, no separator
        assert meta["splits"][split] == expected, split
        stats = data_lib.split_stats(data, split)
        assert {k: stats[k] for k in expected} == expected, split
        assert stats["num_targets"] == len(raw) - 1
        stream = stream_of(data, split)
        assert stream.dtype == np.uint8
        assert stream.tobytes() == raw, split
    # The non-ASCII text survives every format (the whole doc, not just a prefix of it).
    assert NON_ASCII.encode() in stream_of(data, "validation").tobytes()
    assert "last ünïcödé".encode() in stream_of(data, "train").tobytes()


def test_delimiter_escapes_and_whole_file_documents(tmp_path):
    assert file_corpus.ReadOptions(document_delimiter="\\n\\n").delimiter == b"\n\n"
    assert file_corpus.ReadOptions(document_delimiter="\n\n").delimiter == b"\n\n"
    assert file_corpus.ReadOptions(document_delimiter="\\t|\\\\").delimiter == b"\t|\\"
    text = "whole file\n\nis " + NON_ASCII + "\n\n"
    (tmp_path / "one.md").write_text(text, encoding="utf-8")
    (tmp_path / "two.txt.gz").write_bytes(gzip.compress(("second\n\n" + NON_ASCII).encode()))
    paths = file_corpus.expand_files(str(tmp_path), "data.train_files")
    assert paths == sorted([real(tmp_path / "one.md"), real(tmp_path / "two.txt.gz")])
    units = file_corpus.plan_units({"train": paths}, "auto")
    got = [[t for _, t, _ in file_corpus.read_documents(u, file_corpus.ReadOptions())]
           for u in units]
    assert got == [[text], ["second\n\n" + NON_ASCII]]  # no delimiter: a file is a document
    got = [[(p, t, n) for p, t, n in file_corpus.read_documents(
        u, file_corpus.ReadOptions(document_delimiter="\\n\\n"))] for u in units]
    assert got[0] == [(0, "whole file", 10), (12, "is " + NON_ASCII, len(("is " + NON_ASCII).encode()))]
    assert [t for _, t, _ in got[1]] == ["second", NON_ASCII]


def test_units_cut_big_files_without_moving_documents(tmp_path):
    """JSONL cut into byte ranges and Parquet into row-group runs give the same documents at
    the same positions (which key the held-out choice) as one unit per file."""
    records = [{"text": f"{NON_ASCII} {i} " + "x" * (i % 7)} for i in range(30)]
    jsonl = tmp_path / "big.jsonl"
    write_jsonl(jsonl, records, blank_lines=(5, 17))
    raw = jsonl.read_bytes()
    line_starts = [0] + [m.end() for m in re.finditer(b"\n", raw)][:-1]
    expected = [(s, json.loads(line)["text"]) for s, line in
                zip(line_starts, raw.split(b"\n")) if line.strip()]
    parquet = tmp_path / "big.parquet"
    values = [f"row {i} 東京" for i in range(23)]
    write_parquet(parquet, values, row_group_size=3)
    options = file_corpus.ReadOptions()
    first_line = raw.index(b"\n") + 1
    for unit_bytes in (1, 7, first_line, first_line - 1, first_line + 1, 100, 10**9):
        units = file_corpus.plan_units({"train": [str(jsonl)]}, "auto", unit_bytes)
        if unit_bytes < len(raw):
            assert len(units) > 1
        got = [(p, t) for u in units for p, t, _ in file_corpus.read_documents(u, options)]
        assert got == expected, unit_bytes
        units = file_corpus.plan_units({"train": [str(parquet)]}, "auto", unit_bytes)
        got = [(p, t) for u in units for p, t, _ in file_corpus.read_documents(u, options)]
        assert got == list(enumerate(values)), unit_bytes


def test_token_chunks_reads_across_chunks_and_parts():
    rng = np.random.default_rng(0)
    whole_parts = [rng.integers(0, 60000, n).astype(np.uint16) for n in (10, 1, 8, 0, 13)]

    def records(tokens, size):
        return [{"tokens": tokens[i:i + size].astype("<u2").tobytes()}
                for i in range(0, len(tokens), size)]

    for size in (1, 3, 4, 64):
        parts = [(records(t, size), len(t)) for t in whole_parts]
        chunks = TokenChunks(parts, size, np.uint16)
        whole = np.concatenate(whole_parts)
        assert len(chunks) == chunks.size == whole.size and chunks.shape == whole.shape
        np.testing.assert_array_equal(np.asarray(chunks), whole)
        idx = rng.integers(-whole.size, whole.size, (5, 7))
        np.testing.assert_array_equal(chunks[idx], whole[idx])
        view = chunks[5:27]
        np.testing.assert_array_equal(np.asarray(view), whole[5:27])
        np.testing.assert_array_equal(view[np.array([0, 3, 21, -1])], whole[5:27][[0, 3, 21, -1]])
        assert int(chunks[7]) == int(whole[7])
        with pytest.raises(IndexError):
            chunks[np.array([whole.size])]


# --- held-out splits -----------------------------------------------------------------------

def heldout_corpus(root, n_txt=120, n_jsonl=80, pad=360):
    """Unique documents `<Dnnn> ...` (each ~420 bytes, so train spans two 65,536-token
    chunks) in a delimited txt (file 0) and a JSONL (file 1). Returns the docs and, per doc,
    (file index, position) computed from the bytes written."""
    docs = [f"<D{i:03d}> {NON_ASCII} " + ("é" if i % 2 else "e") * (i % 5) + "-" * pad
            for i in range(n_txt + n_jsonl)]
    write_txt(root / "a.txt", docs[:n_txt], trailing=False)
    keys, offset = [], 0
    for d in docs[:n_txt]:
        keys.append((0, offset))
        offset += len(d.encode()) + 2
    lines = [json.dumps({"text": d}, ensure_ascii=False) for d in docs[n_txt:]]
    (root / "b.jsonl").write_bytes(("\n".join(lines) + "\n").encode())
    offset = 0
    for line in lines:
        keys.append((1, offset))
        offset += len(line.encode()) + 1
    return docs, keys


def split_ids(data, docs) -> dict[str, list[int]]:
    """Which documents each split holds, read off its stream (and the stream checked to be
    exactly those documents, in file order)."""
    out = {}
    for split in SPLITS:
        text = stream_of(data, split).tobytes().decode("utf-8")
        ids = [int(m) for m in re.findall(r"<D(\d{3})>", text)]
        assert text == "".join(docs[i] for i in ids), split
        assert ids == sorted(ids), split  # file order kept
        out[split] = ids
    return out


def test_heldout_splits_are_disjoint_seeded_and_sized(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    docs, keys = heldout_corpus(root)
    n, fraction = len(docs), 0.05
    wanted = max(1, round(fraction * n))
    choices = {}
    for seed, data_dir in ((0, tmp_path / "d0"), (1, tmp_path / "d0"), (0, tmp_path / "d1")):
        data = make_data(data_dir, train_files=str(root / "*"), document_delimiter="\\n\\n",
                         heldout_fraction=fraction, heldout_seed=seed)
        builder = sources.prepare_dataset(data)
        ids = split_ids(data, docs)
        assert len(ids["validation"]) == len(ids["test"]) == wanted
        assert sorted(ids["train"] + ids["validation"] + ids["test"]) == list(range(n))
        counts = builder.info.metadata["splits"]
        assert counts["train"]["num_tokens"] > files_builder.CHUNK_TOKENS  # two records
        assert builder.info.splits["train"].num_examples == 2
        for split in SPLITS:
            assert counts[split]["num_documents"] == len(ids[split])
            assert counts[split]["num_tokens"] == len(utf8(docs[i] for i in ids[split]))
        # The smallest scores go to validation, the next ones to test.
        order = sorted(range(n), key=lambda i: file_tokenizing.document_score(seed, *keys[i]))
        assert ids["validation"] == sorted(order[:wanted])
        assert ids["test"] == sorted(order[wanted:2 * wanted])
        choices.setdefault(seed, []).append(ids)
    assert choices[0][0] == choices[0][1]  # same seed, fresh data dir: same choice
    assert choices[0][0]["validation"] != choices[1][0]["validation"]
    assert choices[0][0]["test"] != choices[1][0]["test"]


def test_heldout_test_only_when_validation_given(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    docs, _ = heldout_corpus(root, n_txt=30, n_jsonl=0, pad=10)
    val = write_txt(tmp_path / "val.txt", ["given validation " + NON_ASCII])
    data = make_data(tmp_path / "tfds", train_files=str(root / "a.txt"),
                     validation_files=str(tmp_path / "val.txt"), document_delimiter="\n\n",
                     heldout_fraction=0.1)
    meta = sources.prepare_dataset(data).info.metadata["splits"]
    assert stream_of(data, "validation").tobytes() == utf8(val)
    test_ids = [int(m) for m in re.findall(r"<D(\d{3})>", stream_of(data, "test").tobytes().decode())]
    train_ids = [int(m) for m in re.findall(r"<D(\d{3})>", stream_of(data, "train").tobytes().decode())]
    assert len(test_ids) == meta["test"]["num_documents"] == 3
    assert sorted(test_ids + train_ids) == list(range(30))


# --- evaluation and training batches ---------------------------------------------------------

@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_batches_weight_every_target_once(corpus, process_count):
    data = corpus["data"]
    for split in SPLITS:
        stream = stream_of(data, split)
        windows = expected_windows(stream, data.seq_len)
        per_process = [list(data_lib.make_eval_batches(
            data, split=split, batch_size=3, process_index=p, process_count=process_count))
            for p in range(process_count)]
        assert len({len(b) for b in per_process}) == 1  # same number of batches everywhere
        found = {}
        total_weight = 0.0
        for p, batches in enumerate(per_process):
            rows = [(b["inputs"][r], b["targets"][r], b["weights"][r])
                    for b in batches for r in range(len(b["inputs"]))]
            total_weight += sum(float(w.sum()) for _, _, w in rows)
            mine = list(range(p, len(windows), process_count))
            for k, (inputs, targets, weights) in enumerate(rows):
                if k < len(mine):
                    found[mine[k]] = (inputs, targets, weights)
                else:
                    assert not weights.any()  # batch padding
        assert sorted(found) == list(range(len(windows)))
        for w, (inputs, targets, weights) in found.items():
            np.testing.assert_array_equal(inputs, windows[w][0])
            np.testing.assert_array_equal(targets, windows[w][1])
            np.testing.assert_array_equal(weights, windows[w][2])
        assert total_weight == len(stream) - 1
        targets = np.concatenate([found[w][1][found[w][2] == 1] for w in range(len(windows))])
        np.testing.assert_array_equal(targets, stream[1:].astype(np.int32))


def test_train_batches_do_not_depend_on_process_count_and_resume(corpus):
    data = corpus["data"]
    stream = stream_of(data, "train")
    windows = expected_windows(stream, data.seq_len)
    known = {}
    for w, (i, t, m) in enumerate(windows):
        known.setdefault((i.tobytes(), t.tobytes(), m.tobytes()), []).append(w)
    assert len(windows) >= 12
    one = data_lib.make_train_iterator(data, batch_size=4, seed=7)
    two = [data_lib.make_train_iterator(data, batch_size=2, seed=7, process_index=p,
                                        process_count=2) for p in range(2)]
    per_epoch = len(windows) // 4
    seen = []
    for step in range(2 * per_epoch + 1):  # crosses epochs
        batch = next(one)
        halves = [next(it) for it in two]
        for key in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(
                batch[key], np.concatenate([h[key] for h in halves]), err_msg=f"{key} {step}")
        assert batch["inputs"].shape == (4, data.seq_len)
        for r in range(4):
            key = (batch["inputs"][r].tobytes(), batch["targets"][r].tobytes(),
                   batch["weights"][r].tobytes())
            assert key in known, "a row that is no window of the stream"
            if step < per_epoch:
                seen.append(key)
    # One epoch visits distinct windows (as many times as they occur in the stream at most).
    for key in set(seen):
        assert seen.count(key) <= len(known[key])
    # Resume mid-epoch, through JSON, on 1 and on 2 processes.
    for make in (lambda: data_lib.make_train_iterator(data, batch_size=4, seed=3),
                 lambda: data_lib.make_train_iterator(data, batch_size=2, seed=3,
                                                      process_index=1, process_count=2)):
        it = make()
        for _ in range(per_epoch - 1):
            next(it)
        state = json.dumps(it.get_state())
        expected = [next(it) for _ in range(per_epoch + 2)]
        fresh = make()
        fresh.set_state(state)
        for a, b in zip(expected, (next(fresh) for _ in range(per_epoch + 2))):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


# --- Hugging Face tokenizer ------------------------------------------------------------------

TRAIN_TEXTS = ([f"{NON_ASCII} the quick brown fox {i}" for i in range(60)]
               + [doc_text(i) for i in range(60)])


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("tok") / "tokenizer.json", TRAIN_TEXTS)


def test_huggingface_tokenizer_roundtrip_and_separator(hf_tokenizer, tmp_path):
    tok = data_lib.HuggingFaceTokenizer(hf_tokenizer)
    ref = hf.Tokenizer.from_file(str(hf_tokenizer))
    assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True) <= 400
    assert tok.bos_id == ref.token_to_id("<|endoftext|>")
    assert tok.stream_dtype == np.uint16
    for text in (NON_ASCII, "Ωmega ☃ 🎉\ttab\n  spaces ", "", "unseen ∮ ꙮ 𝄞"):
        ids = tok.encode(text)
        assert ids.dtype == np.int32
        assert ids.tolist() == ref.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert [x.tolist() for x in tok.encode_batch(["a b", NON_ASCII])] == [
        ref.encode(t, add_special_tokens=False).ids for t in ("a b", NON_ASCII)]
    # BOS-named specials win over EOS-named ones; a template's BOS wins over both; none: None.
    both = data_lib.HuggingFaceTokenizer(train_bpe(tmp_path / "s.json", TRAIN_TEXTS, 300,
                                                   ("</s>", "<s>")))
    assert both.bos_id == hf.Tokenizer.from_file(str(tmp_path / "s.json")).token_to_id("<s>")
    path = train_bpe(tmp_path / "t.json", TRAIN_TEXTS, 300, ("[CLS]", "[SEP]", "</s>"),
                     template=("[CLS] $A [SEP]", ("[CLS]", "[SEP]")))
    templated = data_lib.HuggingFaceTokenizer(path)
    assert templated.bos_id == hf.Tokenizer.from_file(str(path)).token_to_id("[CLS]")
    assert templated.encode("ab").tolist() == hf.Tokenizer.from_file(str(path)).encode(
        "ab", add_special_tokens=False).ids  # the template's specials are not added
    plain = data_lib.HuggingFaceTokenizer(train_bpe(tmp_path / "p.json", TRAIN_TEXTS, 300, ()))
    assert plain.bos_id is None


def test_huggingface_prepared_counts_match_the_library(corpus, hf_tokenizer, tmp_path):
    data = make_data(tmp_path / "tfds", document_delimiter="\n\n", tokenizer="huggingface",
                     tokenizer_file=str(hf_tokenizer), **corpus["files"])
    builder = sources.prepare_dataset(data)
    ref = hf.Tokenizer.from_file(str(hf_tokenizer))
    bos = ref.token_to_id("<|endoftext|>")
    info = data_lib.dataset_info(data)
    assert info.bos_id == bos and info.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    for split in SPLITS:
        docs = corpus["docs"][split]
        expected = [t for d in docs for t in [bos] + ref.encode(d, add_special_tokens=False).ids]
        counts = builder.info.metadata["splits"][split]
        assert counts == {"num_documents": len(docs), "num_bytes": len(utf8(docs)),
                          "num_tokens": len(expected)}
        stream = stream_of(data, split)
        assert stream.dtype == np.uint16
        assert stream.tolist() == expected
        assert [ref.decode(stream[1:].tolist(), skip_special_tokens=False)] == [
            "<|endoftext|>".join(docs)]


# --- preparation: workers, resuming, keys, interruptions -------------------------------------

def test_two_workers_give_the_same_dataset_as_one(tmp_path):
    root = tmp_path / "corpus"
    docs = []
    for k in range(3):
        docs += write_txt(root / f"f{k}.txt", [f"file {k} " + doc_text(i) for i in range(12)])
    builders, streams = [], []
    for workers in (1, 2):
        data = make_data(tmp_path / f"tfds{workers}", train_files=str(root),
                         document_delimiter="\n\n", heldout_fraction=0.1, prepare_workers=workers)
        builders.append(sources.prepare_dataset(data))
        assert builders[-1].tokenize_stats["workers"] == workers
        streams.append({s: stream_of(data, s).tobytes() for s in SPLITS})
    assert streams[0] == streams[1]
    assert builders[0].info.metadata["splits"] == builders[1].info.metadata["splits"]
    assert sorted(re.findall(rb"file \d doc \d+ ", b"".join(streams[0].values()))) == sorted(
        re.findall(rb"file \d doc \d+ ", utf8(docs)))


def test_tokenize_units_resumes_only_the_unfinished_units(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    per_file = [write_txt(root / f"f{k}.txt", [f"{k}:{NON_ASCII} {i}" for i in range(k + 2)])
                for k in range(4)]
    paths = file_corpus.expand_files(str(root), "data.train_files")
    units = file_corpus.plan_units({"train": paths}, "auto")
    assert len(units) == 4
    options = file_corpus.ReadOptions(document_delimiter="\n\n")
    spec = file_tokenizing.tokenizer_spec(make_data(tmp_path))

    def run(out):
        return file_tokenizing.tokenize_units(units, options, spec, str(out), seed=0, workers=1,
                                              progress=False)

    def shard_bytes(out):
        result = {}
        for unit in units:
            shard = file_tokenizing.load_shard(str(out), unit, np.uint8)
            assert shard is not None
            result[unit.index] = (np.asarray(shard.tokens).tobytes(), shard.token_counts.tolist(),
                                  shard.byte_counts.tolist(), shard.scores.tolist())
        return result

    full = run(tmp_path / "fresh")
    assert (full["units"], full["units_done_before"]) == (4, 0)
    assert full["documents"] == sum(len(d) for d in per_file)
    assert full["bytes"] == full["tokens"] == sum(len(utf8(d)) for d in per_file)
    fresh = shard_bytes(tmp_path / "fresh")
    for unit, docs in zip(units, per_file):  # a shard holds its file's documents
        assert fresh[unit.index][0] == utf8(docs)
        assert fresh[unit.index][1] == fresh[unit.index][2] == [len(d.encode()) for d in docs]

    out = tmp_path / "resumed"
    run(out)
    again = run(out)
    assert (again["units"], again["units_done_before"], again["documents"]) == (0, 4, 0)
    for suffix in (".tokens", ".npz"):
        os.remove(out / f"unit-00002{suffix}")
    stats = run(out)
    assert (stats["units"], stats["units_done_before"]) == (1, 3)
    assert stats["documents"] == len(per_file[2])
    assert shard_bytes(out) == fresh
    # A leftover temporary index (a worker killed before its rename) is not a finished unit,
    # nor is a token file shorter than its index says.
    os.replace(out / "unit-00001.npz", out / "unit-00001.npz.tmp4242")
    with open(out / "unit-00003.tokens", "r+b") as f:
        f.truncate(os.path.getsize(out / "unit-00003.tokens") - 1)
    assert file_tokenizing.load_shard(str(out), units[1], np.uint8) is None
    stats = run(out)
    assert (stats["units"], stats["units_done_before"]) == (2, 2)
    assert shard_bytes(out) == fresh
    # A unit that dies while writing its index leaves nothing under the final names.
    for suffix in (".tokens", ".npz"):
        os.remove(out / f"unit-00000{suffix}")

    def dying_savez(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the index")

    monkeypatch.setattr(np, "savez", dying_savez)
    with pytest.raises(KeyboardInterrupt):
        run(out)
    monkeypatch.undo()
    assert not (out / "unit-00000.tokens").exists() and not (out / "unit-00000.npz").exists()
    stats = run(out)
    assert (stats["units"], stats["units_done_before"]) == (1, 3)
    assert shard_bytes(out) == fresh


def test_changed_file_or_tokenizer_is_a_new_dataset(tmp_path, hf_tokenizer):
    root = tmp_path / "corpus"
    train = write_txt(root / "train" / "a.txt", [doc_text(i) for i in range(6)])
    write_txt(root / "train" / "b.txt", ["unchanged " + NON_ASCII])
    val = write_txt(root / "v.txt", ["validation text"])
    data = make_data(tmp_path / "tfds", train_files=str(root / "train"),
                     validation_files=str(root / "v.txt"), test_files=str(root / "v.txt"),
                     document_delimiter="\n\n")
    with pytest.raises(BadInputError, match="overlap"):
        sources.dataset_dir(data)
    (root / "t.txt").write_text("test text 東京")
    data.test_files = str(root / "t.txt")
    old_dir = sources.dataset_dir(data)
    sources.prepare_dataset(data)
    assert stream_of(data, "train").tobytes() == utf8(train + ["unchanged " + NON_ASCII])
    assert stream_of(data, "validation").tobytes() == utf8(val)
    before = tree_digest(old_dir)
    assert any(name.endswith("dataset_info.json") for name in before)

    # mtime alone changes the key; so does content.
    path = root / "train" / "a.txt"
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert sources.dataset_dir(data) != old_dir
    new_train = write_txt(path, ["rewritten " + NON_ASCII, "second"])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    new_dir = sources.dataset_dir(data)
    assert new_dir != old_dir and new_dir.parent == old_dir.parent
    builder = sources.prepare_dataset(data)
    assert str(builder.data_dir).startswith(str(new_dir))
    assert stream_of(data, "train").tobytes() == utf8(new_train + ["unchanged " + NON_ASCII])
    assert builder.info.metadata["splits"]["train"]["num_documents"] == 3
    assert tree_digest(old_dir) == before  # the old build is left as it was

    # The tokenizer's content keys the dataset (a rewrite with the same bytes does not).
    tok = tmp_path / "tok.json"
    shutil.copyfile(hf_tokenizer, tok)
    data.tokenizer, data.tokenizer_file = "huggingface", str(tok)
    hf_dir = sources.dataset_dir(data)
    assert hf_dir != new_dir
    tok.write_bytes(tok.read_bytes())
    os.utime(tok, ns=(os.stat(tok).st_atime_ns, os.stat(tok).st_mtime_ns + 10**9))
    assert sources.dataset_dir(data) == hf_dir
    train_bpe(tok, TRAIN_TEXTS, vocab_size=300)
    assert sources.dataset_dir(data) != hf_dir


def test_interrupted_preparation_is_not_a_dataset_and_resumes(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    docs = [write_txt(root / f"f{k}.txt", [f"{k}: {doc_text(i)}" for i in range(4)])
            for k in range(3)]
    val = write_txt(root / "val" / "v.txt", ["held " + NON_ASCII])
    data = make_data(tmp_path / "tfds", train_files=str(root / "f*.txt"),
                     validation_files=str(root / "val"), test_files=str(root / "val"),
                     document_delimiter="\n\n")
    with pytest.raises(BadInputError, match="overlap"):
        sources.make_builder(data)
    data.test_files = ""
    data.heldout_fraction = 0.2  # test held out of 12 train docs

    real_tokenize = file_tokenizing.tokenize_unit
    calls = []

    def interrupted(unit, *args, **kwargs):
        calls.append(unit.index)
        if len(calls) == 2:
            raise RuntimeError("simulated interruption")
        return real_tokenize(unit, *args, **kwargs)

    monkeypatch.setattr(file_tokenizing, "tokenize_unit", interrupted)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        sources.prepare_dataset(data)
    monkeypatch.undo()
    builder = sources.make_builder(data)
    assert not builder.is_prepared()
    found = [os.path.join(d, n) for d, _, ns in os.walk(tmp_path / "tfds") for n in ns]
    assert not [p for p in found if p.endswith("dataset_info.json")], found
    assert os.path.exists(os.path.join(builder.shard_dir(), "unit-00000.npz"))

    builder = sources.prepare_dataset(data)
    assert builder.is_prepared()
    units = 4  # 3 train files + 1 validation file
    assert builder.tokenize_stats["units_done_before"] == 1
    assert builder.tokenize_stats["units"] == units - 1
    assert not os.path.exists(builder.shard_dir())  # removed once the records hold it all
    assert stream_of(data, "validation").tobytes() == utf8(val)
    train_test = stream_of(data, "train").tobytes() + stream_of(data, "test").tobytes()
    assert sorted(re.findall(rb"\d: doc \d+ ", train_test)) == sorted(
        re.findall(rb"\d: doc \d+ ", utf8(sum(docs, []))))
    meta = builder.info.metadata["splits"]
    assert meta["train"]["num_documents"] + meta["test"]["num_documents"] == 12
    assert meta["test"]["num_documents"] == round(0.2 * 12)


# --- bad input -------------------------------------------------------------------------------

def raises_bad(data, *fragments):
    with pytest.raises(BadInputError) as info:
        sources.prepare_dataset(data)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_bad_input_messages_name_file_and_line(tmp_path):
    def data(**kw):
        return make_data(tmp_path / "tfds", document_delimiter="\n\n", **kw)

    good = tmp_path / "good.txt"
    write_txt(good, [doc_text(i) for i in range(5)])
    other = tmp_path / "other" / "other.txt"
    write_txt(other, ["other " + NON_ASCII])
    # A glob, or a folder, naming nothing.
    raises_bad(data(train_files=str(tmp_path / "nothing*.txt")), "data.train_files",
               "nothing*.txt")
    (tmp_path / "empty_dir").mkdir()
    raises_bad(data(train_files=str(good), validation_files=str(tmp_path / "empty_dir")),
               "data.validation_files")
    # An empty file.
    (tmp_path / "empty.txt").write_bytes(b"")
    raises_bad(data(train_files=str(tmp_path / "empty.txt")), real(tmp_path / "empty.txt"),
               "empty")
    # A file of whitespace only.
    (tmp_path / "blank.txt").write_bytes(b"  \n\n \t\n")
    raises_bad(data(train_files=str(tmp_path / "blank.txt")), real(tmp_path / "blank.txt"))
    # Invalid UTF-8, in plain and gzipped text, whole-file and delimited: the line is right.
    raw = "first line\nsecond é line\n\nthird\nfo".encode() + b"\xff" + b"urth\nfifth\n"
    for name in ("bad.txt", "bad.txt.gz"):
        path = tmp_path / name
        path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
        for delimiter in ("\n\n", ""):
            d = data(train_files=str(path), validation_files=str(good), test_files=str(other))
            d.document_delimiter = delimiter
            raises_bad(d, real(path), "line 5", "data.encoding_errors")
    # encoding_errors=replace reads the byte as U+FFFD.
    d = data(train_files=str(tmp_path / "bad.txt"), validation_files=str(good),
             test_files=str(good), encoding_errors="replace")
    d.test_files = str(tmp_path / "bad.txt.gz")
    sources.prepare_dataset(d)
    expected = utf8(nonblank(raw.decode("utf-8", errors="replace").split("\n\n")))
    assert "\ufffd".encode() in expected
    assert stream_of(d, "train").tobytes() == expected
    assert stream_of(d, "test").tobytes() == expected
    # The bytes counted (bits per byte) are those of the text read, U+FFFD included.
    assert data_lib.split_stats(d, "train")["num_bytes"] == len(expected)
    # JSONL: not JSON (gzipped, after a blank line), a line without the field, not text.
    bad_json = tmp_path / "bad.jsonl.gz"
    bad_json.write_bytes(gzip.compress(
        ('{"text": "東京 one"}\n\n{"text": "naïve"}\n{"text": "broken\n{"text": "x"}\n').encode()))
    raises_bad(data(train_files=str(bad_json)), real(bad_json), "line 4", "not JSON")
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"text": "héllo"}\n{"text": "ok"}\n{"body": "wörld"}\n', "utf-8")
    raises_bad(data(train_files=str(no_field)), real(no_field), "line 3", "'text'",
               "data.text_field")
    not_text = tmp_path / "number.jsonl"
    not_text.write_text('{"text": "a"}\n{"text": 7}\n', "utf-8")
    raises_bad(data(train_files=str(not_text)), real(not_text), "line 2", "int")
    # Parquet without the column.
    no_column = tmp_path / "nocol.parquet"
    write_parquet(no_column, ["a", "b"], column="body")
    raises_bad(data(train_files=str(no_column)), real(no_column), "'text'", "body")
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_bytes(b"PAR1 not really")
    raises_bad(data(train_files=str(not_parquet)), real(not_parquet))
    # Validation files overlapping the train files.
    raises_bad(data(train_files=str(tmp_path / "*.txt"), validation_files=str(good)),
               real(good), "data.validation_files", "overlap")
    # Too few documents to hold out validation and test whole documents.
    two = tmp_path / "two" / "two.txt"
    write_txt(two, ["only one " + NON_ASCII, "and two"])
    raises_bad(data(train_files=str(two)), "2 document(s)", "data.validation_files")
    # A split of fewer than 2 tokens.
    tiny = tmp_path / "tiny" / "t.md"
    write_txt(tiny, ["x"])
    raises_bad(data(train_files=str(good), validation_files=str(tiny), test_files=str(other)),
               "validation split would hold 1 token", "data.validation_files")


def test_bad_tokenizer_file(tmp_path, corpus):
    garbage = tmp_path / "tokenizer.json"
    garbage.write_bytes(b"{ this is not a tokenizer \xff")
    with pytest.raises(BadInputError, match=re.escape(str(garbage))) as info:
        data_lib.HuggingFaceTokenizer(garbage)
    assert "data.tokenizer_file" in str(info.value)
    data = make_data(tmp_path / "tfds", tokenizer="huggingface", tokenizer_file=str(garbage),
                     document_delimiter="\n\n", **corpus["files"])
    raises_bad(data, str(garbage), "data.tokenizer_file")
    data.tokenizer_file = str(tmp_path / "missing.json")
    with pytest.raises(DataNotPreparedError, match="data.tokenizer_file"):
        sources.prepare_dataset(data)


def test_data_problems_of_files_fields():
    data = make_data("/nonexistent")
    problems = "\n".join(config_lib.data_problems(data))
    assert "data.train_files" in problems
    data = make_data("/nonexistent", train_files="x.txt", heldout_fraction=0.6,
                     tokenizer="huggingface", file_format="csv", encoding_errors="ignore",
                     prepare_workers=-1)
    problems = "\n".join(config_lib.data_problems(data))
    for field in ("data.heldout_fraction", "data.tokenizer_file", "data.file_format",
                  "data.encoding_errors", "data.prepare_workers"):
        assert field in problems, field
    assert "data.train_files" not in problems
    # Given validation and test files, the held-out fraction does not matter.
    data = make_data("/nonexistent", train_files="x", validation_files="y", test_files="z",
                     heldout_fraction=0.0)
    assert config_lib.data_problems(data) == []


def test_vocab_larger_than_the_model_is_reported(hf_tokenizer, tmp_path):
    from train_helpers import tiny_config

    from rmoe_jax.train.loop import validate_all

    vocab = hf.Tokenizer.from_file(str(hf_tokenizer)).get_vocab_size(with_added_tokens=True)
    assert vocab > 256
    fields = dict(data__dataset="files", data__train_files=str(tmp_path / "*.txt"),
                  data__tokenizer="huggingface", data__tokenizer_file=str(hf_tokenizer),
                  data__data_dir=str(tmp_path))
    with pytest.raises(config_lib.ConfigError,
                       match=rf"model\.vocab_size: 256 is smaller than the tokenizer's vocabulary \({vocab}\)"):
        validate_all(tiny_config(model__vocab_size=256, **fields))
    validate_all(tiny_config(model__vocab_size=vocab, **fields))


def test_single_worker_read_error_is_a_bad_input_error_in_a_fresh_process(tmp_path, monkeypatch):
    # A fresh interpreter has no `process` attribute on `concurrent.futures` until a process pool
    # was used; the single-worker path must not depend on it (it once raised AttributeError).
    monkeypatch.delattr(concurrent.futures, "process", raising=False)
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok\n\xff\n")
    data = make_data(tmp_path / "tfds", train_files=str(path), validation_files=str(path))
    data.validation_files = ""
    raises_bad(data, real(path), "line 2")


# --- the prepare CLI -----------------------------------------------------------------------

def test_prepare_cli_files(corpus, hf_tokenizer, tmp_path, capsys):
    files = corpus["files"]
    args = ["--dataset", "files", "--data_dir", str(tmp_path / "tfds"), "--train_files",
            files["train_files"], "--validation_files", files["validation_files"],
            "--test_files", files["test_files"], "--document_delimiter", "\\n\\n",
            "--workers", "1", "--seq_len", "16"]
    capsys.readouterr()
    assert prepare.main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"tokenized \d+ unit\(s\): .* MB/s, [\d,]+ tokens/s", out), out
    for split in SPLITS:
        raw = utf8(corpus["docs"][split])
        assert (f"{split} with byte tokens: num_documents={len(corpus['docs'][split]):,}, "
                f"num_bytes={len(raw):,}, num_tokens={len(raw):,}") in out, out
    # Again: nothing left to tokenize, the dataset is reused.
    assert prepare.main(args) == 0
    assert "tokenized" not in capsys.readouterr().out
    # A bad glob: exit 2, one line on stderr.
    bad = args[:5] + [str(tmp_path / "nope" / "*.jsonl")] + args[6:]
    assert prepare.main(bad) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.train_files"), captured.err
    assert "Traceback" not in captured.err
    # With --config, the training config's data fields (and overrides) are prepared.
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "llama_0p91b.py")
    args = ["--config", f"{config}:files", f"--config.data.train_files={files['train_files']}",
            f"--config.data.validation_files={files['validation_files']}",
            f"--config.data.test_files={files['test_files']}",
            "--config.data.document_delimiter=\\n\\n",
            f"--config.data.tokenizer_file={hf_tokenizer}",
            f"--config.data.data_dir={tmp_path / 'tfds_cfg'}", "--workers", "1"]
    assert prepare.main(args) == 0
    out = capsys.readouterr().out
    ref = hf.Tokenizer.from_file(str(hf_tokenizer))
    docs = corpus["docs"]["train"]
    tokens = sum(len(ref.encode(d, add_special_tokens=False).ids) + 1 for d in docs)
    assert f"train with huggingface tokens: num_documents={len(docs):,}" in out, out
    assert f"num_tokens={tokens:,}" in out, out
