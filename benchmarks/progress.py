"""A dependency-free text progress bar: redrawn in place on a terminal, a line per quarter otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 30


class ProgressBar:
    """Counts finished items out of `total`. Invariant: 0 <= done <= total."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.done = 0
        self._started = time.monotonic()
        self._is_tty = self.stream.isatty()
        self._last_quarter = 0

    def update(self, count: int = 1) -> None:
        self.done = min(self.total, self.done + count)
        if not self.enabled:
            return
        if self._is_tty:
            self.stream.write("\r" + self.render())
            self.stream.flush()
            return
        quarter = 4 * self.done // max(self.total, 1)
        if quarter > self._last_quarter:
            self._last_quarter = quarter
            self.stream.write(self.render() + "\n")
            self.stream.flush()

    def render(self) -> str:
        filled = BAR_WIDTH * self.done // max(self.total, 1)
        elapsed = time.monotonic() - self._started
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        return f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:.1f}s"

    def close(self) -> None:
        if self.enabled and self._is_tty:
            self.stream.write("\n")
            self.stream.flush()
