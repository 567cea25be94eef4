"""The ``dalle-data`` entry point, and the stage server that makes pipeline stages start fast.

A Snakemake run starts one process per job, and each of the short shard-pipeline stages
spent most of its second importing pandas, pyarrow, typer and our modules before doing a
few milliseconds of work. The Snakefile (pipelines/common.smk) starts one server for the run
(:func:`start`); it imports those once, and every stage command of that run is a fork of
it (the approach of PySpark's worker daemon and of multiprocessing's forkserver).

The ``dalle-data`` a rule runs stays a separate process with the same contract: it sends
its arguments, working directory, environment, umask and its stdin/stdout/stderr file
descriptors (so ``> {log} 2>&1`` still lands in the log) over a unix socket, forwards the
signals it receives, and exits with the stage's exit status, or dies of the same signal.
If it is killed itself (kill -9), the server kills the stage. When no server answers
(none started, another machine, an old kernel) the command runs in its own process as
before; a stage's outputs never depend on which way it ran.

Only commands that import no torch are served (:data:`SERVED`); training, generation and
serving keep their own processes and thread settings.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import io
import json
import os
import selectors
import signal
import socket
import struct
import sys
import tempfile
import threading
from typing import TYPE_CHECKING, Any, NoReturn

from dalle_data import compat

# Only the Snakefile's side starts processes: every `dalle-data` (a served stage's client
# included) imports this module first, and subprocess costs it about 4 ms.
if TYPE_CHECKING:
    import subprocess

ENV = "DALLE_DATA_STAGE_SERVER"
SERVED = frozenset(
    {
        "make-sample",
        "fetch",
        "normalize",
        "filter",
        "train-tokenizer",
        "plan-download",
        "download",
        "finalize",
        "card",
        "verify",
        "put",
    }
)
# Imported by the server before it forks a stage, in the order the pipeline needs them;
# one module between requests, so a stage that arrives early waits at most for one import.
# `module:function`: also call that function (a cache that the stages then share).
PRELOAD = (
    "dalle_data.cli",
    "typer._adapters",  # typer imports it (and pydantic) when it parses a command line
    "pandas",
    "pyarrow.parquet",
    "pyarrow.dataset",  # what pq.read_table and Table.to_pandas import on first use
    "pyarrow.pandas_compat",
    "dalle_data.pipeline.fetch",
    "dalle_data.pipeline.normalize",
    "dalle_data.pipeline.filter_stage",
    "dalle_data.pipeline.download_plan",
    "dalle_data.pipeline.download",
    "dalle_data.pipeline.retry",
    "dalle_data.pipeline.finalize",
    "dalle_data.pipeline.holdout",
    "dalle_data.pipeline.dataset_card",
    "dalle_data.formats.manifest",
    "dalle_data.formats.tokenizers",
    # After dalle_data.pipeline.download, which sets OpenCV's pixel limit before cv2 loads:
    # what img2dataset's processes import (compat.IMG2DATASET_MODULES), so the download
    # stage forks them ready. albumentations (0.4 s) in steps: its package imports
    # scipy.ndimage first.
    "img2dataset",
    "scipy.ndimage",
    "albumentations.core",
    "dalle_data.formats.tokenizers:clip_model",  # the tokenizer finalize and verify use
    "PIL.ImageDraw",  # the card's pictures
    "PIL.PngImagePlugin",
)
_IMG2DATASET_PACKAGES = frozenset(m.partition(".")[0] for m in compat.IMG2DATASET_MODULES)
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_STARTED, _EXITED = b"A", b"X"
_HEADER = struct.Struct("!I")
_STATUS = struct.Struct("!i")
# A unix socket's path must fit in sun_path (108 bytes on Linux, with its NUL).
_MAX_SOCKET_PATH = 100
# The longest a stage waits for the server to take it (the server imports one module at a
# time between requests, so this only passes when the server is stuck): then it runs alone.
_ACCEPT_TIMEOUT_S = 120.0
# A client of another dalle_data install (another venv on PATH) runs its stage itself.
_PACKAGE = os.path.dirname(os.path.realpath(__file__))


def main() -> None:
    """``dalle-data``: a served stage command through the run's stage server when there is
    one, every other command (or no server) in this process."""
    argv = sys.argv[1:]
    path = os.environ.get(ENV)
    if path and argv and argv[0] in SERVED:
        code = _run_served(path, [sys.argv[0], *argv])
        if code is not None:
            _exit_like(code)
    from dalle_data.cli import main as cli_main

    cli_main()


def _exit_like(code: int) -> None:
    """Exit as the stage did: with its status, or killed by its signal."""
    if code < 0:
        with contextlib.suppress(OSError, ValueError):  # SIGKILL's handler cannot be set
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code if code >= 0 else 128 - code)


def _run_served(path: str, argv: list[str]) -> int | None:
    """The stage's exit status (negative: killed by that signal), or None when the server
    did not take the stage, so this process runs it."""
    fds = [0, 1, 2]
    try:
        for fd in fds:
            os.fstat(fd)
    except OSError:
        return None  # a closed standard stream cannot be handed over
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(_ACCEPT_TIMEOUT_S)
        conn.connect(path)
        umask = os.umask(0)
        os.umask(umask)
        request = json.dumps(
            {
                "argv": argv,
                "cwd": os.getcwd(),
                "env": dict(os.environ),
                "umask": umask,
                "package": _PACKAGE,
            }
        ).encode()
        data = _HEADER.pack(len(request)) + request
        sent = socket.send_fds(conn, [data], fds)
        conn.sendall(data[sent:])
        if _recv_exact(conn, 1) != _STARTED:
            conn.close()
            return None
    except OSError:
        conn.close()
        return None
    # From here on the stage runs: forward what a stage would have received, wait for it.
    conn.settimeout(None)
    for signum in _SIGNALS:
        signal.signal(signum, lambda signum, _frame: _forward(conn, signum))
    reply = _recv_exact(conn, 1 + _STATUS.size)
    if len(reply) != 1 + _STATUS.size or reply[:1] != _EXITED:
        print("dalle-data: the stage server stopped while running this stage", file=sys.stderr)
        return 1
    return int(_STATUS.unpack(reply[1:])[0])


def _forward(conn: socket.socket, signum: int) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(bytes([signum]))


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    """Up to ``size`` bytes; fewer only when the peer closed."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


