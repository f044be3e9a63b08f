"""What a person sees while a command runs: our own lines on the console, everything else in a
log file.

Commands that start Ray run inside :func:`command_output`. It points the process's standard
output and error *file descriptors* at a log file and keeps copies of the original ones as the
console. Whatever the libraries print then lands in the log: Ray's driver prints its workers'
forwarded output through ``sys.stdout``/``sys.stderr``, Ray's core writes C++ log lines straight
to descriptor 2, DeepSpeed's op builds and compilers write from child processes; redirecting the
descriptors is the one way to catch them all. Our own lines reach the console through
:func:`console`: results with :meth:`Console.say`, progress with :meth:`Console.progress`, and
log records of the ``qformer`` and ``pipeline`` loggers through :class:`ConsoleHandler`.

Outside a command (tests, notebooks, ``-v``) the console is the ordinary ``sys.stdout`` and
``sys.stderr`` and nothing is redirected.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

from pipeline.io.storage import Location, write_bytes_atomic

LOG_FOLDER = "logs"
"""The folder of a run or output folder that holds the commands' log files."""
PLAIN_EVERY_S = 15.0
"""Seconds between progress lines when the console is not a terminal (CI, Ray Jobs logs)."""
OUR_LOGGERS = ("qformer", "pipeline")
"""Loggers whose records are our own lines, shown on the console."""


def log_file(folder: Location, command: str) -> Location:
    """Where ``command`` run now logs inside ``folder``: ``FOLDER/logs/COMMAND-YYYYmmdd-HHMMSS.log``."""
    return folder.child(LOG_FOLDER, f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log")


class Console:
    """Where our own lines go: ``out`` for results, ``err`` for progress and messages.

    Args:
        out: Results stream (None: the current ``sys.stdout``).
        err: Messages stream (None: the current ``sys.stderr``).
        log: The log file that holds everything else, if any.
    """

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, log: str | None = None):
        self._out, self._err, self.log = out, err, log
        self.active: Progress | None = None

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    @property
    def err(self) -> TextIO:
        return self._err or sys.stderr

    @property
    def interactive(self) -> bool:
        """Whether messages go to a terminal (progress then updates in place)."""
        try:
            return self.err.isatty()
        except (AttributeError, ValueError):
            return False

    def say(self, line: str) -> None:
        """A result line (standard output)."""
        self._write(self.out, line)

    def info(self, line: str) -> None:
        """A message line (standard error), printed above a live progress display."""
        if self.active is not None:
            self.active.write(line)
        else:
            self._write(self.err, line)

    def progress(self, label: str, total: int) -> "Progress":
        """A progress display for ``total`` units of work (one at a time per console)."""
        if self.active is not None:
            self.active.close()
        self.active = Progress(self, label, total)
        return self.active

    @staticmethod
    def _write(stream: TextIO, line: str) -> None:
        stream.write(line + "\n")
        stream.flush()


_current = Console()


def console() -> Console:
    """The console of the command running in this process (or the plain standard streams)."""
    return _current


