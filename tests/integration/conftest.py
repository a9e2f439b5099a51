"""The real stack for integration tests: reused when healthy, otherwise started (and stopped after)."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from deploy.local import stack
from meterflow.settings import Settings
from processing.migrate import migrate
from tests.integration.test_api_fixtures import ApiServer, Fleet, load_fleet, serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def base_settings() -> Iterator[Settings]:
    settings = Settings()
    started = False
    if not stack.healthy(settings):
        stack.up(settings, lambda msg: print(f"[stack] {msg}", file=sys.stderr))  # noqa: T201
        started = True
        # Read again: a first stack up generated the secrets (<state>/secrets/) every process reads.
        settings = Settings()
    settings.require_secrets()
    migrate(settings)
    yield settings
    if started and not os.environ.get("METERFLOW_KEEP_STACK"):
        stack.down(settings, lambda msg: print(f"[stack] {msg}", file=sys.stderr))  # noqa: T201


@dataclass
class Pipeline:
    settings: Settings
    env: dict[str, str]
    api_url: str
    admin_key: str
    procs: dict[str, subprocess.Popen[bytes]]
    log_dir: Path
    shared_group: str

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.api_url, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=30
        )

    def start(self, name: str, *argv: str, client_id_suffix: str = "") -> subprocess.Popen[bytes]:
        env = dict(self.env)
        env["METERFLOW_MQTT__CLIENT_ID"] += client_id_suffix
        with (self.log_dir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "meterflow", *argv], env=env, stdout=log, stderr=log
            )
        self.procs[name] = proc
        return proc

    def wait_for_log(self, name: str, needle: str, timeout_s: float = 60, occurrence: int = 1) -> None:
        """Wait until the process's log (appended across restarts) holds `needle` `occurrence` times."""
        deadline = time.monotonic() + timeout_s
        path = self.log_dir / f"{name}.log"
        while path.read_text(errors="replace").count(needle) < occurrence:
            if self.procs[name].poll() is not None:
                pytest.fail(f"{name} exited: see {path}")
            if time.monotonic() > deadline:
                pytest.fail(f"{name} did not log {needle!r} within {timeout_s:.0f} s: see {path}")
            time.sleep(0.2)

    def log_counter(self, name: str, needle: str) -> int:
        """The number logged just before `needle` in the process's last such line."""
        found = re.findall(
            rf"(\d+) {re.escape(needle)}", (self.log_dir / f"{name}.log").read_text(errors="replace")
        )
        if not found:
            pytest.fail(f"{name} never logged {needle!r}")
        return int(found[-1])

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.terminate()
        proc.wait(timeout=60)


@dataclass
class Isolated:
    """A service of a test module's own, on Kafka topics of its own, with its metrics served, so its
    dead letters and counters are that module's alone."""

    pipeline: Pipeline
    settings: Settings
    metrics_url: str

    def counter(self, name: str, **labels: str) -> float:
        text = httpx.get(self.metrics_url, timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    def wait_counter(self, name: str, at_least: float, **labels: str) -> float:
        deadline = time.monotonic() + 60
        while (value := self.counter(name, **labels)) < at_least:
            assert time.monotonic() < deadline, f"{name}{labels} = {value}, waited for {at_least}"
            time.sleep(0.2)
        return value


def start_isolated(
    pipeline: Pipeline, name: str, argv: list[str], ready: str, env: dict[str, str] | None = None
) -> Isolated:
    """Start `meterflow *argv` as `name` on readings and dead-letter topics, a processor group, an MQTT
    client id and a metrics port of its own; stop it with `pipeline.stop(name)`."""
    run = uuid.uuid4().hex[:8]
    port = _free_port()
    overrides = {
        "METERFLOW_KAFKA__READINGS_TOPIC": f"test-{run}.{name}-readings",
        "METERFLOW_KAFKA__DLQ_TOPIC": f"test-{run}.{name}-dlq",
        "METERFLOW_KAFKA__PROCESSOR_GROUP": f"test-{run}-{name}",
        "METERFLOW_MQTT__CLIENT_ID": f"{pipeline.env['METERFLOW_MQTT__CLIENT_ID']}-{name}-{run}",
        "METERFLOW_INGEST__METRICS_PORT": str(port),
        "METERFLOW_PROCESSING__METRICS_PORT": str(port),
        **(env or {}),
    }
    kafka = pipeline.settings.kafka.model_copy(
        update={
            "readings_topic": overrides["METERFLOW_KAFKA__READINGS_TOPIC"],
            "dlq_topic": overrides["METERFLOW_KAFKA__DLQ_TOPIC"],
        }
    )
    settings = pipeline.settings.model_copy(update={"kafka": kafka})
    from deploy.local.services import ensure_topics

    asyncio.run(ensure_topics(settings))
    with (pipeline.log_dir / f"{name}.log").open("ab") as log:
        pipeline.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "meterflow", *argv],
            env={**pipeline.env, **overrides},
            stdout=log,
            stderr=log,
        )
    pipeline.wait_for_log(name, ready)
    return Isolated(pipeline, settings, f"http://127.0.0.1:{port}/metrics")


@pytest.fixture(scope="session")
def pipeline(base_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """API in-process, collector and processor as real processes, on topics and groups of this run only."""
    run_id = uuid.uuid4().hex[:8]
    # The installation's own admin key: a test-only key would replace the one `make run` handed out.
    admin_key = stack.admin_key(base_settings)
    overrides = {
        "METERFLOW_KAFKA__READINGS_TOPIC": f"test-{run_id}.readings",
        "METERFLOW_KAFKA__DLQ_TOPIC": f"test-{run_id}.dlq",
        "METERFLOW_KAFKA__PROCESSOR_GROUP": f"test-{run_id}-processor",
        # Unguessable, as every service client id (docs/ingest.md#credentials).
        "METERFLOW_MQTT__CLIENT_ID": f"test-{secrets.token_hex(16)}-collector",
        "METERFLOW_INGEST__METRICS_PORT": "0",
        "METERFLOW_PROCESSING__METRICS_PORT": "0",
        "METERFLOW_BOOTSTRAP_ADMIN_KEY": admin_key,
    }
    env = {**os.environ, **overrides}
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    settings = Settings()
    from deploy.local.services import ensure_topics

    asyncio.run(ensure_topics(settings))

    from api.app import create_app

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    api_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api_url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    log_dir = Path(os.environ.get("METERFLOW_TEST_ARTIFACTS", "test-artifacts")) / run_id
    log_dir.mkdir(parents=True, exist_ok=True)
    p = Pipeline(settings, env, api_url, admin_key, {}, log_dir, shared_group=f"test-{run_id}")
    # Test collectors are ephemeral: on exit they leave their group rather than keep a broker session
    # that would queue copies of every later message for a week.
    p.start("collector", "collector", "--shared-group", p.shared_group, "--leave-group-on-exit")
    p.start("processor", "processor")
    p.wait_for_log("collector", "subscriptions acknowledged")
    yield p
    for name in list(p.procs):
        p.stop(name)
    server.should_exit = True
    thread.join(timeout=10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def fleet(base_settings: Settings) -> Fleet:
    """The API tests' known aggregates (tests/integration/test_api_fixtures.py); modules with a fleet
    of their own define their own fixture."""
    return load_fleet(base_settings)


@pytest.fixture(scope="module")
def api(base_settings: Settings) -> Iterator[ApiServer]:
    """The API in-process on a free port, one per module; a module needing other settings overrides it."""
    yield from serve(base_settings)
