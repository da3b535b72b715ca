"""A progress bar for long work, written for the person at the terminal: one line of at
most 100 columns (fewer on a narrower terminal), redrawn with a carriage return, no colour
or other ANSI codes. Pure Python: the commands draw it before and without TensorFlow.

    bar = ProgressBar(total=5000, unit="request")
    for done in range(1, 5001):
        bar.update(done)
    bar.close()
"""

import shutil
import sys
import time

MAX_COLUMNS = 100
_REDRAW_SECONDS = 0.1


def terminal_columns(stream=None):
    """The columns a line may take on `stream`: the terminal's width, at most 100."""
    del stream
    return min(MAX_COLUMNS, shutil.get_terminal_size((MAX_COLUMNS, 24)).columns)


def fit_line(text, columns=MAX_COLUMNS):
    """`text` cut to `columns - 1` characters (the last column stays free, so that no
    terminal wraps the line), with `…` where it was cut."""
    limit = max(1, columns - 1)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def format_duration(seconds):
    seconds = int(round(seconds))
    if seconds < 3600:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """A redrawn one-line bar on `stream` (default stdout), for a terminal.

    Args:
        total: the amount of work, or None when unknown (then a count, no bar).
        unit: what is counted (`request`, `batch`), shown after the count.
        prefix: text before the bar (e.g. `epoch 1/3`).
        stream: where to draw; its `isatty()` should be true (callers fall back to lines).
    """

    def __init__(self, total, unit, prefix="", stream=None):
        self.total = total
        self.unit = unit
        self.prefix = prefix
        self.stream = stream or sys.stdout
        self.started = time.monotonic()
        self._drawn = 0.0
        self._width = 0

    def update(self, done, suffix="", force=False):
        """Redraws for `done` units (at most ten times a second unless `force`)."""
        now = time.monotonic()
        finished = self.total is not None and done >= self.total
        if not (force or finished) and now - self._drawn < _REDRAW_SECONDS:
            return
        self._drawn = now
        self._draw(self.line(done, suffix, now - self.started))

    def line(self, done, suffix="", elapsed=0.0, columns=None):
        """The text of the bar for `done` units after `elapsed` seconds."""
        columns = columns or terminal_columns(self.stream)
        head = f"{self.prefix} " if self.prefix else ""
        count = (f"{done}/{self.total} {self.unit}s" if self.total else f"{done} {self.unit}s")
        timing = format_duration(elapsed)
        if self.total and 0 < done < self.total:
            timing += f" (eta {format_duration(elapsed / done * (self.total - done))})"
        tail = f" {count} {timing}" + (f" {suffix}" if suffix else "")
        if self.total:  # the bar's room comes before the suffix's, which is cut first
            room = columns - 1 - len(head) - len(f" {count} {timing}") - 2
            width = max(0, min(30, room))
            if width >= 5:
                filled = int(width * min(done, self.total) / self.total)
                bar = "=" * filled + (">" if filled < width else "") + "." * (
                    width - filled - (1 if filled < width else 0))
                return fit_line(f"{head}[{bar}]{tail}", columns)
        return fit_line(f"{head.rstrip()}{tail}", columns)

    def _draw(self, text):
        padding = " " * max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + padding)
        self.stream.flush()

    def close(self, done=None, suffix=""):
        """Draws the last state (when `done` is given) and ends the line."""
        if done is not None:
            self.update(done, suffix, force=True)
        self.stream.write("\n")
        self.stream.flush()
