"""Progress and cancel, inside ComfyUI or not.

Inside ComfyUI the sampler drives ``comfy.utils.ProgressBar`` (the bar in the UI) and asks
``comfy.model_management`` whether the user pressed cancel. Outside ComfyUI (CLI, tests)
a plain callback gets ``(step, total)`` and may raise ``Interrupted`` to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

StepCallback = Callable[[int, int], None]


class Interrupted(RuntimeError):
    """Raised when the user cancels sampling (outside ComfyUI; inside, ComfyUI's own)."""


def _comfy_progress(total: int) -> StepCallback | None:
    try:
        import comfy.utils  # type: ignore[import-not-found]
    except ImportError:
        return None
    bar = comfy.utils.ProgressBar(total)
    return lambda step, total_steps: bar.update_absolute(step, total_steps)


def _comfy_interrupt_check() -> Callable[[], None] | None:
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]
    except ImportError:
        return None
    return mm.throw_exception_if_processing_interrupted


@dataclass
class Progress:
    """Reports progress and checks for cancel once per sampling step."""

    total: int
    callback: StepCallback | None = None

    def __post_init__(self) -> None:
        self._bar = _comfy_progress(self.total)
        self._interrupt = _comfy_interrupt_check()

    def check_interrupt(self) -> None:
        """Raise if the user asked to stop (ComfyUI's exception inside ComfyUI)."""
        if self._interrupt is not None:
            self._interrupt()

    def update(self, done: int) -> None:
        """``done`` steps of ``total`` are finished."""
        if self._bar is not None:
            self._bar(done, self.total)
        if self.callback is not None:
            self.callback(done, self.total)
