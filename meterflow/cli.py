"""The `meterflow` command: stack, database, services, simulator, whole-pipeline run, benchmarks."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

import httpx
import orjson
import typer
from rich.console import Console
from rich.table import Table

from meterflow import logs
from meterflow.settings import Settings

if TYPE_CHECKING:
    from deploy.local.services import ServiceStatus

app = typer.Typer(help="meterflow: energy metering and VPP telemetry ingestion.", no_args_is_help=True)
stack_app = typer.Typer(help="The local stack: Mosquitto, Kafka (KRaft), PostgreSQL + TimescaleDB.")
db_app = typer.Typer(help="Database schema.")
bench_app = typer.Typer(
    help="Benchmarks: each prints its figure beside a peer's or ceiling's from the same run."
)
app.add_typer(stack_app, name="stack")
app.add_typer(db_app, name="db")
app.add_typer(bench_app, name="bench")

console = Console(stderr=True)
log = logging.getLogger("meterflow")


def _settings() -> Settings:
    settings = Settings()
    logs.configure(settings.log_level, json=settings.log_json)
    return settings


def _step(message: str) -> None:
    console.print(f"[bold cyan]>[/] {message}")


# --- stack ---------------------------------------------------------------------------------------


@stack_app.command("up")
def stack_up() -> None:
    """Install (first time only), configure and start the services; wait until each is healthy."""
    from deploy.local import stack

    settings = _settings()
    try:
        statuses = stack.up(settings, _step)
    except Exception as exc:
        console.print(f"[bold red]stack up failed:[/] {exc}")
        raise typer.Exit(1) from exc
    _print_status(statuses)


@stack_app.command("down")
def stack_down() -> None:
    """Stop meterflow's processes and the services, cleanly."""
    from deploy.local import stack

    stack.down(_settings(), _step)


@stack_app.command("status")
def stack_status() -> None:
    """Show each service and meterflow process with port, pid and health."""
    from deploy.local import stack

    settings = _settings()
    statuses = stack.status(settings)
    _print_status(statuses)
    apps = stack.app_status(settings)
    if apps:
        table = Table("process", "pid", "log")
        for name, pid in apps.items():
            table.add_row(
                name, str(pid) if pid else "[red]stopped[/]", str(stack.app_dir(settings) / f"{name}.log")
            )
        Console().print(table)
    if not all(s.healthy for s in statuses):
        raise typer.Exit(1)


def _print_status(statuses: Sequence[ServiceStatus]) -> None:
    table = Table("service", "port", "pid", "health", "log")
    for s in statuses:
        health = f"[green]healthy[/] {s.detail}" if s.healthy else f"[red]down[/] {s.detail}"
        table.add_row(s.name, str(s.port), str(s.pid or "-"), health, str(s.log_file))
    Console().print(table)


# --- database --------------------------------------------------------------------------------------


@db_app.command("migrate")
def db_migrate(revision: str = "head") -> None:
    """Apply schema migrations (Alembic) up to REVISION."""
    from processing.migrate import current, migrate

    settings = _settings()
    migrate(settings, revision)
    console.print(f"schema at revision {current(settings)}")


# --- services ----------------------------------------------------------------------------------------


@app.command()
def collector(
    shared_group: Annotated[
        str | None, typer.Option(help="MQTT v5 shared-subscription group, so N collectors split the load")
    ] = "meterflow",
) -> None:
    """Run an MQTT -> Kafka collector until SIGTERM."""
    from prometheus_client import start_http_server

    from ingest.collector import Collector

    settings = _settings()
    if settings.ingest.metrics_port:
        start_http_server(settings.ingest.metrics_port, addr="127.0.0.1")
    asyncio.run(Collector(settings, shared_group=shared_group).run())


@app.command()
def processor() -> None:
    """Run a Kafka -> TimescaleDB processor until SIGTERM."""
    from prometheus_client import start_http_server

    from processing.processor import Processor

    settings = _settings()
    if settings.processing.metrics_port:
        start_http_server(settings.processing.metrics_port, addr="127.0.0.1")
    asyncio.run(Processor(settings).run())


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="default: METERFLOW_API__HOST")] = None,
    port: Annotated[int | None, typer.Option(help="default: METERFLOW_API__PORT")] = None,
) -> None:
    """Run the query API (uvicorn)."""
    import uvicorn

    settings = _settings()
    uvicorn.run(
        "api.app:app_factory",
        factory=True,
        host=host or settings.api.host,
        port=port or settings.api.port,
        log_level=settings.log_level.lower(),
    )


