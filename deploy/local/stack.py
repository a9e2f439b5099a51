"""`meterflow stack up|down|status`: the services, and the meterflow processes started by `meterflow run`."""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deploy.local import bootstrap, proc
from deploy.local.services import POSTGRES_PASSWORD_FILE, Kafka, Mosquitto, Postgres, Service, ServiceStatus
from meterflow.settings import SECRET_FILES, SECRETS_DIR, Settings

log = logging.getLogger(__name__)

Step = Callable[[str], None]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("METERFLOW_CACHE_DIR", Path(base) / "meterflow"))


def services(settings: Settings, cache_dir: Path | None = None) -> list[Service]:
    cache = cache_dir or default_cache_dir()
    # Start order: the database first, so the broker's ACL can be synced from the gateway registry.
    return [Postgres(settings, cache), Mosquitto(settings, cache), Kafka(settings, cache)]


def _new_secret(name: str) -> str:
    if name == SECRET_FILES[("mqtt", "client_id")]:
        # Stable per installation (the collector's persistent session resumes under it), not guessable.
        return f"meterflow-collector-{secrets.token_hex(16)}"
    return secrets.token_urlsafe(32)


def ensure_secrets(state: Path) -> list[str]:
    """Generate each missing secret once into <state>/secrets/ (folder 0700, files 0600); return the
    names generated. An existing file is kept, so every process keeps agreeing with the services."""
    folder = state / SECRETS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    created = []
    for name in (*SECRET_FILES.values(), POSTGRES_PASSWORD_FILE):
        path = folder / name
        if path.exists() and path.read_text().strip():
            continue
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(_new_secret(name) + "\n")
        created.append(name)
    return created


def up(settings: Settings, step: Step, *, timeout_s: float = 180.0) -> list[ServiceStatus]:
    state = settings.state_path
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o755)
    created = ensure_secrets(state)
    if created:
        step(f"generated {', '.join(created)} in {state / SECRETS_DIR} (mode 0600)")
        _stop_apps_holding_old_secrets(settings, step)
    settings = settings.with_state_secrets()
    cache = default_cache_dir()
    bootstrap_log = state / "bootstrap.log"
    started = time.monotonic()
    bootstrap.install_packages(step, bootstrap_log)
    bootstrap.install_timescaledb(step, cache, bootstrap_log)
    bootstrap.install_kafka(step, cache, settings.kafka.version, settings.kafka.scala_version, bootstrap_log)
    svcs = services(settings, cache)
    # Also upgrades a state dir made before the folders were private, without restarting anything.
    for svc in svcs:
        svc.secure_home()
    secure_app_dir(settings)
    for svc in svcs:
        if svc.pid() is None:
            step(f"starting {svc.name} on port {svc.port}")
            svc.start()
        elif isinstance(svc, Mosquitto) and svc.config_changed():
            step(f"restarting {svc.name}: its config or TLS certificate changed")
            svc.stop()
            svc.start()
        if isinstance(svc, Postgres):
            # The broker's gateway accounts come from the registry, so the DB must answer first.
            svc.wait_healthy(timeout_s)
            svc.after_healthy()
    for svc in svcs:
        if not isinstance(svc, Postgres):
            step(f"waiting for {svc.name} to be healthy")
            svc.wait_healthy(timeout_s)
            svc.after_healthy()
    step(f"stack ready in {time.monotonic() - started:.0f} s")
    return [svc.status() for svc in svcs]


def down(settings: Settings, step: Step) -> None:
    for name, pid_file in app_pid_files(settings).items():
        pid = proc.running_pid(pid_file)
        if pid is not None:
            step(f"stopping {name} (pid {pid})")
            proc.stop_pid(pid, timeout_s=30)
        pid_file.unlink(missing_ok=True)
    for svc in reversed(services(settings)):
        if svc.pid() is not None:
            step(f"stopping {svc.name}")
            svc.stop()


def _stop_apps_holding_old_secrets(settings: Settings, step: Step) -> None:
    # Processes `meterflow run` started before the rotation would be refused on their next connect.
    for name, pid_file in app_pid_files(settings).items():
        pid = proc.running_pid(pid_file)
        if pid is not None:
            step(
                f"stopping {name} (pid {pid}): it holds the rotated credentials; `meterflow run` restarts it"
            )
            proc.stop_pid(pid, timeout_s=30)
        pid_file.unlink(missing_ok=True)


def status(settings: Settings) -> list[ServiceStatus]:
    return [svc.status() for svc in services(settings)]


def healthy(settings: Settings) -> bool:
    return all(s.healthy for s in status(settings))


# --- meterflow's own processes -----------------------------------------------------------------


@dataclass(frozen=True)
class AppProcess:
    name: str
    argv: list[str]


def app_dir(settings: Settings) -> Path:
    return settings.state_path / "app"


def secure_app_dir(settings: Settings) -> None:
    """The apps' logs name gateways and carry the payloads they refused: for this OS user alone."""
    folder = app_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)


def app_pid_files(settings: Settings) -> dict[str, Path]:
    folder = app_dir(settings)
    if not folder.exists():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.pid"))}


def start_app(settings: Settings, app: AppProcess) -> tuple[int, Path]:
    secure_app_dir(settings)
    folder = app_dir(settings)
    pid_file, log_file = folder / f"{app.name}.pid", folder / f"{app.name}.log"
    pid = proc.running_pid(pid_file)
    if pid is not None:
        return pid, log_file
    argv = [sys.executable, "-m", "meterflow", *app.argv]
    return proc.start_detached(argv, log_file=log_file, pid_file=pid_file, env=dict(os.environ)), log_file


def app_status(settings: Settings) -> dict[str, int | None]:
    return {name: proc.running_pid(pid_file) for name, pid_file in app_pid_files(settings).items()}


def admin_key(settings: Settings) -> str:
    """The admin key of this installation: METERFLOW_BOOTSTRAP_ADMIN_KEY, else one generated once and
    kept in the state dir. `make run`, the simulator and the tests all use it, so none of them
    replaces the key the others hold."""
    if settings.bootstrap_admin_key:
        return settings.bootstrap_admin_key.get_secret_value()
    path = app_dir(settings) / "admin-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"mf_admin_{secrets.token_urlsafe(32)}\n")
        path.chmod(0o600)
    return path.read_text().strip()
