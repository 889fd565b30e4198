"""Preference pairs: chosen = best noisy score, rejected = the configured rank, ties by position; the random control."""

from __future__ import annotations

import numpy as np
import pytest

from popri.preferences import PreferencePair, build_pairs, random_pairs, rank_within_prompts

PROMPTS = ["p0", "p1"]
SAMPLES = ["a0", "a1", "a2", "b0", "b1", "b2"]  # J = 3 per prompt
SCORES = np.array([0.1, 0.9, 0.5, 2.0, -1.0, 0.3])  # ranks: a1 > a2 > a0 and b0 > b2 > b1


@pytest.mark.parametrize(
    ("rejected_rank", "expected"),
    [
        (1, [PreferencePair("p0", "a1", "a2"), PreferencePair("p1", "b0", "b2")]),
        (2, [PreferencePair("p0", "a1", "a0"), PreferencePair("p1", "b0", "b1")]),
    ],
)
def test_build_pairs_picks_best_as_chosen_and_given_rank_as_rejected(
    rejected_rank: int, expected: list[PreferencePair]
) -> None:
    # execute
    pairs = build_pairs(
        prompts=PROMPTS, samples=SAMPLES, dp_scores=SCORES, samples_per_prompt=3, rejected_rank=rejected_rank
    )

    # assert
    assert pairs == expected


def test_pairs_serialise_to_dpo_records() -> None:
    # execute
    record = PreferencePair("p", "good", "bad").to_dict()

    # assert
    assert record == {"prompt": "p", "chosen": "good", "rejected": "bad"}


def test_ties_are_broken_by_position_not_by_text() -> None:
    # prepare: all tied in block 0; two tied best in block 1. Texts sort opposite to positions.
    samples = ["z", "y", "x", "w", "v", "u"]
    scores = np.array([1.0, 1.0, 1.0, 0.5, 2.0, 2.0])

    # execute
    order = rank_within_prompts(scores, 3)
    pairs = build_pairs(prompts=PROMPTS, samples=samples, dp_scores=scores, samples_per_prompt=3, rejected_rank=1)

    # assert: the earlier position wins a tie
    np.testing.assert_array_equal(order, [[0, 1, 2], [1, 2, 0]])
    assert pairs == [PreferencePair("p0", "z", "y"), PreferencePair("p1", "v", "u")]


@pytest.mark.parametrize("rejected_rank", [0, 3, -1])
def test_build_pairs_rejects_invalid_rejected_rank(rejected_rank: int) -> None:
    # execute / assert
    with pytest.raises(ValueError, match="rejected_rank"):
        build_pairs(
            prompts=PROMPTS, samples=SAMPLES, dp_scores=SCORES, samples_per_prompt=3, rejected_rank=rejected_rank
        )


@pytest.mark.parametrize(
    ("samples", "dp_scores"),
    [
        (SAMPLES[:5], SCORES[:5]),  # samples do not fill K blocks of J
        ([*SAMPLES, "c0", "c1", "c2"], np.concatenate([SCORES, SCORES[:3]])),  # a block without a prompt
        (SAMPLES, SCORES[:3]),  # too few scores
        (SAMPLES, np.concatenate([SCORES, SCORES[:3]])),  # scores of another sample set
        (SAMPLES, SCORES.reshape(2, 3)),  # not a vector
    ],
)
def test_build_pairs_rejects_mismatched_lengths(samples: list[str], dp_scores: np.ndarray) -> None:
    # execute / assert
    with pytest.raises(ValueError):
        build_pairs(prompts=PROMPTS, samples=samples, dp_scores=dp_scores, samples_per_prompt=3, rejected_rank=1)


def test_random_pairs_never_pairs_a_sample_with_itself_and_stays_in_its_prompt() -> None:
    # prepare: 200 prompts; J = 2 forces the two samples of a block, J = 5 leaves a choice
    for samples_per_prompt in (2, 5):
        prompts = [f"p{k}" for k in range(200)]
        samples = [f"s{k}-{j}" for k in range(200) for j in range(samples_per_prompt)]
        rng = np.random.Generator(np.random.PCG64(0))

        # execute
        pairs = random_pairs(prompts=prompts, samples=samples, samples_per_prompt=samples_per_prompt, rng=rng)

        # assert
        assert [p.prompt for p in pairs] == prompts
        for k, pair in enumerate(pairs):
            assert pair.chosen != pair.rejected
            assert pair.chosen.startswith(f"s{k}-") and pair.rejected.startswith(f"s{k}-")


def test_random_pairs_uses_every_position_as_chosen() -> None:
    # prepare
    prompts = [f"p{k}" for k in range(400)]
    samples = [str(j) for _ in prompts for j in range(4)]

    # execute
    pairs = random_pairs(
        prompts=prompts, samples=samples, samples_per_prompt=4, rng=np.random.Generator(np.random.PCG64(1))
    )

    # assert: uniform over 4 positions, each expected 100 times out of 400
    counts = np.bincount([int(p.chosen) for p in pairs], minlength=4)
    assert counts.min() > 50


def test_random_pairs_is_reproducible_with_a_seeded_generator() -> None:
    # prepare
    prompts = [f"p{k}" for k in range(50)]
    samples = [f"s{k}-{j}" for k in range(50) for j in range(6)]

    # execute
    first = random_pairs(
        prompts=prompts, samples=samples, samples_per_prompt=6, rng=np.random.Generator(np.random.PCG64(9))
    )
    again = random_pairs(
        prompts=prompts, samples=samples, samples_per_prompt=6, rng=np.random.Generator(np.random.PCG64(9))
    )
    other_seed = random_pairs(
        prompts=prompts, samples=samples, samples_per_prompt=6, rng=np.random.Generator(np.random.PCG64(10))
    )

    # assert
    assert first == again
    assert first != other_seed


def test_random_pairs_rejects_mismatched_lengths() -> None:
    # execute / assert
    with pytest.raises(ValueError):
        random_pairs(
            prompts=PROMPTS, samples=SAMPLES[:5], samples_per_prompt=3, rng=np.random.Generator(np.random.PCG64(0))
        )
