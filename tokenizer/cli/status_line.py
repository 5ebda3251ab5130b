"""One status line on a stream: redrawn in place on a terminal, a plain line every
`interval` seconds otherwise (a log file gets a readable history, not carriage returns).
Messages printed through `note` go above it without garbling it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class StatusLine:
    def __init__(
        self,
        stream: TextIO | None = None,
        enabled: bool = True,
        interval: float | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # A terminal can take ten redraws a second; a log wants one line every few seconds.
        self.interval = interval if interval is not None else (0.1 if self.tty else 10.0)
        self._last = float("-inf")
        self._shown = 0  # width of the line now on the terminal

    def _clear(self) -> None:
        if self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self._shown = 0

    def update(self, text: str, force: bool = False) -> None:
        """Show `text`, unless the last update was under `interval` ago (and not `force`)."""
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.interval):
            return
        self._last = now
        if self.tty:
            self._clear()
            self.stream.write(text)
            self._shown = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """Print `message` on its own line (always, progress on or off)."""
        if self.tty:
            self._clear()
            self._last = float("-inf")  # redraw the status at the next update
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self, text: str | None = None) -> None:
        """End with `text` as the final status (if progress is on)."""
        if text is not None:
            self.update(text, force=True)
        if self.enabled and self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = 0
