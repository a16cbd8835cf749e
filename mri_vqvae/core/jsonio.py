"""The one way values become JSON: numbers from tensors and numpy, no NaN or Infinity literals."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def json_ready(obj: Any) -> Any:
    """A JSON-ready copy of `obj`: NaN and ±Inf become None (JSON has neither).

    Mappings (keys as str), lists and tuples are copied recursively; a tensor or numpy array
    becomes a number (one element) or nested lists, a numpy scalar a Python number. Other values
    are returned as they are, so ``json.dumps(..., allow_nan=False)`` still refuses what JSON
    cannot hold.
    """
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        return json_ready(obj.item() if obj.numel() == 1 else obj.tolist())
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
