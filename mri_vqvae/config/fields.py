"""Field helpers shared by the config sections: the `ADDED` digest marker, range checks."""

from __future__ import annotations

from pydantic import AfterValidator, ValidationInfo


class AddedSetting:
    """Field marker: a setting added after digests were recorded. Holding its default it is left
    out of `config_digest`, so every config, kit and run made before it keeps its digest."""


ADDED = AddedSetting()


def within(lowest: float, highest: float) -> AfterValidator:
    """Refuses a (low, high) setting unless lowest <= low <= high <= highest."""

    def check(v: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        if not lowest <= v[0] <= v[1] <= highest:
            raise ValueError(f"{info.field_name} must be a range [low, high] with {lowest:g} <= "
                             f"low <= high <= {highest:g}")
        return v

    return AfterValidator(check)
