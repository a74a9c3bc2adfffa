"""The callback interface: hooks the loop calls, an explicit order, and state kept in checkpoints."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slimpajama_train.trainer import Trainer


class Callback:
    """Observes the run. Callbacks run in descending ``priority`` (metric producers such as the speed
    monitor before the loggers that print them). A callback with state returns it from
    :meth:`state_dict`; it is stored in every checkpoint under ``callbacks.<name>`` and handed back
    to :meth:`load_state_dict` on resume, before ``on_train_start``."""

    name: str = "callback"
    priority: int = 0

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def close(self) -> None:
        """Release what the callback holds (a progress bar) when the run ends, also on an error."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def ordered(callbacks: list[Callback]) -> list[Callback]:
    """Highest priority first; equal priorities keep their given order."""
    return sorted(callbacks, key=lambda cb: -cb.priority)
