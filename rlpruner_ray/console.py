"""What a person sees on the terminal: the project's own ``[rlpruner]`` lines and
progress within a step. Everything else a run prints — Ray's and RLlib's start-up
notices, the C++ core's log lines, library warnings — goes to ``log.txt`` in the
run's folder (``-v`` shows it on the terminal instead).

Ray's core and worker processes write straight to file descriptors 1 and 2, so
hiding them takes redirecting those descriptors, not just Python's streams: while
:func:`foreign_output_to_log` is active, fd 1 and 2 point at the log file and the
project's lines go to a copy of the terminal's descriptor.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

PROJECT_LOGGER = "rlpruner_ray"
LOG_FILE = "log.txt"
# without a terminal, a progress line at most this often per bar (short bars stay silent)
PLAIN_PROGRESS_EVERY_S = 30.0


class _State:
    terminal = None          # the terminal's stderr (a dup) while foreign output is redirected
    log_temp: Path | None = None
    log_attached = False
    saved_fds: tuple[int, int] | None = None
    quiet = False


_state = _State()


def terminal():
    """The stream the project's lines and progress bars are written to."""
    return _state.terminal or sys.stderr


class _TerminalHandler(logging.Handler):
    def emit(self, record):
        try:
            message = self.format(record) + "\n"
            stream = terminal()
            if is_terminal(stream):
                from tqdm import tqdm
                with tqdm.external_write_mode(file=stream):   # print above an active bar, not through it
                    stream.write(message)
            else:
                stream.write(message)
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _width(stream) -> int:
    """The terminal's width; 100 where it reports none (a pty without a size makes
    tqdm draw nothing at all)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 100
    except (OSError, AttributeError, ValueError):
        return 100


def setup_logging(*, quiet: bool = False, verbose: bool = False) -> None:
    """The project's lines as ``[rlpruner] ...`` on the terminal; other libraries'
    log records only from WARNING up, and (unless ``verbose``) where their other
    output goes: the log file. Safe to call again."""
    _state.quiet = quiet
    project = logging.getLogger(PROJECT_LOGGER)
    for h in [h for h in project.handlers if isinstance(h, _TerminalHandler)]:
        project.removeHandler(h)
    handler = _TerminalHandler()
    handler.setFormatter(logging.Formatter("[rlpruner] %(message)s"))
    project.addHandler(handler)
    project.setLevel(logging.WARNING if quiet else logging.INFO)
    project.propagate = False          # not a second time through the root logger
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())   # sys.stderr at the time of each record
    root.setLevel(logging.INFO if verbose else logging.WARNING)


# ---------------------------------------------------------------- foreign output
@contextlib.contextmanager
def foreign_output_to_log(out_dir=None):
    """Send whatever is written to fd 1 and 2 to a log file while the block runs.

    The log starts as a temp file; :func:`attach_log` (called once the run's
    folder exists) moves it to ``out_dir/log.txt`` and keeps appending there. A
    block that ends with bad input (an ``RLPrunerError``) writes no log anywhere
    (refusals leave nothing behind); one that ends otherwise with the folder
    present leaves the log there; a crash with no folder keeps the temp file and
    says where it is."""
    from .errors import RLPrunerError
    if _state.saved_fds is not None:        # already inside one (nested call)
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    fd, name = tempfile.mkstemp(prefix="rlpruner-", suffix=".log")
    saved = (os.dup(1), os.dup(2))
    _state.terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    _state.saved_fds, _state.log_temp, _state.log_attached = saved, Path(name), False
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    failure = None
    try:
        yield
    except BaseException as exc:
        failure = exc
        raise
    finally:
        if not _state.log_attached and out_dir is not None and Path(out_dir).is_dir() \
                and not isinstance(failure, RLPrunerError):
            attach_log(out_dir)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for s in saved:
            os.close(s)
        _state.terminal.close()
        _state.terminal, _state.saved_fds = None, None
        temp, _state.log_temp = _state.log_temp, None
        if temp is not None and temp.exists():
            if failure is None or isinstance(failure, (RLPrunerError, KeyboardInterrupt)) \
                    or temp.stat().st_size == 0:
                temp.unlink()
            else:
                print(f"rlpruner: the output of Ray and other libraries is in {temp}", file=sys.stderr)


def attach_log(folder) -> None:
    """Continue the redirected output in ``folder/log.txt`` (appending: a resumed
    run adds to it). A no-op when output is not being redirected."""
    if _state.saved_fds is None or _state.log_attached:
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    target = Path(folder) / LOG_FILE
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    if _state.log_temp is not None and _state.log_temp.exists():
        with open(_state.log_temp, "rb") as src, os.fdopen(os.dup(fd), "ab") as dst:
            shutil.copyfileobj(src, dst)
        _state.log_temp.unlink()
    _state.log_temp = None
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _state.log_attached = True


def append_to_log(folder, text: str) -> None:
    """Add ``text`` to ``folder/log.txt`` (a failed step's traceback): the log is the
    one file written by appending, never replaced, so it takes no atomic write."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    fd = os.open(Path(folder) / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


# ---------------------------------------------------------------- progress
class Progress:
    """Progress of one piece of work (a step's evaluations, fine-tuning batches):
    a tqdm bar on a terminal; without one, a plain ``[rlpruner]`` line at most
    every ``every_s`` seconds, so short work prints nothing and long work shows
    it is moving. Silent with ``-q``."""

    def __init__(self, total: int, label: str, *, every_s: float = PLAIN_PROGRESS_EVERY_S, stream=None):
        self.total, self.label, self.every_s = int(total), label, every_s
        self.done = 0
        self.stream = stream or terminal()
        self.started = self._last = time.monotonic()
        self._bar = None
        if not _state.quiet and is_terminal(self.stream):
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, desc=f"[rlpruner] {label}", file=self.stream, leave=False,
                             ncols=_width(self.stream))

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if not _state.quiet and now - self._last >= self.every_s:
            self._last = now
            self.stream.write(f"[rlpruner] {self.label}: {self.done}/{self.total} "
                              f"({now - self.started:.0f} s)\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
