"""The stage server: a served `dalle-data` stage behaves as the same command in a process of
its own (outputs, streams, exit status, signals), and the server never outlives its run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from dalle_data import stage_server

BIN = Path(sys.executable).parent
# Asks the server directly, so the test knows the stage was served: prints None when not.
SERVED_RUN = (
    "import sys; from dalle_data import stage_server as s\n"
    "code = s._run_served(sys.argv[1], ['dalle-data', *sys.argv[2:]])\n"
    "print('served', code, flush=True)\n"
)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    path = stage_server.start()
    assert path is not None, "fork, pidfd_open and send_fds exist on Linux"
    process = stage_server._server
    assert process is not None
    try:
        yield path
    finally:
        stage_server.stop()
        assert process.wait(timeout=30) == 0
    assert not Path(path).exists() and not Path(path).parent.exists()


def served(path: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SERVED_RUN, path, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def stage_processes(server_pid: int) -> list[psutil.Process]:
    return psutil.Process(server_pid).children(recursive=True)


def python_output(code: str) -> str:
    """What ``code`` prints, run by a fresh interpreter that must succeed."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_served_stage_writes_what_its_own_process_writes(server: str, tmp_path: Path) -> None:
    """make-sample with a relative folder: the client's working directory is the stage's."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    result = served(server, "make-sample", "sample", cwd=tmp_path / "a")
    assert result.stdout.splitlines()[-1] == "served 0", result.stderr
    alone = subprocess.run(
        [str(BIN / "dalle-data"), "make-sample", "sample"],
        cwd=tmp_path / "b",
        env={k: v for k, v in os.environ.items() if k != stage_server.ENV},
        capture_output=True,
    )
    assert alone.returncode == 0, alone.stderr
    one, two = tmp_path / "a" / "sample", tmp_path / "b" / "sample"
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len(files) > 100
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)


def test_the_stages_error_and_exit_status_reach_the_client(server: str, tmp_path: Path) -> None:
    result = served(server, "verify", "missing", cwd=tmp_path)
    assert result.stdout.splitlines() == ["served 1"]
    assert "missing/manifest.json does not exist" in result.stderr
    usage = served(server, "verify", "--no-such-option")
    assert usage.stdout.splitlines() == ["served 2"]
    assert "No such option" in usage.stderr


def test_dalle_data_goes_through_the_server_and_without_one_runs_alone(
    server: str, tmp_path: Path
) -> None:
    """The console script: same message and status whether a server answers or not."""
    results = []
    for where in (server, str(tmp_path / "no-server.sock")):
        env = {**os.environ, stage_server.ENV: where}
        results.append(
            subprocess.run(
                [str(BIN / "dalle-data"), "verify", str(tmp_path / "missing")],
                env=env,
                capture_output=True,
                text=True,
            )
        )
    assert [r.returncode for r in results] == [1, 1]
    assert results[0].stderr == results[1].stderr != ""


def test_the_server_holds_none_of_snakemakes_streams_nor_serves_another_install(
    server: str,
) -> None:
    """Whoever reads Snakemake's output until it closes must not wait for the server; a
    `dalle-data` of another install on PATH must not run this install's code."""
    pid = stage_server._server.pid  # type: ignore[union-attr]
    assert {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)} == {os.devnull}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(server)
    request = json.dumps(
        {"argv": ["dalle-data", "--help"], "cwd": "/", "env": {}, "umask": 0o22}
        | {"package": "/elsewhere/dalle_data"}
    ).encode()
    socket.send_fds(conn, [stage_server._HEADER.pack(len(request)) + request], [0, 1, 2])
    assert conn.recv(1) == b""  # closed without taking it: the client runs it itself
    conn.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_to_the_client_ends_the_stage(server: str, tmp_path: Path, signum: int) -> None:
    """A stage blocked on a FIFO: signalled through its client (SIGKILL: the client's end
    is the signal), it ends, and the client ends the way the stage did."""
    shards = tmp_path / "shards"
    shards.mkdir()
    os.mkfifo(shards / "manifest.json")
    server_pid = stage_server._server.pid  # type: ignore[union-attr]
    client = subprocess.Popen(
        [sys.executable, "-c", SERVED_RUN, server, "verify", str(shards)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    writer: list[int] = []

    def reading() -> bool:
        """The stage is in verify, opening the FIFO (the open then returns, a read blocks)."""
        with contextlib.suppress(OSError):
            writer.append(os.open(shards / "manifest.json", os.O_WRONLY | os.O_NONBLOCK))
        return bool(writer)

    wait_for(reading, "the stage never opened the manifest")
    (stage,) = stage_processes(server_pid)
    assert stage.cmdline() == psutil.Process(server_pid).cmdline()  # a fork of the server
    client.send_signal(signum)
    out, err = client.communicate(timeout=30)
    os.close(writer[0])
    wait_for(lambda: not stage_processes(server_pid), "the stage outlived its client")
    if signum == signal.SIGKILL:
        assert client.returncode == -signal.SIGKILL
    elif signum == signal.SIGINT:
        # The stage took the KeyboardInterrupt, and exits as typer does on one.
        assert out.splitlines() == ["served 130"]
    else:
        assert out.splitlines() == ["served -15"]


def test_a_stage_killed_by_a_signal_kills_its_client_with_it(server: str, tmp_path: Path) -> None:
    """The OOM killer's SIGKILL to the stage: the job's process dies of it too."""
    shards = tmp_path / "shards"
    shards.mkdir()
    os.mkfifo(shards / "manifest.json")
    server_pid = stage_server._server.pid  # type: ignore[union-attr]
    client = subprocess.Popen(
        [str(BIN / "dalle-data"), "verify", str(shards)],
        env={**os.environ, stage_server.ENV: server},
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: len(stage_processes(server_pid)) == 1, "the stage never started")
    stage_processes(server_pid)[0].kill()
    _, err = client.communicate(timeout=30)
    assert client.returncode == -signal.SIGKILL, err


def test_the_stage_gets_the_clients_environment_umask_and_streams(tmp_path: Path) -> None:
    """`_Stage.become` in a fork of this process, as the server does it."""
    read_out, write_out = os.pipe()
    request = {
        "argv": ["dalle-data", "x"],
        "cwd": str(tmp_path),
        "env": {"ONLY_IN_CLIENT": "1", "SET_BY_BOTH": "client", "PYTHONUNBUFFERED": "1"},
        "umask": 0o027,
    }
    devnull = os.open(os.devnull, os.O_RDONLY)
    stage = stage_server._Stage(
        request,
        [devnull, write_out, os.dup(2)],
        {"SET_BY_IMPORT": "server", "SET_BY_BOTH": "server"},
        socket.socket(socket.AF_UNIX),
    )
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child reports through the pipe)
        try:
            stage.become()
            umask = os.umask(0)
            print(
                json.dumps(
                    {
                        "cwd": os.getcwd(),
                        "env": dict(os.environ),
                        "umask": umask,
                        "argv": sys.argv,
                        "pgid": os.getpgid(0) == os.getpid(),
                        "stdin": sys.stdin.read(),
                    }
                )
            )
            sys.stdout.flush()
        finally:
            os._exit(0)
    os.close(write_out)
    os.close(devnull)
    with os.fdopen(read_out) as pipe:
        seen = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert seen == {
        "cwd": str(tmp_path),
        "env": {
            "ONLY_IN_CLIENT": "1",
            "SET_BY_BOTH": "client",
            "SET_BY_IMPORT": "server",
            "PYTHONUNBUFFERED": "1",
        },
        "umask": 0o027,
        "argv": ["dalle-data", "x"],
        "pgid": True,
        "stdin": "",
    }


# A stand-in command for `_run_stage`, in a fork: it registers an exit handler, leaves output
# in the buffer and a thread still running, then ends with ENDING. The parent writes what the
# stage reported on its connection to report.bin and exits as the stage did.
ENDING_SCRIPT = """
import atexit, os, signal, socket, sys, threading, time
from dalle_data import cli, stage_server
def command():
    atexit.register(lambda: print("exit handler ran"))
    sys.stdout.write("buffered, ")
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread done, ", end=""))).start()
    ENDING
cli.main = command
request = {"argv": ["dalle-data"], "cwd": os.getcwd(), "env": dict(os.environ), "umask": 0o22}
mine, theirs = socket.socketpair()
pid = os.fork()
if pid == 0:
    mine.close()
    stage_server._run_stage(stage_server._Stage(request, [0, 1, 2], {}, theirs))
theirs.close()
report = stage_server._recv_exact(mine, 5)
with open("report.bin", "wb") as f:
    f.write(report)
code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


@pytest.mark.parametrize(
    ("ending", "status", "message"),
    [
        ("pass", 0, ""),
        ("sys.exit(3)", 3, ""),
        ("sys.exit('no shards here')", 1, "no shards here\n"),
        ("raise RuntimeError('boom')", 1, "RuntimeError: boom\n"),
        ("raise KeyboardInterrupt", -signal.SIGINT, "KeyboardInterrupt\n"),
    ],
)
def test_a_stage_ends_as_its_interpreter_would(
    tmp_path: Path, ending: str, status: int, message: str
) -> None:
    """Without the interpreter's teardown, a stage still waits for its threads, runs its exit
    handlers, flushes its buffered output, and exits with the status and message Python
    would give it. It tells its client that status itself (the server may be busy importing
    when it ends), except when a signal kills it: the server reaps it and tells."""
    result = subprocess.run(
        [sys.executable, "-c", ENDING_SCRIPT.replace("ENDING", ending)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == status, result.stderr
    assert result.stdout == "buffered, thread done, exit handler ran\n"
    assert result.stderr.endswith(message)
    reported = (tmp_path / "report.bin").read_bytes()
    assert reported == (b"X" + status.to_bytes(4, "big") if status >= 0 else b"")


def test_the_server_leaves_when_its_snakemake_does(tmp_path: Path) -> None:
    """Started by a process that then dies (Snakemake killed -9): it takes no more stages,
    removes its socket and exits."""
    parent = subprocess.run(
        [
            sys.executable,
            "-c",
            "from dalle_data import stage_server as s; p = s.start(); "
            "print(p, s._server.pid, flush=True); import os; os._exit(0)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    path, pid = parent.stdout.split()
    server = psutil.Process(int(pid))
    server.wait(timeout=30)
    assert not Path(path).exists()


def test_served_commands_exist_and_the_preload_starts_no_thread_and_no_torch() -> None:
    """Forking is only safe without Python threads running (native libraries' own, like
    OpenBLAS's, have fork handlers); torch's thread pools and CUDA state are why training
    commands are not served."""
    from dalle_data.cli import app

    names = {c.name for c in app.registered_commands}
    assert names >= stage_server.SERVED
    assert not stage_server.SERVED & {"train-extend", "generate", "evaluate", "serve", "init"}
    code = (
        "import os, sys, threading\n"
        "from dalle_data.stage_server import PRELOAD, _preload\n"
        "for m in PRELOAD: _preload(m)\n"
        "from dalle_data.compat import IMG2DATASET_MODULES, imported\n"
        "print(threading.active_count(), sys.modules.get('torch'), 'img2dataset' in sys.modules,"
        " all(map(imported, IMG2DATASET_MODULES)))\n"
        "print(os.environ.get('DALLE_DATA_IMG2DATASET_PROCESS'))\n"
    )
    # torch is kept out (None in sys.modules), as in img2dataset's processes; the stages'
    # own spawned pools are not told to keep it out.
    # ... and a download stage forked from it forks img2dataset's processes ready.
    assert python_output(code).split() == ["1", "None", "True", "True", "None"]


def test_a_download_waits_for_img2datasets_modules_and_other_stages_do_not() -> None:
    """Forked before img2dataset's modules are in, a download would start its forkserver as
    a new interpreter importing them again; any other stage imports what it needs itself."""
    code = (
        "import os, socket, sys\n"
        "from dalle_data import compat, stage_server as s\n"
        "compat.IMG2DATASET_MODULES = ('colorsys',)\n"
        "server = s._Server(os.devnull, socket.socket(socket.AF_UNIX), os.getppid())\n"
        "server.pending = ['wave', 'colorsys', 'calendar']\n"
        "server.ready_for(['dalle-data', 'verify', 'shards'])\n"
        "print(server.pending, 'wave' in sys.modules)\n"
        "server.ready_for(['dalle-data', 'download', '--part', 'p.parquet'])\n"
        "print(server.pending, 'wave' in sys.modules, 'colorsys' in sys.modules)\n"
    )
    assert python_output(code).splitlines() == [
        "['wave', 'colorsys', 'calendar'] False",
        "['calendar'] True True",
    ]


def test_a_stage_reaped_in_the_same_batch_as_its_clients_end_is_left_alone() -> None:
    """A client leaves as soon as its stage reports its exit, so one select can hold both the
    stage's exit and the client's end: the end, handled second, finds the stage reaped and
    its connection closed, and neither signals anything nor stops the server."""
    code = (
        "import os, selectors, socket\n"
        "from dalle_data import stage_server as s\n"
        "server = s._Server(os.devnull, socket.socket(socket.AF_UNIX), os.getppid())\n"
        "client, conn = socket.socketpair()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0)\n"
        "pidfd = os.pidfd_open(pid)\n"
        "server.stages[pidfd] = (pid, conn)\n"
        "server.selector.register(pidfd, selectors.EVENT_READ, 'exited')\n"
        "server.selector.register(conn, selectors.EVENT_READ, pid)\n"
        "client.close()\n"
        "server._reap(pidfd)\n"
        "server._signal(conn, pid)\n"
        "print(server.stages, len(server.selector.get_map()))\n"
    )
    # Left registered: the listener and the wake-up socket.
    assert python_output(code).split() == ["{}", "2"]


def test_a_server_that_fails_leaves_no_socket_behind() -> None:
    """Its clients then run their stages alone; /tmp keeps no folder of it."""
    code = (
        "import os, socket\n"
        "from dalle_data import stage_server as s\n"
        "path = s.socket_path()\n"
        "listener = socket.socket(socket.AF_UNIX)\n"
        "listener.bind(path)\n"
        "def fail(self):\n"
        "    raise RuntimeError('broken')\n"
        "s._Server.serve = fail\n"
        "try:\n"
        "    s._serve_main(path, listener.detach(), os.getppid())\n"
        "except RuntimeError as err:\n"
        "    print(err, os.path.exists(os.path.dirname(path)))\n"
    )
    assert python_output(code).split() == ["broken", "False"]
