"""Data sets and splits: users and texts never cross splits; loaders read the paper's sets from local files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmark.config import DataSpec
from benchmark.datasets import (
    DatasetError,
    load_splits,
    load_users,
    split_users,
    truncate_to_budget,
    write_user_jsonl,
)
from popri.data import UserData, from_records, read_user_file
from tests.tiny_models import byte_tokenizer


def _users(n: int, per_user: int = 4) -> list[tuple[str, str]]:
    records = [(f"user{u}", f"user {u} says line number {i} of the play") for u in range(n) for i in range(per_user)]
    # Lines every character says: they must not end up both in train and in test.
    records += [(f"user{u}", "My lord, the king is coming.") for u in range(0, n, 3)]
    records += [(f"user{u}", "  MY LORD,  the king is coming.  ") for u in range(1, n, 5)]
    return records


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def test_split_holds_out_users_and_shares_no_text() -> None:
    # Prepare
    data = from_records(_users(60))

    # Execute
    splits = split_users(data, validation_fraction=0.2, test_fraction=0.2, seed=3)

    # Assert: users are disjoint and cover everyone who kept a text; no normalised text is in two splits.
    train, val, test = (set(s.users) for s in (splits.train, splits.validation, splits.test))
    assert not train & val and not train & test and not val & test
    assert len(train) == 36
    texts = [{_norm(t) for t in s.texts} for s in (splits.train, splits.validation, splits.test)]
    assert not texts[0] & texts[1] and not texts[0] & texts[2] and not texts[1] & texts[2]
    assert "my lord, the king is coming." in texts[0]  # the shared line stays in train only
    # every text of a held-out user is in its split, except the shared line
    for split in (splits.validation, splits.test):
        for u in range(split.num_users):
            assert len(split.texts_of(u)) == 4


def test_split_is_seeded_and_caps_evaluation_texts() -> None:
    data = from_records(_users(50))
    a = split_users(data, validation_fraction=0.2, test_fraction=0.2, seed=1, max_validation_texts=7, max_test_texts=9)
    b = split_users(data, validation_fraction=0.2, test_fraction=0.2, seed=1, max_validation_texts=7, max_test_texts=9)
    c = split_users(data, validation_fraction=0.2, test_fraction=0.2, seed=2)
    assert a.test.texts == b.test.texts and a.train.users == b.train.users
    assert a.train.users != c.train.users
    assert len(a.validation.texts) == 7 and len(a.test.texts) == 9


def test_split_refuses_too_few_users() -> None:
    with pytest.raises(DatasetError, match="too few"):
        split_users(from_records(_users(2)), validation_fraction=0.3, test_fraction=0.3, seed=0)


def test_truncation_to_token_budget() -> None:
    tok = byte_tokenizer()
    out = truncate_to_budget(["short", "x" * 100, "héllo wörld"], tok, 8)
    assert out[0] == "short"
    assert out[1] == "x" * 8
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) <= 8 for t in out)


def test_load_splits_from_user_file(tmp_path: Path) -> None:
    # Prepare: popri's user JSONL format.
    path = tmp_path / "users.jsonl"
    path.write_text("".join(json.dumps({"user": u, "text": t}) + "\n" for u, t in _users(30)))
    spec = DataSpec(dataset=str(path), token_budget=16, validation_fraction=0.2, test_fraction=0.2)

    # Execute
    splits = load_splits(spec, byte_tokenizer(), seed=0)

    # Assert
    assert splits.name == "users"
    assert splits.summary()["held_out"] == "users"
    assert all(len(t.encode()) <= 16 for t in splits.train.texts + splits.test.texts)
    assert splits.train.num_users + splits.validation.num_users + splits.test.num_users == 30


def test_congress_biorxiv_pubmed_from_local_files(tmp_path: Path) -> None:
    # Congress: one record per speech, user = speaker.
    congress = tmp_path / "congress.jsonl"
    rows = [
        {
            "url": "u",
            "date_str": "2024-01-02",
            "title": "t",
            "speaker": f"Rep. {i % 3}",
            "data": f"Speech number {i}.",
            "chamber": "House",
            "country": "US",
        }
        for i in range(9)
    ]
    congress.write_text("".join(json.dumps(r) + "\n" for r in rows))
    users = load_users(DataSpec(dataset="congress", data_file=str(congress), min_text_chars=5), seed=0)
    assert users.num_users == 3 and len(users.texts) == 9

    # bioRxiv: API records (a JSON list), one abstract per user.
    biorxiv = tmp_path / "biorxiv.json"
    biorxiv.write_text(
        json.dumps(
            [{"doi": f"10.1101/{i}", "abstract": f"Abstract {i} about cells.", "license": "cc_by"} for i in range(5)]
        )
    )
    users = load_users(DataSpec(dataset="biorxiv", data_file=str(biorxiv), min_text_chars=5), seed=0)
    assert users.num_users == 5

    # PubMed: Aug-PE CSVs in a folder, every record its own user (central DP).
    folder = tmp_path / "pubmed"
    folder.mkdir()
    (folder / "train.csv").write_text("text\nFirst abstract text.\nSecond abstract text.\n")
    (folder / "dev.csv").write_text("text\nThird abstract text.\n")
    users = load_users(DataSpec(dataset="pubmed", data_file=str(folder), min_text_chars=5), seed=0)
    assert users.num_users == 3 and sorted(users.texts)[0] == "First abstract text."


def test_named_set_errors_say_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="--data-file"):
        load_users(DataSpec(dataset="pubmed"), seed=0)
    with pytest.raises(DatasetError, match="no such file"):
        load_users(DataSpec(dataset="congress", data_file=str(tmp_path / "missing.json")), seed=0)
    with pytest.raises(DatasetError, match="unknown data set"):
        load_users(DataSpec(dataset="wikipedia"), seed=0)


def test_write_user_jsonl_round_trips(tmp_path: Path) -> None:
    data = from_records(_users(5))
    back = read_user_file(write_user_jsonl(data, tmp_path / "train.jsonl"))
    assert back.users == data.users and back.texts == data.texts
    assert np.array_equal(back.owner, data.owner)


def test_shakespeare_splits_are_disjoint() -> None:
    spec = DataSpec(max_users=120, token_budget=64)
    splits = load_splits(spec, byte_tokenizer(), seed=0)
    assert not set(splits.train.users) & set(splits.test.users)
    assert not {_norm(t) for t in splits.train.texts} & {_norm(t) for t in splits.test.texts}


def test_tuning_splits_halve_the_validation_users_and_set_test_aside() -> None:
    # Prepare: 40 users with 3 texts each, split by users.
    from benchmark.datasets import split_users, tuning_splits

    users = [f"u{i}" for i in range(40)]
    texts = [f"text {u} {k}" for u in range(40) for k in range(3)]
    data = UserData(users=users, texts=texts, owner=np.repeat(np.arange(40), 3))
    splits = split_users(data, validation_fraction=0.2, test_fraction=0.2, seed=0)

    # Execute
    tuned = tuning_splits(splits, seed=0)

    # Assert: selection and scoring halves are disjoint validation users; no test user appears; train is unchanged.
    select, score = set(tuned.validation.users), set(tuned.test.users)
    assert select and score and not select & score
    assert select | score == set(splits.validation.users)
    assert not (select | score) & set(splits.test.users)
    assert tuned.train is splits.train and tuning_splits(splits, seed=0).test.users == tuned.test.users
