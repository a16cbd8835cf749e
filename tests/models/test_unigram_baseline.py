"""The floors beside every prior result (models/priors/unigram/baseline.py), by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mri_vqvae.models.priors.unigram.baseline import fitted_unigram, uniform_bits, unigram_bits

# counts of codes 0, 1, 2: 3, 1, 0 -> add-one: 4, 2, 1 of 7
TRAIN = torch.tensor([0, 0, 1, 0]).view(2, 1, 1, 2)
GRIDS = torch.tensor([0, 2, 2, 1]).view(1, 1, 2, 2)


def test_fitted_unigram_is_the_add_one_frequency_table() -> None:
    table = torch.softmax(fitted_unigram(TRAIN, 3).logits.double(), dim=1)[0]
    torch.testing.assert_close(table, torch.tensor([4 / 7, 2 / 7, 1 / 7], dtype=torch.float64))


def test_unigram_bits_matches_a_hand_computation() -> None:
    by_hand = -(math.log2(4 / 7) + 2 * math.log2(1 / 7) + math.log2(2 / 7)) / 4
    assert unigram_bits(TRAIN, GRIDS, 3) == pytest.approx(by_hand, rel=1e-6)


def test_uniform_bits_is_log2_of_the_codebook() -> None:
    assert uniform_bits(32) == 5.0 and uniform_bits(3) == math.log2(3)


def test_unigram_bits_needs_a_grid() -> None:
    with pytest.raises(ValueError, match="at least one grid"):
        unigram_bits(TRAIN, torch.zeros((0, 1, 1, 2), dtype=torch.long), 3)
