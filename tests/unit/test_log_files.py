"""Service logs (the API's access log among them) are readable by their owner only: another user on
the host must not read request paths, device ids and errors of every tenant."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from deploy.local import proc

pytestmark = pytest.mark.unit


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "left-world-readable-by-an-older-version"])
def test_a_service_log_is_owner_only(tmp_path: Path, existing: bool) -> None:
    log_file = tmp_path / "api.log"
    if existing:
        log_file.write_text("an older line\n")
        log_file.chmod(0o644)
    pid = proc.start_detached(["true"], log_file=log_file, pid_file=tmp_path / "api.pid")
    assert proc.stop_pid(pid, timeout_s=10)
    assert _mode(log_file) == 0o600
    if existing:
        assert log_file.read_text() == "an older line\n"  # appended to, never truncated
