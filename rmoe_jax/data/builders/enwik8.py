"""TFDS builder `enwik8`: the Hutter-prize byte corpus with its standard split.

Source: the 100,000,000-byte file `enwik8` inside `enwik8.zip`. The zip is taken from TFDS'
manual dir, `<data_dir>/downloads/manual/enwik8.zip`; when it is not there and downloads
are allowed, it is fetched from http://mattmahoney.net/dc/enwik8.zip into that same path.

Split (the paper, section 4): the first `train_bytes` (90,000,000) bytes are `train`, the next
`validation_bytes` (5,000,000) `validation`, the last `test_bytes` (5,000,000) `test`. The
three counts live in the builder config so a small synthetic zip of the same layout can be
split exactly; their sum must equal the size of the `enwik8` member, so a wrong or truncated
file fails loudly instead of silently shifting the boundaries.

Each split is stored as records of `chunk_bytes` (1 MiB) contiguous bytes,
`{'bytes': bytes, 'index': int64}`, written in order (`disable_shuffling=True`), so
concatenating the records of a split in order reproduces its bytes exactly. Chunks may cut
a UTF-8 character in two, so the feature is a plain byte string, not `Text`.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.request
import zipfile
import zlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from rmoe_jax.data.builders.base import Builder
from rmoe_jax.data.errors import DataNotPreparedError

URL = "http://mattmahoney.net/dc/enwik8.zip"
ZIP_NAME = "enwik8.zip"
MEMBER = "enwik8"
STANDARD_SPLIT_BYTES = (90_000_000, 5_000_000, 5_000_000)  # train, validation, test
CHUNK_BYTES = 1 << 20
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class Enwik8Config(tfds.core.BuilderConfig):
    """Where the split boundaries fall, in bytes from the start of the `enwik8` member."""

    train_bytes: int = STANDARD_SPLIT_BYTES[0]
    validation_bytes: int = STANDARD_SPLIT_BYTES[1]
    test_bytes: int = STANDARD_SPLIT_BYTES[2]
    chunk_bytes: int = CHUNK_BYTES


def make_config(train_bytes: int, validation_bytes: int, test_bytes: int) -> Enwik8Config:
    """The builder config for these split sizes.

    The standard sizes are config `standard`; any other triple gets its own name (and so its
    own folder `<data_dir>/enwik8/<name>/`), so data built for one split is never read back
    as another.
    """
    sizes = (int(train_bytes), int(validation_bytes), int(test_bytes))
    name = "standard" if sizes == STANDARD_SPLIT_BYTES else "bytes_{}_{}_{}".format(*sizes)
    return Enwik8Config(name=name, train_bytes=sizes[0], validation_bytes=sizes[1],
                        test_bytes=sizes[2], description=f"train/validation/test bytes {sizes}")


def config_arg(train_bytes: int, validation_bytes: int, test_bytes: int) -> str | Enwik8Config:
    """What to pass as `Enwik8(config=...)`: the registered name for the standard split
    (TFDS refuses a custom config object that reuses a registered name), else the object."""
    config = make_config(train_bytes, validation_bytes, test_bytes)
    return config.name if config.name == "standard" else config


def split_ranges(config: Enwik8Config) -> dict[str, tuple[int, int]]:
    """{split: (start, stop)} byte offsets into the `enwik8` member; contiguous, in order."""
    t, v, s = config.train_bytes, config.validation_bytes, config.test_bytes
    return {"train": (0, t), "validation": (t, t + v), "test": (t + v, t + v + s)}


def manual_zip_path(data_dir: str | os.PathLike) -> epath.Path:
    """Where the builder looks for the zip: `<data_dir>/downloads/manual/enwik8.zip`."""
    return epath.Path(data_dir) / "downloads" / "manual" / ZIP_NAME


def prepare_command(data_dir: str | os.PathLike) -> str:
    return f"python -m rmoe_jax.data.prepare --dataset enwik8 --data_dir {data_dir}"


def _download(url: str, path: epath.Path) -> None:
    """Fetch `url` to `path` via a temporary file, so a cut download never looks complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
        while block := response.read(1 << 20):
            out.write(block)
    tmp.rename(path)