@app.command()
def simulate(
    api_url: Annotated[str | None, typer.Option(help="API to register the fleet with")] = None,
    admin_key: Annotated[str | None, typer.Option(envvar="METERFLOW_BOOTSTRAP_ADMIN_KEY")] = None,
    tenant: str = "demo",
    gateway: str = "demo-gw-1",
    site: str = "demo-site",
    devices: int = 10,
    steps: Annotated[int | None, typer.Option(help="batches to publish; forever when omitted")] = None,
    step_s: Annotated[float, typer.Option(help="simulated seconds between readings")] = 60.0,
    speed: Annotated[float, typer.Option(help="x real time; 0 = as fast as possible")] = 1.0,
    seed: int = 42,
    backfill: Annotated[bool, typer.Option(help="start `steps` intervals in the past, not now")] = False,
) -> None:
    """Register a simulated fleet through the API and publish its readings over MQTT."""
    from meterflow.contract import now_ms
    from simulators.fleet import Fleet
    from simulators.publisher import Publisher, register_fleet, run_fleet

    settings = _settings()
    key = admin_key or _admin_key(settings)
    url = api_url or f"http://{settings.api.host}:{settings.api.port}"
    fleet = Fleet.create(tenant=tenant, gateway=gateway, site=site, n_devices=devices, seed=seed)
    creds = register_fleet(url, key, fleet)
    publisher = Publisher(settings.mqtt.host, settings.mqtt.port, creds, qos=settings.mqtt.qos)
    start = now_ms() - int((steps or 0) * step_s * 1000) if backfill else None
    started = time.monotonic()
    try:
        n = run_fleet(fleet, publisher, steps=steps, step_s=step_s, speed=speed, start_ms=start)
    finally:
        publisher.close()
    console.print(f"published {n} readings from {devices} devices in {time.monotonic() - started:.1f} s")


def _admin_key(settings: Settings) -> str:
    """The admin key `meterflow run` uses: METERFLOW_BOOTSTRAP_ADMIN_KEY, else one kept in the state dir."""
    if settings.bootstrap_admin_key:
        return settings.bootstrap_admin_key.get_secret_value()
    path = settings.state_path / "app" / "admin-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"mf_admin_{secrets.token_urlsafe(32)}\n")
        path.chmod(0o600)
    return path.read_text().strip()


# --- the whole pipeline ----------------------------------------------------------------------------


@app.command()
def run(
    devices: Annotated[int, typer.Option(help="simulated meters")] = 20,
    step_s: Annotated[float, typer.Option(help="seconds between readings of each meter")] = 5.0,
) -> None:
    """Start everything: services, schema, API, collector, processor and a live simulated fleet."""
    from deploy.local import stack

    settings = _settings()
    try:
        stack.up(settings, _step)
    except Exception as exc:
        console.print(f"[bold red]stack up failed:[/] {exc}")
        raise typer.Exit(1) from exc
    _step("applying database migrations")
    from processing.migrate import migrate

    migrate(settings)
    key = _admin_key(settings)
    os.environ["METERFLOW_BOOTSTRAP_ADMIN_KEY"] = key
    base = f"http://{settings.api.host}:{settings.api.port}"
    for name, argv in (("api", ["api"]), ("collector", ["collector"]), ("processor", ["processor"])):
        pid, log_file = stack.start_app(settings, stack.AppProcess(name, argv))
        _step(f"{name} running (pid {pid}), log {log_file}")
    _wait_ready(base)
    sim = ["simulate", "--devices", str(devices), "--step-s", str(step_s), "--speed", "1"]
    pid, log_file = stack.start_app(settings, stack.AppProcess("simulator", sim))
    _step(f"simulated fleet publishing (pid {pid}), log {log_file}")
    now = datetime.now(UTC)
    window = f"start={now - timedelta(hours=1):%Y-%m-%dT%H:%M:%SZ}&end={now + timedelta(days=1):%Y-%m-%dT%H:%M:%SZ}"
    key_source = "METERFLOW_BOOTSTRAP_ADMIN_KEY" if settings.bootstrap_admin_key else ".stack/app/admin-key"
    console.print(
        f"\n[bold green]meterflow is running.[/]\n"
        f"  API        {base}/docs  (admin key: {key_source})\n"
        f'  readings   curl -H "Authorization: Bearer $(cat .stack/app/admin-key)" '
        f"'{base}/v1/devices/m-0000/readings?tenant=demo&{window}'\n"
        f"  status     meterflow stack status\n"
        f"  stop       make down   (or: meterflow stack down)\n",
        soft_wrap=True,
    )


def _wait_ready(base: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    console.print(f"[bold red]API at {base} not ready after {timeout_s:.0f} s[/]; see .stack/app/api.log")
    raise typer.Exit(1)


# --- benchmarks --------------------------------------------------------------------------------------


@bench_app.command("store")
def bench_store(
    readings: Annotated[int, typer.Option(help="readings to write")] = 500_000,
    devices: int = 1000,
    batch: Annotated[int, typer.Option(help="readings per transaction")] = 10_000,
    as_json: Annotated[bool, typer.Option("--json", help="last line is one JSON object")] = False,
) -> None:
    """The processor's raw-reading write path beside a bare binary COPY of the same rows (needs the stack)."""
    from bench.store import run_store_bench

    settings = _settings()
    result = run_store_bench(settings, n_readings=readings, n_devices=devices, per_batch=batch, tick=_step)
    console.print(
        f"write path {result['value']:,} readings/s; bare COPY {result['peer_value']:,} readings/s; "
        f"ratio {result['ratio']}"
    )
    if as_json:
        typer.echo(orjson.dumps(result).decode())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
