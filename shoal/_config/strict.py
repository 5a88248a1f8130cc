"""The base of every options model: strict, frozen, no unknown keys."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    # strict: "2" is not silently turned into 2, nor 2.5 into a truncated 2
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)
