"""Settings every prior shares (section ``prior:``); each kind subclasses `PriorSettings`.

``codebook_size`` and ``num_classes`` describe the data a prior models, not a choice: the
experiment config fills ``codebook_size`` in from the autoencoder, and ``train-prior`` sets
``num_classes`` from the values of ``label_field`` in the train split. Both are stored in the
checkpoint so a prior can be rebuilt on its own.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from mri_vqvae.core.strict import StrictModel

LABEL_FIELDS = ("modality", "source_id")
"""Manifest case fields a prior can be conditioned on (recorded per grid by `encode`)."""


class PriorSettings(StrictModel):
    """Fields of every prior kind: what it models, its conditioning and sampling defaults."""

    kind: str
    codebook_size: int = Field(
        512, ge=2, description="number of codes K; filled in from autoencoder.codebook_size"
    )
    num_classes: int = Field(
        0, ge=0, description="label classes; set by train-prior from label_field (0 = none)"
    )
    label_field: str | None = Field(
        None,
        description="manifest case field the prior is conditioned on: modality | source_id; "
        "null = unconditional. `sample --label` then draws one class",
    )
    temperature: float = Field(1.0, ge=0, description="default sampling temperature (0 = argmax)")
    top_k: int | None = Field(None, ge=1, description="default top-k cut for sampling; null = none")

    @field_validator("label_field")
    @classmethod
    def _known_label_field(cls, v: str | None) -> str | None:
        if v is not None and v not in LABEL_FIELDS:
            raise ValueError(f"label_field must be one of {LABEL_FIELDS} or null, got {v!r}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k_in_codebook(cls, v: int | None, info: Any) -> int | None:
        size = info.data.get("codebook_size")
        if v is not None and size is not None and v > size:
            raise ValueError(f"top_k={v} exceeds codebook_size={size}; use at most {size}")
        return v