# -- the Snakefile's side ---------------------------------------------------------------

_server: subprocess.Popen[bytes] | None = None


def supported() -> bool:
    """Whether this platform has what the server uses (fork, fd passing, pidfds)."""
    return all((hasattr(os, "fork"), hasattr(os, "pidfd_open"), hasattr(socket, "send_fds")))


def socket_path() -> str | None:
    """A new private folder's socket path short enough for a unix socket, or None."""
    for parent in (None, "/tmp"):
        folder = tempfile.mkdtemp(prefix="dalle-data-", dir=parent)
        path = os.path.join(folder, "stages.sock")
        if len(path.encode()) <= _MAX_SOCKET_PATH:
            return path
        os.rmdir(folder)
    return None


def start() -> str | None:
    """Start this run's stage server (from the Snakefile, as Snakemake reads it) and point the
    jobs at it through :data:`ENV`; the socket path, or None where none can run (stages then
    start as their own processes)."""
    import subprocess

    global _server
    path = socket_path() if supported() else None
    if path is None:
        return None
    # Bound here, so a stage that starts before the server is up waits in the backlog.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(64)
        fd = listener.fileno()
        _server = subprocess.Popen(
            [sys.executable, "-P", "-m", "dalle_data.stage_server", path, str(fd)]
            + [str(os.getpid())],
            # Not Snakemake's streams: whoever reads those until they close (a pipe) would wait
            # for the server too. Its stages write to their clients' streams.
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=[fd],
            # Its own session: a Ctrl-C reaches the stages through their clients, once.
            start_new_session=True,
        )
    os.environ[ENV] = path
    return path


def stop() -> None:
    """Tell the server to stop taking stages (the Snakefile's ``onsuccess``/``onerror``);
    it exits once the stages it runs have ended."""
    global _server
    os.environ.pop(ENV, None)
    if _server is not None:
        with contextlib.suppress(ProcessLookupError):
            _server.send_signal(signal.SIGTERM)
        _server = None


# -- the server ---------------------------------------------------------------------------


class _Stage:
    """A request taken from a client: run in the forked child."""

    def __init__(
        self,
        request: dict[str, Any],
        fds: list[int],
        env_changes: dict[str, str],
        conn: socket.socket,
    ):
        self.request, self.fds, self.env_changes, self.conn = request, fds, env_changes, conn

    def report(self, code: int) -> None:
        """Tell the client the stage's exit status itself: the server, busy importing a
        module, would notice the exit only when that import is done (up to 0.3 s a stage).
        A stage killed by a signal reports nothing; the server reaps it and tells."""
        with contextlib.suppress(OSError):
            self.conn.sendall(_EXITED + _STATUS.pack(code & 0xFF))

    def become(self) -> None:
        """Turn this fresh fork into the client's stage process."""
        # Its own process group, which the server signals: a stage's own processes
        # (img2dataset's) end with it, as they do in a job's group when Snakemake runs it.
        os.setpgid(0, 0)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(self.fds):
            os.dup2(fd, target)
        for fd in self.fds:
            if fd > 2:
                os.close(fd)
        os.chdir(self.request["cwd"])
        os.umask(self.request["umask"])
        # The client's environment, plus the defaults the preloaded modules set when the
        # server imported them (a stage importing them itself would have set them too).
        os.environ.clear()
        os.environ.update({**self.env_changes, **self.request["env"]})
        tempfile.tempdir = None
        sys.argv = list(self.request["argv"])
        unbuffered = bool(self.request["env"].get("PYTHONUNBUFFERED"))
        encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
        # The __std*__ originals too: the server's own sit on the same descriptors, but
        # with buffers of their own.
        sys.stdin = sys.__stdin__ = _stream(0, "r", encoding, unbuffered=False)  # type: ignore[misc]
        sys.stdout = sys.__stdout__ = _stream(1, "w", encoding, unbuffered=unbuffered)  # type: ignore[misc]
        sys.stderr = sys.__stderr__ = _stream(2, "w", encoding, unbuffered=unbuffered)  # type: ignore[misc]


