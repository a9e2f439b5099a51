"""Detached processes with pid files: the process supervision the local stack needs, nothing more."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().split()
    except (FileNotFoundError, PermissionError):
        return None
    if not text or not text[0].isdigit():
        return None
    return int(text[0])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); it is not running.
    with contextlib.suppress(FileNotFoundError, IndexError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return False
    return True


def running_pid(pid_file: Path) -> int | None:
    pid = read_pid(pid_file)
    return pid if pid is not None and pid_alive(pid) else None


def start_detached(
    argv: Sequence[str],
    *,
    log_file: Path,
    pid_file: Path,
    env: Mapping[str, str] | None = None,
) -> int:
    """Start argv in its own session so it outlives the CLI that started it; output goes to log_file.

    posix_spawn rather than Popen: a service is not a child we wait for, and a Popen handle collected
    while its process runs makes Python warn.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    # Logs hold request paths, device ids and errors of every tenant: owner only, also for a log an
    # earlier version created world-readable.
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(log_fd, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    try:
        pid = os.posix_spawnp(
            argv[0],
            list(argv),
            dict(env) if env is not None else dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_DUP2, null_fd, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(log_fd)
        os.close(null_fd)
    pid_file.write_text(f"{pid}\n")
    return pid


def stop_pid(pid: int, *, timeout_s: float = 30.0, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Send sig, wait up to timeout_s, then SIGKILL. True when the process is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            _reap(pid)
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    _reap(pid)
    return not pid_alive(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def run_as_argv(user: str | None, argv: Sequence[str]) -> list[str]:
    """Prefix argv so it runs as user when we are root (PostgreSQL refuses to run as root)."""
    if user is None or os.geteuid() != 0:
        return list(argv)
    return ["runuser", "-u", user, "--", *argv]


def chown_tree(path: Path, user: str) -> None:
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in (*dirs, *files):
            os.chown(Path(root) / name, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
