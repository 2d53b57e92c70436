"""No eviction: every token stays. The reference every other policy is measured against."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Policy


@dataclass
class Full(Policy):
    name: ClassVar[str] = "full"
    evicts_on_decode: ClassVar[bool] = False

    def __post_init__(self) -> None:
        """The budget is the model context, which the store sets: only the parameters' types can be wrong."""
        self.check_types()

    def resolve_budget(self, prompt_len: int) -> int:
        return self.budget if isinstance(self.budget, int) else prompt_len