class Progress:
    """A live display of ``done``/``total`` with a detail text and an ETA.

    On a terminal it is a bar that updates in place (tqdm); otherwise a plain line at the first
    unit done, then at most every :data:`PLAIN_EVERY_S` seconds, and always at the last one. The ETA counts from the first update,
    so work done before it (a resumed run) does not make it optimistic.
    """

    def __init__(self, owner: Console, label: str, total: int):
        self.owner, self.label, self.total = owner, label, total
        self._bar = None
        self._first: tuple[int, float] | None = None
        self._printed_at = float("-inf")
        self.done = 0

    def update(self, done: int, detail: str = "") -> None:
        """``done`` units are done; ``detail`` says how it goes (losses, rates)."""
        now = time.monotonic()
        if self._first is None:
            self._first = (done, now)
        self.done = done
        if self.owner.interactive:
            self._draw(done, detail)
        elif done > 0 and (done >= self.total or now - self._printed_at >= PLAIN_EVERY_S):
            self._printed_at = now
            eta = self.eta()
            parts = [f"{self.label} {done}/{self.total}", detail, f"ETA {eta}" if eta else ""]
            Console._write(self.owner.err, " | ".join(part for part in parts if part))

    def eta(self) -> str:
        """The time left at the rate since the first update, as ``1h02m``, ``3m05s`` or ``12s``
        ("" until there is a rate)."""
        if self._first is None or self.done <= self._first[0]:
            return ""
        first, started = self._first
        left = (time.monotonic() - started) / (self.done - first) * (self.total - self.done)
        return duration(left)

    def write(self, line: str) -> None:
        """A line above the display."""
        if self._bar is not None:
            self._bar.write(line, file=self.owner.err)
        else:
            Console._write(self.owner.err, line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.owner.active is self:
            self.owner.active = None

    def _draw(self, done: int, detail: str) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(
                total=self.total, initial=done, desc=self.label, file=self.owner.err,
                dynamic_ncols=True, leave=True, mininterval=0.2,
                bar_format="{desc} {bar:20} {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}",
            )
        self._bar.set_postfix_str(detail, refresh=False)
        self._bar.update(done - self._bar.n)


def duration(seconds: float) -> str:
    """``seconds`` as ``1h02m``, ``3m05s`` or ``12s``."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class ConsoleHandler(logging.Handler):
    """Shows log records on the current console (above a live progress display)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            console().info(self.format(record))
        except Exception:
            self.handleError(record)


def setup_logging(*, verbose: bool) -> None:
    """Our loggers at INFO on the console; other libraries' warnings (everything with
    ``verbose``) on standard error, which :func:`command_output` points at the log file."""
    ours = ConsoleHandler()
    ours.setFormatter(logging.Formatter("%(message)s"))
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.handlers[:] = [ours]
    root = logging.getLogger()
    others = _OthersHandler()
    others.addFilter(lambda record: not record.name.startswith(OUR_LOGGERS))
    # Handlers someone else installed (pytest's capture) stay.
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _OthersHandler)] + [others]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.captureWarnings(True)


class _OthersHandler(logging.StreamHandler):
    """Other libraries' records on whatever ``sys.stderr`` is when they come."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass  # StreamHandler.__init__ sets it; the current sys.stderr is used instead


@contextmanager
def command_output(log: Location) -> Iterator[Console]:
    """Run the block with everything but our own lines going to the log file ``log``.

    A log on object storage is written locally and uploaded when the block ends. An error
    leaving the block is written to the log with its traceback, and carries the log's path as
    ``err.log`` for the one-line message.
    """
    global _current
    local = _local_path(log)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    keep = [_keep(sys.stdout, 1), _keep(sys.stderr, 2)]
    saved = [os.dup(1), os.dup(2)]
    target = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 1)
    os.dup2(target, 2)
    handler = logging.FileHandler(local)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous = (root.handlers[:], root.level)
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    shown = local if log.is_local else log.url
    _current = Console(keep[0][0], keep[1][0], shown)
    try:
        yield _current
    except BaseException as err:
        handler.handle(logging.makeLogRecord({
            "name": "qformer", "levelno": logging.ERROR, "levelname": "ERROR",
            "msg": "the command failed", "exc_info": (type(err), err, err.__traceback__)}))
        err.log = shown
        raise
    finally:
        if _current.active is not None:
            _current.active.close()
        _current = Console()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        root.handlers[:], root.level = previous
        handler.close()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(target)
        for stream, opened in keep:
            if opened:
                stream.close()
        if not log.is_local:
            with open(local, "rb") as handle:
                write_bytes_atomic(log, handle.read())


def _local_path(log: Location) -> str:
    if log.is_local:
        return log.filesystem()[1]
    return os.path.join(tempfile.gettempdir(), "qformer-logs", log.url.replace("://", "/").lstrip("/"))


def _keep(stream: TextIO, fd: int) -> tuple[TextIO, bool]:
    """A console stream for ``stream``: a copy of its descriptor when it writes to ``fd`` (which
    is about to be redirected), else the stream itself (pytest's capture, say)."""
    try:
        if stream.fileno() != fd:
            return stream, False
    except (AttributeError, OSError, ValueError):
        return stream, False
    copy = os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                     errors="replace")
    return copy, True
