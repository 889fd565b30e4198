"""The privacy card and DIR/synthetic, read back with the libraries users would use (datasets, yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from popri.card import CardError, PrivacyCard, card_markdown, write_card, write_synthetic_dataset
from tests.run_artifacts import finished_run

REQUIRED = {
    "epsilon",
    "delta",
    "accountant",
    "unit_of_privacy",
    "mechanism",
    "noise_multiplier",
    "rounds",
    "sample_rate",
    "privacy_mode",
    "generator",
    "date",
    "popri_version",
    "noise_seeded",
}


def _card(**overrides: object) -> PrivacyCard:
    fields = {
        "epsilon": 1.0,
        "delta": 3e-6,
        "accountant": "rdp",
        "noise_multiplier": 19.3,
        "rounds": 20,
        "rounds_planned": 20,
        "sample_rate": 1.0,
        "privacy_mode": "central",
        "generator": "smollm2",
        "noise_seeded": False,
        "target_epsilon": 1.0,
    }
    fields.update(overrides)
    return PrivacyCard(**fields)  # type: ignore[arg-type]


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return finished_run(tmp_path_factory.mktemp("card"), tiny_model_dir, diagnostics=True)


def test_the_runs_synthetic_folder_loads_with_datasets_and_matches_the_jsonl(run_dir, tmp_path):
    # Prepare
    import datasets

    jsonl = [json.loads(line)["text"] for line in (run_dir / "synthetic.jsonl").read_text().splitlines()]

    # Execute
    by_files = datasets.load_dataset(
        "parquet", data_dir=str(run_dir / "synthetic" / "data"), split="train", cache_dir=str(tmp_path / "hf")
    )
    by_folder = datasets.load_dataset(str(run_dir / "synthetic"), split="train", cache_dir=str(tmp_path / "hf"))

    # Assert
    assert by_files["text"] == jsonl
    assert by_folder["text"] == jsonl
    assert len(jsonl) == 4


def test_the_runs_dataset_card_states_the_guarantee_and_every_parameter(run_dir):
    # Prepare
    privacy = json.loads((run_dir / "privacy.json").read_text())

    # Execute
    header = _front_matter((run_dir / "synthetic" / "README.md").read_text())

    # Assert
    card = header["privacy"]
    assert REQUIRED <= set(card)
    assert card["epsilon"] == pytest.approx(privacy["epsilon"])
    assert card["noise_multiplier"] == pytest.approx(privacy["noise_multiplier"])
    assert card["rounds"] == privacy["rounds_completed"] == 2
    assert card["noise_seeded"] is True  # the tiny run seeds its noise
    assert "add or remove one user" in card["unit_of_privacy"] and "(device, user id)" in card["unit_of_privacy"]
    assert "sensitivity 1" in card["mechanism"]


def test_no_card_publishes_a_count_of_users(run_dir):
    # Prepare: at q = 1 every round samples all 9 training users of the tiny run; that count stays out of every card
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    cards = [run_dir / "synthetic" / "README.md", run_dir / "generator" / "privacy-card.md"]

    # Execute
    headers = [_front_matter(p.read_text())["privacy"] for p in cards]

    # Assert
    assert records and not any("users_sampled" in r for r in records)
    for header, path in zip(headers, cards, strict=True):
        assert not any("user" in key for key in header if key != "unit_of_privacy")
        assert "users_sampled" not in path.read_text()
        assert "9 users" not in path.read_text()


def test_non_private_diagnostics_are_labelled_and_outside_the_guarantee(run_dir):
    # Prepare
    text = (run_dir / "synthetic" / "README.md").read_text()

    # Execute
    header = _front_matter(text)

    # Assert
    assert "NON-PRIVATE" in header["privacy"]["non_private"]["note"]
    assert "## NON-PRIVATE diagnostics" in text
    assert text.index("## Privacy guarantee") < text.index("## NON-PRIVATE diagnostics")


def test_a_card_without_diagnostics_has_no_non_private_section():
    # Prepare
    card = _card()

    # Execute
    text = card_markdown(card, title="corpus")

    # Assert
    assert "NON-PRIVATE" not in text
    assert "non_private" not in _front_matter(text)["privacy"]


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        ({"noise_seeded": True}, "NOT private against them"),
        ({"privacy_mode": "secagg"}, "secure sum"),
        ({"control": True, "epsilon": None}, "CONTROL run"),
        ({"sample_rate": 0.1}, "Poisson"),
    ],
)
def test_the_guarantee_in_words_follows_the_settings(overrides, phrase):
    # Prepare
    card = _card(**overrides)

    # Execute
    text = card.guarantee()

    # Assert
    assert phrase in text
    assert phrase not in _card().guarantee()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epsilon", float("nan")),
        ("delta", 0.0),
        ("noise_multiplier", -1.0),
        ("sample_rate", 1.5),
        ("privacy_mode", "x"),
    ],
)
def test_an_invalid_card_is_refused_naming_the_field(field, value):
    # Execute / Assert
    with pytest.raises(CardError, match=f"'{field}'"):
        _card(**{field: value})


def test_a_run_folder_without_privacy_summary_is_refused_naming_the_file(tmp_path):
    # Prepare
    (tmp_path / "config.json").write_text("{}")

    # Execute / Assert
    with pytest.raises(CardError, match=r"privacy\.json does not exist"):
        PrivacyCard.from_run_dir(tmp_path)


def test_a_benchmark_corpus_gets_the_same_card_next_to_it(tmp_path):
    # Prepare
    card = _card(epsilon=7.0, noise_multiplier=3.35)

    # Execute
    path = write_card(tmp_path / "corpus.card.md", card, title="LargeFedBench corpus")

    # Assert
    header = _front_matter(path.read_text())
    assert header["privacy"]["epsilon"] == 7.0
    assert header["privacy"]["noise_multiplier"] == 3.35


def test_two_datasets_in_folders_of_the_same_name_load_their_own_texts(tmp_path):
    # Prepare: two runs' synthetic folders (datasets caches by folder name; the card must not make them collide)
    import datasets

    first, second = tmp_path / "a" / "synthetic", tmp_path / "b" / "synthetic"
    write_synthetic_dataset(["from run a"], first, card=_card())
    write_synthetic_dataset(["from run b"], second, card=_card())

    # Execute
    cache = str(tmp_path / "hf")
    texts = [datasets.load_dataset(str(p), split="train", cache_dir=cache)["text"] for p in (first, second)]

    # Assert
    assert texts == [["from run a"], ["from run b"]]


def test_rewriting_the_dataset_replaces_it_whole(tmp_path):
    # Prepare
    import datasets

    out = tmp_path / "synthetic"
    write_synthetic_dataset(["old one", "old two", "old three"], out, card=_card())

    # Execute
    write_synthetic_dataset(["new"], out, card=_card())

    # Assert
    assert datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))["text"] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "synthetic"]  # no temporary folder left behind