def _stream(fd: int, mode: str, encoding: str, *, unbuffered: bool) -> io.TextIOWrapper:
    """A standard stream on ``fd`` as the interpreter makes one at start-up: line-buffered
    on a terminal (stderr always), unbuffered under PYTHONUNBUFFERED."""
    raw = io.FileIO(fd, mode, closefd=False)
    buffered: Any = raw
    if not unbuffered or mode == "r":
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
    return io.TextIOWrapper(
        buffered,
        encoding=encoding,
        errors="backslashreplace" if fd == 2 else "strict",
        line_buffering=fd == 2 or raw.isatty(),
        write_through=unbuffered,
    )


class _Server:
    """One listening socket, one selector, no Python threads: forking from it is safe. (The
    native threads of preloaded libraries, OpenBLAS's pool and jemalloc's purger, come
    with fork handlers of their own, as for any multiprocessing fork.)"""

    def __init__(self, path: str, listener: socket.socket, parent: int):
        self.path, self.listener, self.parent = path, listener, parent
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.stages: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, conn)
        self.pending = list(PRELOAD)
        self.closing = self.stop_requested = False
        self.env_at_start = _initial_environ()
        # A signal also wakes the selector, so a stop takes effect at once.
        self.wake_read, wake_write = socket.socketpair()
        self.wake_write = wake_write
        wake_write.setblocking(False)
        signal.set_wakeup_fd(wake_write.fileno())
        self.selector.register(self.wake_read, selectors.EVENT_READ, "wake")
        signal.signal(signal.SIGTERM, self._request_stop)

    def _request_stop(self, _signum: int, _frame: Any) -> None:
        self.stop_requested = True

    def close(self) -> None:
        """Take no more stages; the loop ends when the running ones have."""
        if not self.closing:
            self.closing = True
            self.selector.unregister(self.listener)
            self.listener.close()
            _remove_socket(self.path)

    def serve(self) -> _Stage | None:
        """Run until closed: None in the server, the stage to run in each forked child."""
        while not (self.closing and not self.stages):
            if self.stop_requested or os.getppid() != self.parent:
                self.close()  # stopped, or Snakemake is gone: finish what runs, take no more
            events = self.selector.select(timeout=0 if self.pending and not self.closing else 1.0)
            if not events and self.pending:
                self.preload_next()
            for key, _mask in events:
                if key.data == "wake":
                    self.wake_read.recv(64)
                elif key.data == "accept":
                    stage = self._accept()
                    if stage is not None:
                        return stage
                elif key.data == "exited":
                    self._reap(key.fd)
                else:
                    self._signal(key.fileobj, key.data)  # type: ignore[arg-type]
        return None

    def preload_next(self) -> None:
        with contextlib.suppress(Exception):  # the stage then imports it itself
            _preload(self.pending.pop(0))

    def ready_for(self, argv: list[str]) -> None:
        """Before forking a download, preload img2dataset's modules: forked without them, it
        would start its forkserver as a new interpreter that imports them again (about 1 s,
        against a few imports' wait here). Any other stage imports what it needs itself."""
        if argv[1:2] == ["download"]:
            while self.pending and not all(map(compat.imported, compat.IMG2DATASET_MODULES)):
                self.preload_next()

    def _accept(self) -> _Stage | None:
        conn, _ = self.listener.accept()
        fds: list[int] = []
        try:
            conn.settimeout(10.0)
            data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
            if len(data) < _HEADER.size or len(fds) != 3:
                raise OSError("malformed request")
            size = _HEADER.unpack(data[: _HEADER.size])[0]
            body = data[_HEADER.size :]
            while len(body) < size:
                chunk = conn.recv(min(1 << 16, size - len(body)))
                if not chunk:
                    raise OSError("client left")
                body += chunk
            request = json.loads(body)
            if request.get("package") != _PACKAGE:
                raise ValueError("a client of another dalle_data install")
            self.ready_for(request["argv"])
            if _closed(conn):  # it gave up waiting and runs the stage itself: not twice
                raise OSError("client left")
            # Before the fork: the stage's own report of its exit must come after this.
            conn.sendall(_STARTED)
            env_changes = {k: v for k, v in os.environ.items() if self.env_at_start.get(k) != v}
            # The preloaded objects move to the permanent generation: the stage's collections
            # then never walk them, so their pages stay shared instead of being copied.
            gc.freeze()
            pid = os.fork()  # if it fails, the client reports that the server stopped
        except (OSError, ValueError):
            conn.close()
            for fd in fds:
                os.close(fd)
            return None
        if pid == 0:
            signal.set_wakeup_fd(-1)
            self.selector.close()
            self.listener.close()
            self.wake_read.close()
            self.wake_write.close()
            for _pid, other in self.stages.values():
                other.close()
            for pidfd in self.stages:
                os.close(pidfd)
            return _Stage(request, fds, env_changes, conn)
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):  # set on both sides, so a signal can't race it
            os.setpgid(pid, pid)
        pidfd = os.pidfd_open(pid)
        self.stages[pidfd] = (pid, conn)
        self.selector.register(pidfd, selectors.EVENT_READ, "exited")
        self.selector.register(conn, selectors.EVENT_READ, pid)
        return None

    def _reap(self, pidfd: int) -> None:
        pid, conn = self.stages.pop(pidfd)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        with contextlib.suppress(KeyError):  # already gone if the client was killed
            self.selector.unregister(conn)
        with contextlib.suppress(OSError):
            conn.sendall(_EXITED + _STATUS.pack(os.waitstatus_to_exitcode(status)))
        conn.close()

    def _signal(self, conn: socket.socket, pid: int) -> None:
        """A byte from a client is a signal to pass on; its end (the client was killed, or
        left with the status its stage reported) kills the stage's group, as if it had been
        the one killed."""
        if conn.fileno() < 0:  # the stage was reaped earlier in the same batch of events
            return
        try:
            data = conn.recv(64)
        except OSError:
            data = b""
        for signum in data or [signal.SIGKILL]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signum)
        if not data:
            self.selector.unregister(conn)


