"""The base of every configuration model: unknown keys are refused, values are frozen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that forbids unknown keys and cannot be changed after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)
