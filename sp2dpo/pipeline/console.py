"""The pipeline's console: stage headers and one live progress line per stage; the rest to log files.

A stage's libraries (Ray, Ray Data, Ray Train workers through `log_to_driver`, vLLM, Serve,
transformers, DeepSpeed) write INFO lines and progress bars straight to file descriptors 1 and 2,
from threads and from child processes. So the capture works at the descriptor level: while a stage
runs, fds 1 and 2 point at its log file, `<run_dir>/logs/<stage>.log` (written locally and uploaded
when the run dir is object storage), and the console writes to a copy of the terminal taken before.
A thread follows the log and shows the newest progress bar it finds there (tqdm's
`label:  58%|...| 7/12`) beside the elapsed time. With `verbose` nothing is captured: every line
streams to the terminal as it would without the pipeline.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from sp2dpo import storage

# tqdm's bar as it reaches a log: "train:  58%|█████▊    | 7/12 [00:53<00:46, ...]"; the
# label is optional (Ray Data's bars have one, a bare tqdm has none).
_PROGRESS = re.compile(r"(?:([A-Za-z][\w .-]{0,40}?):\s*)?(\d{1,3})%\|[^|\n]*\|\s*(\d+)/(\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def latest_progress(text: str) -> str | None:
    """The newest tqdm bar in `text` as `label 7/12`, or None when there is none."""
    found = None
    for match in _PROGRESS.finditer(_ANSI.sub("", text)):
        found = match
    if found is None:
        return None
    label, _, done, total = found.groups()
    return f"{label.strip() + ' ' if label else ''}{done}/{total}"


def log_uri(run_dir: str, stage: str) -> str:
    return storage.join_uri(run_dir, "logs", f"{stage}.log")


class PipelineConsole:
    """Where the pipeline's own lines go (the terminal) and where everything else goes (a log)."""

    def __init__(self, run_dir: str, verbose: bool = False):
        from rich.console import Console

        self.run_dir = run_dir
        self.verbose = verbose
        # Between stages the console writes to whatever sys.stderr is then; during a quiet stage,
        # to a copy of fd 2 taken as the stage begins and closed as it ends (`stage`).
        self.console = Console(stderr=True)

    def print(self, *args: Any, **kwargs: Any) -> None:
        self.console.print(*args, **kwargs)

    def rule(self, title: str) -> None:
        self.console.rule(title, style="cyan")

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[str | None]:
        """Run the body with fds 1 and 2 in the stage's log; yields the log's final location
        (None when verbose)."""
        if self.verbose:
            yield None
            return
        uri = log_uri(self.run_dir, name)
        remote = storage.is_uri(uri)
        if remote:
            local = os.path.join(tempfile.mkdtemp(prefix="sp2dpo-log-"), f"{name}.log")
        else:
            os.makedirs(os.path.dirname(uri), exist_ok=True)
            local = uri
        stop = threading.Event()
        follower = threading.Thread(target=self._follow, args=(name, local, stop), daemon=True)
        try:
            with self._on_terminal(), _descriptors_to(local):
                follower.start()
                try:
                    yield uri
                finally:
                    stop.set()
                    follower.join(timeout=5)
        finally:
            if remote:
                try:
                    with open(local, "rb") as f:
                        storage.write_bytes(uri, f.read())
                except OSError as exc:  # never hide the stage's own outcome behind this
                    self.print(f"[yellow]could not upload the stage log to {uri}: {exc}; it is at {local}[/]")
                else:
                    shutil.rmtree(os.path.dirname(local), ignore_errors=True)

    @contextlib.contextmanager
    def _on_terminal(self) -> Iterator[None]:
        """Keep the console on the terminal while fds 1 and 2 point at a stage's log: a copy of
        fd 2 taken now, closed when the stage ends (one descriptor per stage, none left open)."""
        sys.stderr.flush()
        terminal = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, closefd=True)
        self.console.file = terminal
        try:
            yield
        finally:
            self.console.file = None  # back to following sys.stderr
            terminal.close()

    def _follow(self, name: str, path: str, stop: threading.Event) -> None:
        started = time.monotonic()
        with self.console.status(f"{name}", spinner="dots") as status:
            offset, progress = 0, None
            while not stop.wait(0.5):
                try:
                    with open(path, "rb") as f:
                        f.seek(offset)
                        chunk = f.read().decode(errors="replace")
                        offset = f.tell()
                except OSError:
                    chunk = ""
                progress = latest_progress(chunk) or progress
                elapsed = time.monotonic() - started
                status.update(f"{name}  [dim]{elapsed:4.0f} s[/]" + (f"  {progress}" if progress else ""))


@contextlib.contextmanager
def _descriptors_to(path: str) -> Iterator[None]:
    """Point fds 1 and 2 (and so this process's children, threads and Python streams) at `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        # sys.stdout/err too: they need not write to fds 1 and 2 (pytest, notebooks replace them).
        # Streams over the fds themselves, never closed: a logging handler a library creates
        # during the stage keeps its stream and so writes wherever the fds point later.
        with contextlib.redirect_stdout(_fd_stream(1)), contextlib.redirect_stderr(_fd_stream(2)):
            yield
    finally:
        _fd_stream(1).flush()
        _fd_stream(2).flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (log, *saved):
            os.close(fd)


@functools.cache
def _fd_stream(fd: int) -> Any:
    return open(fd, "w", buffering=1, errors="replace", closefd=False)
