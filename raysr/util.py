"""Small helpers shared across raysr: integer argument checks, console lines and a stderr progress line.

Nothing here imports torch or ray, so every module (models, data, CLIs) can use it.
"""

from __future__ import annotations

import numbers
import sys
import time

__all__ = ["check_int", "say", "Progress"]


def say(line: str) -> None:
    """One line to stdout, flushed. Ray Train patches ``print`` on workers into its logger
    (which would print it twice); writing to stdout goes straight to the driver's console."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as a plain ``int`` if it is an integer >= ``minimum``; else ValueError naming ``name``.

    Python and numpy integers pass (``np.int64(4)`` -> ``4``); ``bool`` does not
    (``True`` must not pass as scale 1), nor does a float, even a whole one.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = ""
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
            hint = f" (a {type(value).__name__}; pass {int(value)})"
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}{hint}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class Progress:
    """One progress line on a stream (stderr by default).

    On a terminal the line is rewritten in place (at most every ``redraw`` s);
    on anything else (a log file, a pipe) a new line is written at most every
    ``interval`` s -- ``interval=0`` writes one line per update, e.g. one per
    file. The line reads::

        LABEL [########................] DONE/TOTAL UNIT (PCT%) | INFO | RATE UNIT/s | Es elapsed, ~Ls left | NAME

    where ``INFO`` is the free-form :attr:`info` text (empty parts are left out).

    Use: ``step(name)`` after each item, or ``update(done=n)`` to set the count;
    ``finish()`` (or leaving a ``with Progress(...)`` block) writes the final
    line and ends it. ``enabled=False`` writes nothing.
    """

    BAR_WIDTH = 24

    def __init__(self, total: int, label: str, *, unit: str = "items", enabled: bool = True, stream=None,
                 interval: float = 0.0, redraw: float = 0.1):
        self.total = check_int("Progress total", total, minimum=0)
        self.label, self.unit, self.enabled = label, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", None) and self.stream.isatty())
        self.wait = redraw if self.tty else interval
        self.done, self.info, self.name = 0, "", ""
        self.start = time.monotonic()
        self.last: float | None = None  # time of the last line written; None: nothing written yet
        self.finished = False
        self.drawn: tuple | None = None  # (done, info, name) of the last line written

    def step(self, name: str = "", count: int = 1) -> None:
        """``count`` more items are done (the last one called ``name``); draw if due."""
        self.update(done=self.done + count, name=name)

    def update(self, done: int | None = None, *, name: str | None = None, force: bool = False) -> None:
        """Set ``done`` and/or ``name`` if given; draw if due (always with ``force``
        or when the count first reaches the total)."""
        reached = done is not None and done >= self.total > self.done
        if done is not None:
            self.done = done
        if name is not None:
            self.name = name
        now = time.monotonic()
        if self.enabled and (force or reached or self.last is None or now - self.last >= self.wait):
            self._draw(now)

    def finish(self) -> None:
        """Write the final line and end it (idempotent)."""
        if self.finished:
            return
        self.finished = True
        # On a terminal the final line is redrawn and ended; in a log, only if it is not there yet.
        if self.enabled and (self.tty or self.drawn != (self.done, self.info, self.name)):
            self._draw(time.monotonic())
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()

    def line(self, now: float | None = None) -> str:
        """The status text as of ``now`` (``time.monotonic()``; default: now)."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        filled = self.BAR_WIDTH * min(self.done, self.total) // max(self.total, 1)
        pct = 100 * self.done / self.total if self.total else 100.0
        parts = [f"{self.label} [{'#' * filled}{'.' * (self.BAR_WIDTH - filled)}] "
                 f"{self.done}/{self.total} {self.unit} ({pct:.0f}%)"]
        if self.info:
            parts.append(self.info)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts.append(f"{rate:.1f} {self.unit}/s")
        left = f", ~{(self.total - self.done) / rate:.0f}s left" if rate > 0 and self.done < self.total else ""
        parts.append(f"{elapsed:.1f}s elapsed{left}")
        if self.name:
            parts.append(self.name)
        return " | ".join(parts)

    def _draw(self, now: float) -> None:
        self.last = now
        self.drawn = (self.done, self.info, self.name)
        text = self.line(now)
        # \x1b[K clears what a longer previous line left behind
        self.stream.write(f"\r{text}\x1b[K" if self.tty else text + "\n")
        self.stream.flush()