def find_zip(zip_path: epath.Path, data_dir: str | os.PathLike, allow_download: bool) -> epath.Path:
    """Return `zip_path`, downloading it first if it is missing and downloads are allowed.

    Raises:
      DataNotPreparedError: the zip is missing (and could not be downloaded); the message
        names the full path to put it at and the command to run afterwards.
    """
    if zip_path.exists():
        return zip_path
    why = "downloads are disabled (data.allow_download=False)"
    if allow_download:
        try:
            _download(URL, zip_path)
            return zip_path
        except Exception as e:  # noqa: BLE001 - any network failure means "put it there by hand"
            why = f"downloading {URL} failed: {type(e).__name__}: {e}"
    raise DataNotPreparedError(
        f"enwik8 is not prepared and the raw file is missing: put enwik8.zip (from {URL}; a zip "
        f"holding the 100,000,000-byte file '{MEMBER}') at {zip_path} and run: "
        f"{prepare_command(data_dir)} ({why})")


def check_zip(zip_path: epath.Path, config: Enwik8Config, data_dir: str | os.PathLike) -> int:
    """The size of the `enwik8` member of `zip_path`, checked against the split sizes.

    Raises:
      DataNotPreparedError: the file is not a zip, lacks the member, or the member's size is
        not the sum of the split sizes; the message names the file and says what to do.
    """
    fix = (f"replace it with enwik8.zip from {URL} (a zip holding the 100,000,000-byte file "
           f"'{MEMBER}') and run: {prepare_command(data_dir)}")
    try:
        with zipfile.ZipFile(zip_path) as zf:
            try:
                size = zf.getinfo(MEMBER).file_size
            except KeyError:
                raise DataNotPreparedError(
                    f"{zip_path} has no member named '{MEMBER}' (members: "
                    f"{zf.namelist()[:10]}): {fix}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise DataNotPreparedError(f"{zip_path} is not a readable zip file ({e}): {fix}") from None
    except OSError as e:
        raise DataNotPreparedError(f"{zip_path} cannot be read ({e.strerror or e}): {fix}") from None
    total = config.train_bytes + config.validation_bytes + config.test_bytes
    if size != total:
        raise DataNotPreparedError(
            f"{zip_path}: '{MEMBER}' has {size:,} bytes but the split sizes add up to {total:,} "
            f"(data.enwik8_train_bytes={config.train_bytes}, data.enwik8_validation_bytes="
            f"{config.validation_bytes}, data.enwik8_test_bytes={config.test_bytes}): {fix}, or "
            f"set the three sizes to add up to {size:,}")
    return size


class Enwik8(Builder):
    """enwik8 as contiguous byte chunks; see the module docstring."""

    name = "enwik8"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Byte chunks of 1 MiB; split by byte counts from the config."}
    BUILDER_CONFIGS = [make_config(*STANDARD_SPLIT_BYTES)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put {ZIP_NAME} (from {URL}) in the manual dir, <data_dir>/downloads/manual/.")

    def __init__(self, *, allow_download: bool = True, **kwargs):
        """`allow_download`: fetch the zip from URL when it is not in the manual dir."""
        self._allow_download = allow_download
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                # A string scalar holds arbitrary bytes and, like Text, needs no TensorFlow.
                "bytes": tfds.features.Scalar(dtype=np.object_, doc="contiguous raw bytes"),
                "index": tfds.features.Scalar(dtype=np.int64, doc="chunk number in the split"),
            }),
            homepage="http://mattmahoney.net/dc/textdata.html",
            disable_shuffling=True,  # records stay in byte order
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        # `dl_manager.manual_dir` raises when the folder is missing or empty; we want to fall
        # back to downloading into it instead, so derive the default location ourselves.
        try:
            zip_path = epath.Path(dl_manager.manual_dir) / ZIP_NAME
        except AssertionError:
            zip_path = epath.Path(dl_manager.download_dir) / "manual" / ZIP_NAME
        zip_path = find_zip(zip_path, self.data_dir_root, self._allow_download)
        config: Enwik8Config = self.builder_config
        check_zip(zip_path, config, self.data_dir_root)
        return {split: self._generate_examples(zip_path, start, stop)
                for split, (start, stop) in split_ranges(config).items()}

    def _generate_examples(self, zip_path: epath.Path, start: int, stop: int):
        chunk = self.builder_config.chunk_bytes
        try:
            with zipfile.ZipFile(zip_path) as zf, zf.open(MEMBER) as f:
                f.seek(start)  # a zip stream seeks by decompressing forward: fine for 100 MB
                for index, offset in enumerate(range(start, stop, chunk)):
                    data = f.read(min(chunk, stop - offset))
                    if len(data) != min(chunk, stop - offset):
                        raise EOFError(f"short read at byte {offset + len(data):,}")
                    yield index, {"bytes": data, "index": index}
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a damaged (not just cut) zip
            raise DataNotPreparedError(
                f"{zip_path} is damaged ({type(e).__name__}: {e}): replace it with enwik8.zip "
                f"from {URL} and run: {prepare_command(self.data_dir_root)}") from None
