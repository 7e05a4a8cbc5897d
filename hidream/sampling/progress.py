"""Progress and cancel, inside ComfyUI or not.

Inside ComfyUI the sampler drives ``comfy.utils.ProgressBar`` (the bar in the UI, sent as
websocket ``progress`` events), a console bar like KSampler's (tqdm, unless ComfyUI was
started with ``--disable-progress-bars``...), and asks ``comfy.model_management`` whether the
user pressed cancel. Outside ComfyUI (CLI, tests) a plain callback gets ``(step, total)`` and
may raise ``Interrupted`` to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .. import host

StepCallback = Callable[[int, int], None]


class Interrupted(RuntimeError):
    """Raised when the user cancels sampling (outside ComfyUI; inside, ComfyUI's own)."""


def _comfy_progress(total: int) -> StepCallback | None:
    bar = host.progress_bar(total)
    if bar is None:
        return None
    console = _console_bar(total) if host.console_bars_enabled() else None

    def update(step: int, total_steps: int) -> None:
        bar.update_absolute(step, total_steps)
        if console is not None:
            console.update(step - console.n)
            if step >= total_steps:
                console.close()

    return update


def _console_bar(total: int):
    """The server console's bar (KSampler shows one there too); None where tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="HiDream-I1", unit="step", leave=True)


@dataclass
class Progress:
    """Reports progress and checks for cancel once per sampling step."""

    total: int
    callback: StepCallback | None = None

    def __post_init__(self) -> None:
        self._bar = _comfy_progress(self.total)
        self._interrupt = host.interrupt_check()

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
