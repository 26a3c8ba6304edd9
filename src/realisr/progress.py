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
    """A callback that shows progress on the terminal (used by the CLI).

    On a terminal: one tqdm bar per stage; a stage's bar is (re)created when an event with ``current == 0``
    arrives, updated on later events and closed when ``current == total``. Elsewhere (a log file, CI, a pipe),
    where redrawn and nested bars turn into noise: plain lines for the outermost stage only, one when a step
    ends after at least ``interval`` seconds since the last line, and one when the stage is complete.
    """

    def __init__(self, disable: bool = False, leave_stages: tuple[str, ...] = ("files",),
                 interactive: Optional[bool] = None, interval: float = 10.0, stream=None):
        import sys

        self.disable = disable
        self.leave_stages = leave_stages
        self.stream = stream if stream is not None else sys.stderr
        if interactive is None:
            isatty = getattr(self.stream, "isatty", None)
            interactive = bool(isatty and isatty()) or "ipykernel" in sys.modules  # notebooks: widget bars
        self.interactive = interactive
        self.interval = float(interval)
        self._bars: dict = {}
        self._top: Optional[str] = None
        self._start = self._last = 0.0

    def __call__(self, event: ProgressEvent) -> None:
        if self.disable:
            return
        if not self.interactive:
            self._line(event)
            return
        from tqdm.auto import tqdm

        bar = self._bars.get(event.stage)
        if bar is None or event.current == 0:
            if bar is not None:
                bar.close()
            position = len([b for b in self._bars.values() if b is not None and not b.disable])
            bar = tqdm(total=event.total, desc=event.stage, unit="", leave=event.stage in self.leave_stages,
                       position=position, dynamic_ncols=True, file=self.stream)
            self._bars[event.stage] = bar
        bar.n = event.current
        if event.message:
            bar.set_postfix_str(event.message, refresh=False)
        bar.refresh()
        if event.total is not None and event.current >= event.total and event.stage not in self.leave_stages:
            bar.close()
            self._bars.pop(event.stage, None)

    def _line(self, event: ProgressEvent) -> None:
        import time

        if self._top is None:
            self._top = event.stage
            self._start = self._last = time.monotonic()
        if event.stage != self._top:
            return  # nested stages (tiles, UNet, ...) only on a terminal
        now = time.monotonic()
        done = event.total is not None and event.current >= event.total
        if event.current == 0 and not done:
            self._start = self._last = now
            return
        if done or now - self._last >= self.interval:
            self._last = now
            total = f"/{event.total}" if event.total is not None else ""
            msg = f" {event.message}" if event.message else ""
            self.stream.write(f"{event.stage} {event.current}{total}{msg} ({now - self._start:.1f} s)\n")
            self.stream.flush()
        if done:
            self._top = None  # the next stage to start is the outermost one now

    def close(self) -> None:
        for bar in self._bars.values():
            if bar is not None:
                bar.close()
        self._bars.clear()
