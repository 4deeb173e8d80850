"""Tests of the PTB token batches against an independent reading of the text."""

from __future__ import annotations

import csv
import io
import json
import math
import zipfile

import numpy as np
import pytest

import onnxeps
from onnxeps.converters import nlp
from onnxeps.corpus import read_splits, token_batch
from onnxeps.errors import InputError

PTB_STEPS = 70
PTB_COLUMNS = 256
PTB_VOCABULARY = 10_000


@pytest.fixture(scope="module")
def ptb_zip(data_dir):
    return data_dir / "inputs" / "ptb.zip"


@pytest.fixture(scope="module")
def ptb_train_ids(ptb_zip) -> tuple[np.ndarray, dict[str, int]]:
    """Read train.txt line by line, as the benchmark's data loader did.

    Ids are assigned in order of first appearance, each line ending with <eos>.
    """
    vocabulary: dict[str, int] = {}
    ids: list[int] = []
    with zipfile.ZipFile(ptb_zip) as archive:
        with archive.open("ptb/train.txt") as raw:
            for line in io.TextIOWrapper(raw, encoding="utf-8"):
                for word in line.split() + ["<eos>"]:
                    if word not in vocabulary:
                        vocabulary[word] = len(vocabulary)
                    ids.append(vocabulary[word])
    return np.asarray(ids, dtype=np.int64), vocabulary


@pytest.fixture(scope="module")
def ptb_batch(ptb_zip) -> tuple[np.ndarray, int]:
    return token_batch(ptb_zip, PTB_STEPS, PTB_COLUMNS)


def test_ptb_vocabulary_size(ptb_batch):
    _, vocabulary = ptb_batch
    assert vocabulary == PTB_VOCABULARY


def test_ptb_batch_shape(ptb_batch):
    tokens, _ = ptb_batch
    assert tokens.shape == (PTB_STEPS, PTB_COLUMNS)
    assert tokens.dtype == np.int64


def test_ptb_train_covers_vocabulary(ptb_train_ids):
    # Every valid and test word also occurs in train, so train alone gives all ids.
    _, vocabulary = ptb_train_ids
    assert len(vocabulary) == PTB_VOCABULARY


def test_ptb_first_ids(ptb_batch, ptb_train_ids):
    tokens, _ = ptb_batch
    _, vocabulary = ptb_train_ids
    # train.txt starts with " aer banknote berlitz ...", so these get ids 0, 1, 2.
    assert vocabulary["aer"] == 0
    assert vocabulary["banknote"] == 1
    assert tokens[:3, 0].tolist() == [0, 1, 2]


def test_ptb_columns_are_chunks(ptb_batch, ptb_train_ids):
    tokens, _ = ptb_batch
    ids, _ = ptb_train_ids
    rows = ids.size // PTB_COLUMNS
    assert rows == 3631
    for column in range(PTB_COLUMNS):
        start = column * rows
        expected = ids[start : start + PTB_STEPS]
        assert np.array_equal(tokens[:, column], expected), f"column {column}"


def test_ptb_eos_in_batch(ptb_batch, ptb_train_ids):
    tokens, _ = ptb_batch
    _, vocabulary = ptb_train_ids
    assert np.any(tokens == vocabulary["<eos>"])


# ----- handmade text with known ids -----

# Train "a b / c a" gives a=0 b=1 <eos>=2 c=3: stream 0 1 2 3 0 2.
TRAIN_TEXT = "a b\nc a\n"
# Valid adds d=4 and test adds e=5, after every training id.
VALID_TEXT = "d a\n"
TEST_TEXT = "e\n"