def _preload(name: str) -> None:
    """Import ``name`` (and call ``function`` of ``module:function``); img2dataset's
    packages as its processes have them (no torch, no wandb: compat.for_img2dataset), which
    suits every served stage, none of which trains. The stages' own child processes
    (spawned pools) are not set up that way."""
    module_name, _, function = name.partition(":")
    if module_name.partition(".")[0] in _IMG2DATASET_PACKAGES:
        compat.for_img2dataset(inherited=False)
    module = importlib.import_module(module_name)
    if function:
        getattr(module, function)()


def _closed(conn: socket.socket) -> bool:
    """Whether the peer has closed its end (nothing left to read but the end)."""
    conn.setblocking(False)
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    finally:
        conn.setblocking(True)


def _initial_environ() -> dict[str, str]:
    """The environment this process started with, before any import set a default."""
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return dict(os.environ)
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {os.fsdecode(k): os.fsdecode(v) for k, v in pairs}


def _run_stage(stage: _Stage) -> NoReturn:
    """Run the stage's command in this fork and end it as an interpreter would, less the
    teardown of every module: that would touch each object the server preloaded and copy
    its pages (about 0.1 s a stage). As at an interpreter's exit, the stage's non-daemon
    threads are waited for, exit handlers run and the streams are flushed, and the exit
    status is the interpreter's: SystemExit's code (its message printed), 1 after an
    uncaught exception, death by SIGINT after an uncaught KeyboardInterrupt.
    (multiprocessing's forked workers end with os._exit the same way.)"""
    stage.become()
    from dalle_data.cli import main as cli_main

    code, interrupted = 0, False
    try:
        cli_main()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
        code, interrupted = 1, isinstance(exc, KeyboardInterrupt)
    threading._shutdown()  # type: ignore[attr-defined]  # what Py_FinalizeEx calls first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more can be told
            stream.flush()
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    stage.report(code)
    os._exit(code)


def _remove_socket(path: str) -> None:
    """Remove the socket and its private folder (whichever is still there)."""
    for remove, target in ((os.unlink, path), (os.rmdir, os.path.dirname(path))):
        with contextlib.suppress(OSError):
            remove(target)


def _serve_main(path: str, listener_fd: int, parent: int) -> None:
    server = _Server(path, socket.socket(fileno=listener_fd), parent)
    try:
        stage = server.serve()
    except BaseException:
        # A server that fails leaves no socket behind: its clients run their stages alone.
        _remove_socket(path)
        raise
    if stage is not None:
        _run_stage(stage)


if __name__ == "__main__":
    _serve_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
