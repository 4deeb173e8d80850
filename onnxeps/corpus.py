"""Token batches from word-level text, prepared as the NAS-Bench-NLP benchmark did.

The dictionary assigns ids in order of first appearance over the training, validation
and test text (training first), each line ending with an ``<eos>`` token. The training
token stream is cut into ``batch_size`` equal contiguous columns (sequence-first), and the
first ``seq_len`` rows form the batch. Penn Treebank gives 10,000 ids.
"""

from __future__ import annotations

import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from onnxeps.errors import InputError

__all__ = ["TEXT_SUFFIXES", "read_splits", "token_batch"]

TEXT_SUFFIXES = (".zip", ".txt")
_SPLITS = ("train", "valid", "test")
_END_OF_SENTENCE = "<eos>"


def _zip_splits(path: Path) -> dict[str, str]:
    splits: dict[str, str] = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            name = Path(member).name
            if "__MACOSX" in member or not name.endswith(".txt"):
                continue
            for split in _SPLITS:
                if name.startswith(split) or name.endswith(f".{split}.txt"):
                    splits[split] = archive.read(member).decode("utf-8")
    return splits


def read_splits(path: str | Path) -> dict[str, str]:
    """Read train/valid/test text from a zip, or one .txt file used as training text."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: text file not found.")
    try:
        if path.suffix == ".zip":
            splits = _zip_splits(path)
        else:
            splits = {"train": path.read_text(encoding="utf-8")}
    except (zipfile.BadZipFile, UnicodeDecodeError, OSError) as error:
        raise InputError(f"{path}: cannot read the text ({error}).") from error
    if "train" not in splits:
        raise InputError(
            f"{path}: no training text found.",
            "Pass a zip holding train.txt (and valid.txt, test.txt) or one .txt file.",
        )
    return splits


def _tokens(text: str) -> list[str]:
    words: list[str] = []
    for line in text.splitlines():
        words.extend(line.split())
        words.append(_END_OF_SENTENCE)
    return words


@lru_cache(maxsize=4)
def token_batch(
    path: str | Path, seq_len: int, batch_size: int
) -> tuple[np.ndarray, int]:
    """Return the (seq_len, batch_size) int64 token batch and the vocabulary size.

    Results are cached per (path, seq_len, batch_size), so a benchmark reads the text
    once; the returned array is read-only.
    """
    splits = read_splits(path)
    vocabulary: dict[str, int] = {}
    streams: dict[str, list[int]] = {}
    for split in _SPLITS:
        if split in splits:
            ids = [vocabulary.setdefault(w, len(vocabulary)) for w in _tokens(splits[split])]
            streams[split] = ids
    train = np.asarray(streams["train"], dtype=np.int64)
    rows = train.size // batch_size
    if rows < seq_len:
        raise InputError(
            f"{path}: the training text contains {train.size} tokens, too few for "
            f"{batch_size} columns of {seq_len} steps."
        )
    columns = train[: rows * batch_size].reshape(batch_size, rows).T
    batch = np.ascontiguousarray(columns[:seq_len])
    batch.flags.writeable = False
    return batch, len(vocabulary)