def write_zip(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_zip_known_ids(tmp_path):
    path = tmp_path / "tiny.zip"
    write_zip(
        path,
        {
            "tiny/": b"",
            "tiny/train.txt": TRAIN_TEXT.encode(),
            "tiny/valid.txt": VALID_TEXT.encode(),
            "tiny/test.txt": TEST_TEXT.encode(),
            "__MACOSX/tiny/._train.txt": b"\x00\x05\x16\x07\xff\xfe",
        },
    )
    tokens, vocabulary = token_batch(path, 3, 2)
    # Two columns of three rows, [0 1 2] and [3 0 2], sequence first.
    assert tokens.tolist() == [[0, 3], [1, 0], [2, 2]]
    assert vocabulary == 6


def test_zip_dotted_split_names(tmp_path):
    # ptb.train.txt-style names are found as well as train.txt.
    path = tmp_path / "dotted.zip"
    write_zip(
        path,
        {"ptb.train.txt": TRAIN_TEXT.encode(), "ptb.valid.txt": VALID_TEXT.encode()},
    )
    splits = read_splits(path)
    assert splits["train"] == TRAIN_TEXT
    assert splits["valid"] == VALID_TEXT
    assert "test" not in splits


def test_zip_drops_short_tail(tmp_path):
    # A last line without a newline still ends with <eos>: a b <eos> c a <eos> z <eos>
    # is 8 tokens, so 3 columns get 2 rows each and the last 2 tokens are dropped.
    path = tmp_path / "tail.zip"
    write_zip(path, {"train.txt": b"a b\nc a\nz"})
    tokens, vocabulary = token_batch(path, 2, 3)
    assert tokens.tolist() == [[0, 2, 0], [1, 3, 2]]
    # z (id 4) is in the vocabulary although it falls in the dropped tail.
    assert vocabulary == 5


def test_txt_known_ids(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TRAIN_TEXT, encoding="utf-8")
    tokens, vocabulary = token_batch(path, 2, 3)
    # Three columns of two rows: [0 1], [2 3] and [0 2].
    assert tokens.tolist() == [[0, 2, 0], [1, 3, 2]]
    assert vocabulary == 4


def test_txt_is_training_text(tmp_path):
    path = tmp_path / "any.txt"
    path.write_text(VALID_TEXT, encoding="utf-8")
    assert read_splits(path) == {"train": VALID_TEXT}


def test_missing_file_raises(tmp_path):
    with pytest.raises(InputError, match="not found"):
        token_batch(tmp_path / "absent.zip", 3, 2)


def test_zip_without_train_raises(tmp_path):
    path = tmp_path / "no_train.zip"
    write_zip(path, {"ptb/valid.txt": VALID_TEXT.encode(), "ptb/readme.md": b"x"})
    with pytest.raises(InputError, match="no training text"):
        token_batch(path, 3, 2)


def test_too_little_text_raises(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text(TRAIN_TEXT, encoding="utf-8")
    # Six tokens cannot fill 2 columns of 4 steps.
    with pytest.raises(InputError, match="6 tokens"):
        token_batch(path, 4, 2)


def test_invalid_zip_raises(tmp_path):
    path = tmp_path / "broken.zip"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(InputError, match="cannot read"):
        token_batch(path, 3, 2)


def test_invalid_utf8_raises(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(InputError, match="cannot read"):
        token_batch(path, 1, 1)


# ----- scoring a language model on PTB text -----

SCORE_STEPS = 8
SCORE_COLUMNS = 4


@pytest.fixture(scope="module")
def recipe_1000000(data_dir) -> dict:
    """The cell f = linear(x, h_prev_0), h_new_0 = tanh(f)."""
    path = data_dir / "nas-bench-nlp" / "nlp_wt2_recipes_joined_ptb.csv"
    with open(path, newline="", encoding="utf-8-sig") as stream:
        for row in csv.DictReader(stream):
            if row["recipe_id"] == "1000000":
                return json.loads(row["recipe"])
    pytest.fail(f"recipe 1000000 not found in {path}")


def test_score_ptb_zip(ptb_zip, recipe_1000000):
    model = nlp.build(recipe_1000000, vocab_size=PTB_VOCABULARY, seq_len=SCORE_STEPS)
    result = onnxeps.score(
        model, ptb_zip, batch_size=SCORE_COLUMNS, seq_len=SCORE_STEPS, preset="nlp"
    )
    assert result.input == f"file:{ptb_zip}"
    assert result.batch_size == SCORE_COLUMNS
    assert result.output == "hidden_unit0"
    if result.epsilon is None:
        assert result.reason
    else:
        assert math.isfinite(result.epsilon)


def test_score_txt_file(data_dir, recipe_1000000):
    # A single .txt file is the training text: PTB valid has fewer than 10,000 words.
    path = data_dir / "inputs" / "ptb.valid.txt"
    model = nlp.build(recipe_1000000, vocab_size=PTB_VOCABULARY, seq_len=SCORE_STEPS)
    result = onnxeps.score(
        model, path, batch_size=SCORE_COLUMNS, seq_len=SCORE_STEPS, preset="nlp"
    )
    assert result.input == f"file:{path}"
    if result.epsilon is None:
        assert result.reason
    else:
        assert math.isfinite(result.epsilon)


def test_score_vocabulary_too_large(ptb_zip, recipe_1000000):
    model = nlp.build(recipe_1000000, vocab_size=100, seq_len=SCORE_STEPS)
    with pytest.raises(InputError, match="10000 distinct tokens") as caught:
        onnxeps.score(
            model, ptb_zip, batch_size=SCORE_COLUMNS, seq_len=SCORE_STEPS, preset="nlp"
        )
    assert "100 rows" in str(caught.value)
