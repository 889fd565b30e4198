"""Shared fixtures: tiny models saved as local HF folders and tiny private data (helpers live in tests.helpers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import ROLES
from tests.tiny_models import byte_tokenizer, tiny_causal_lm


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama and a byte tokenizer, saved like any local HF model folder."""
    path = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = byte_tokenizer()
    tiny_causal_lm(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    """12 users (3 per role) in popri's JSONL format."""
    path = tmp_path / "users.jsonl"
    with path.open("w") as fh:
        for role, texts in ROLES.items():
            for k in range(3):
                for text in texts:
                    fh.write(json.dumps({"user": f"{role}-{k}", "text": f"{text} ({k})"}) + "\n")
    return path
