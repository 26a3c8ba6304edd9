"""One progress protocol for the library, the CLI (progress bars), a web UI and servers.

Library code never prints. Long work reports :class:`ProgressEvent` objects to a callback; the CLI turns
them into tqdm bars, a UI into its own progress widget. A callback may raise to cancel work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

__all__ = ["ProgressEvent", "ProgressCallback", "report", "TqdmProgress"]


@dataclass(frozen=True)
class ProgressEvent:
    """A step of work.

    Attributes:
        stage: what is progressing, e.g. ``"files"``, ``"tiles"``, ``"unet"``, ``"vae_decode"``, ``"train"``.
        current: steps done so far (0 when a stage starts).
        total: number of steps in the stage, or ``None`` when unknown.
        message: optional short text (a file name, a loss value).
    """

    stage: str
    current: int
    total: Optional[int] = None
    message: str = ""


class ProgressCallback(Protocol):
    def __call__(self, event: ProgressEvent) -> None: ...


def report(callback: Optional[Callable[[ProgressEvent], None]], stage: str, current: int,
           total: Optional[int] = None, message: str = "") -> None:
    """Send an event to ``callback`` if there is one."""
    if callback is not None:
        callback(ProgressEvent(stage, current, total, message))


class TqdmProgress:
    """A callback that shows one tqdm bar per stage (used by the CLI).

    The bar for a stage is (re)created when an event with ``current == 0`` arrives, updated on later events
    and closed when ``current == total``.
    """

    def __init__(self, disable: bool = False, leave_stages: tuple[str, ...] = ("files",)):
        self.disable = disable
        self.leave_stages = leave_stages
        self._bars: dict = {}

    def __call__(self, event: ProgressEvent) -> None:
        if self.disable:
            return
        from tqdm.auto import tqdm

        bar = self._bars.get(event.stage)
        if bar is None or event.current == 0:
            if bar is not None:
                bar.close()
            position = len([b for b in self._bars.values() if b is not None and not b.disable])
            bar = tqdm(total=event.total, desc=event.stage, unit="", leave=event.stage in self.leave_stages,
                       position=position, dynamic_ncols=True)
            self._bars[event.stage] = bar
        bar.n = event.current
        if event.message:
            bar.set_postfix_str(event.message, refresh=False)
        bar.refresh()
        if event.total is not None and event.current >= event.total and event.stage not in self.leave_stages:
            bar.close()
            self._bars.pop(event.stage, None)

    def close(self) -> None:
        for bar in self._bars.values():
            if bar is not None:
                bar.close()
        self._bars.clear()
