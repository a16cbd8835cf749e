"""Configuration of the independent-codes prior (section ``prior:`` with ``kind: unigram``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mri_vqvae.models.priors.settings import PriorSettings


class UnigramConfig(PriorSettings):
    """Codes drawn independently from smoothed frequencies (`...priors.unigram.model`).

    The honest lower bound of every prior result: a model that knows how often each code occurs
    (per class when labelled) and nothing about where.
    """

    kind: Literal["unigram"] = "unigram"
    smoothing: float = Field(
        1.0, gt=0, description="add-alpha smoothing of the code counts (1 = add-one / Laplace)"
    )
