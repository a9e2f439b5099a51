"""The `meterflow` command: stack, database, services, simulator, whole-pipeline run, benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import httpx
import orjson
import typer
from rich.console import Console
from rich.table import Table

from meterflow import logs
from meterflow.settings import Settings

if TYPE_CHECKING:
    from deploy.local.services import ServiceStatus
    from ingest.intensity import Parsed as ParsedPoints
    from ingest.intensity_fetch import Provider, WattTimeSignal
    from processing.audit import VerifyReport
    from simulators.publisher import MqttOutcome
    from simulators.runner import RunResult
    from simulators.spec import FleetSpec

app = typer.Typer(help="meterflow: energy metering and VPP telemetry ingestion.", no_args_is_help=True)
stack_app = typer.Typer(help="The local stack: Mosquitto, Kafka (KRaft), PostgreSQL + TimescaleDB.")
db_app = typer.Typer(help="Database schema.")
bench_app = typer.Typer(
    help="Benchmarks: each prints its figure beside a peer's or ceiling's from the same run."
)
app.add_typer(stack_app, name="stack")
app.add_typer(db_app, name="db")
app.add_typer(bench_app, name="bench")
dlq_app = typer.Typer(help="Dead letters.")
app.add_typer(dlq_app, name="dlq")
audit_app = typer.Typer(help="The audit chain over raw readings.")
app.add_typer(audit_app, name="audit")
retention_app = typer.Typer(help="Retention of raw readings.")
app.add_typer(retention_app, name="retention")
intensity_app = typer.Typer(
    help="Time-varying grid carbon intensity (estimated figures, kept out of compliance totals)."
)
app.add_typer(intensity_app, name="intensity")

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
def db_migrate(revision: str = "heads") -> None:
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
    leave_group_on_exit: Annotated[
        bool,
        typer.Option(
            help="on SIGTERM, leave the shared group and end the MQTT session (scaling down for good)"
        ),
    ] = False,
) -> None:
    """Run an MQTT -> Kafka collector until SIGTERM (a restart with the same client id resumes its session)."""
    from prometheus_client import start_http_server

    from ingest.collector import Collector

    settings = _settings()
    if settings.ingest.metrics_port:
        start_http_server(settings.ingest.metrics_port, addr="127.0.0.1")
    asyncio.run(Collector(settings, shared_group=shared_group, leave_group_on_exit=leave_group_on_exit).run())


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
def vpp() -> None:
    """Run the vpp service (VPP flexibility capacity from live telemetry) until SIGTERM."""
    from prometheus_client import start_http_server

    from processing.vpp import VppService

    settings = _settings()
    if settings.vpp.metrics_port:
        start_http_server(settings.vpp.metrics_port, addr="127.0.0.1")
    asyncio.run(VppService(settings).run())


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


fleet_app = typer.Typer(help="Simulated fleet descriptions.")
app.add_typer(fleet_app, name="fleet")

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def _duration_s(text: str) -> float:
    """`90s`, `15m`, `6h`, `30d`."""
    unit = _DURATION_UNITS.get(text[-1:])
    try:
        return float(text[:-1]) * unit if unit else float(text)
    except ValueError:
        raise typer.BadParameter(f"expected a duration like 90s, 15m, 6h or 30d, got {text!r}") from None


def _generated_fleet(**params: object) -> FleetSpec:
    from simulators.spec import generate_fleet

    return generate_fleet(**params)  # type: ignore[arg-type]


@fleet_app.command("generate")
def fleet_generate(
    out: Annotated[Path, typer.Option(help="YAML file to write")] = Path("fleet.yaml"),
    enterprises: int = 3,
    sites_per_enterprise: int = 1,
    meters_per_site: int = 5,
    vpp_resources: int = 0,
    seed: int = 42,
    interval_s: int = 60,
    payload_format: Annotated[
        str, typer.Option("--format", help="json-batch, json-single or sparkplug")
    ] = "json-batch",
    max_devices_per_gateway: int = 200,
    vpp_buildings: Annotated[
        int, typer.Option(help="campus feeders that join the VPP as building loads (shed in dr_events)")
    ] = 0,
) -> None:
    """Write a fleet description generated from a few numbers (edit it, then `simulate --fleet`)."""
    spec = _generated_fleet(
        enterprises=enterprises, sites_per_enterprise=sites_per_enterprise, meters_per_site=meters_per_site,
        vpp_resources=vpp_resources, seed=seed, interval_s=interval_s, payload_format=payload_format,
        max_devices_per_gateway=max_devices_per_gateway, vpp_buildings=vpp_buildings,
    )  # fmt: skip
    spec.dump(out)
    gateways = sum(1 for _ in spec.gateways())
    console.print(
        f"wrote {out}: {len(spec.enterprises)} enterprises, {gateways} gateways, {spec.device_count} devices"
    )


@app.command()
def simulate(
    fleet: Annotated[
        Path | None, typer.Option(help="fleet description (YAML); else one is generated")
    ] = None,
    enterprises: int = 3,
    sites_per_enterprise: int = 1,
    meters_per_site: int = 5,
    vpp_resources: int = 0,
    seed: int = 42,
    interval_s: int = 60,
    payload_format: Annotated[
        str, typer.Option("--format", help="json-batch, json-single or sparkplug")
    ] = "json-batch",
    mode: Annotated[str, typer.Option(help="realtime, accelerated or backfill")] = "realtime",
    start: Annotated[
        datetime | None, typer.Option(help="simulated start (UTC); default: now, or duration ago")
    ] = None,
    duration: Annotated[str | None, typer.Option(help="e.g. 90s, 15m, 6h, 30d; realtime: forever")] = None,
    speed: Annotated[float, typer.Option(help="accelerated: simulated seconds per second")] = 1440.0,
    rate: Annotated[float | None, typer.Option(help="cap on readings per second")] = None,
    qos: Annotated[int, typer.Option(min=0, max=1)] = 1,
    batch_ticks: Annotated[int, typer.Option(min=1, help="reading instants per gateway message")] = 1,
    faults: Annotated[str, typer.Option(help="e.g. duplicate=0.01,offline=0.2 (see docs/simulator.md)")] = "",
    all_faults: Annotated[
        float | None, typer.Option(help="every fault at this multiple of a rough day")
    ] = None,
    truth: Annotated[Path | None, typer.Option(help="directory for the ground truth")] = None,
    api_url: Annotated[str | None, typer.Option(help="API to register the fleet with")] = None,
    admin_key: Annotated[str | None, typer.Option(envvar="METERFLOW_BOOTSTRAP_ADMIN_KEY")] = None,
    progress: Annotated[bool | None, typer.Option(help="progress bar (default: when on a terminal)")] = None,
) -> None:
    """Register a simulated fleet through the API and publish its readings over MQTT as its gateways."""
    import signal
    import threading

    from simulators.faults import FaultConfig, arm_rollovers
    from simulators.publisher import ExchangeReporter, register_fleet, simulate_over_mqtt
    from simulators.runner import RunOptions
    from simulators.spec import FleetSpec

    settings = _settings()
    spec = (
        FleetSpec.load(fleet)
        if fleet
        else _generated_fleet(
            enterprises=enterprises, sites_per_enterprise=sites_per_enterprise, meters_per_site=meters_per_site,
            vpp_resources=vpp_resources, seed=seed, interval_s=interval_s, payload_format=payload_format,
        )
    )  # fmt: skip
    fault_config = FaultConfig.all(all_faults) if all_faults is not None else FaultConfig()
    if faults:
        fault_config = fault_config.model_copy(
            update=FaultConfig.parse(faults).model_dump(exclude_defaults=True)
        )
    spec, armed = arm_rollovers(spec, fault_config.rollover, spec.seed)
    if mode not in ("realtime", "accelerated", "backfill"):
        raise typer.BadParameter("mode must be realtime, accelerated or backfill")
    options = RunOptions(
        mode=mode,  # type: ignore[arg-type]
        start_ms=int(start.replace(tzinfo=start.tzinfo or UTC).timestamp() * 1000) if start else None,
        duration_s=_duration_s(duration) if duration else (None if mode == "realtime" else 86_400.0),
        speed=speed,
        max_readings_per_s=rate,
        batch_ticks=batch_ticks,
        faults=fault_config,
        truth_dir=truth,
        max_payload_bytes=settings.ingest.max_payload_bytes,
        progress=progress if progress is not None else console.is_terminal,
    )
    gateways = sum(1 for _ in spec.gateways())
    console.print(
        f"fleet: {len(spec.enterprises)} enterprises, {gateways} gateways, {spec.device_count} devices"
    )
    url = api_url or f"http://{settings.api.host}:{settings.api.port}"
    key = admin_key or _admin_key(settings)
    creds = register_fleet(url, key, spec)
    console.print(f"registered through {url}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    exchanges = ExchangeReporter(url, key)
    try:
        result, outcome = simulate_over_mqtt(
            spec, options, host=settings.mqtt.host, port=settings.mqtt.port, creds=creds, qos=qos, stop=stop,
            armed_rollovers=armed, on_exchange=exchanges,
        )  # fmt: skip
    finally:
        exchanges.close()
    _print_simulation_summary(result, outcome)
    if outcome.unanswered:
        raise typer.Exit(1)


def _print_simulation_summary(result: RunResult, outcome: MqttOutcome) -> None:
    table = Table(title="simulation", show_header=False)
    window = result.window
    end = "open" if window.end_ms is None else _iso_ms(window.end_ms)
    table.add_row("simulated", f"{_iso_ms(window.start_ms)} .. {end}")
    table.add_row("messages", f"{result.messages:,}")
    table.add_row("readings", f"{result.readings:,} ({result.true_readings:,} distinct)")
    table.add_row("wall time", f"{result.wall_s:.1f} s ({result.readings_per_s:,.0f} readings/s)")
    table.add_row(
        "broker", f"{outcome.acked:,} acked, {outcome.refused:,} refused, {outcome.unanswered:,} unanswered"
    )
    if result.manifest is not None:
        expected = result.manifest["expected"]
        table.add_row(
            "expected dead letters",
            ", ".join(f"{k}={v}" for k, v in expected["dead_letters"].items()) or "none",
        )
        table.add_row("expected refusals", str(expected["broker_refused"]))
    console.print(table)


def _iso_ms(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _admin_key(settings: Settings) -> str:
    from deploy.local.stack import admin_key

    return admin_key(settings)


# --- grid intensity ----------------------------------------------------------------------------------


@intensity_app.command("serve")
def intensity_serve() -> None:
    """Run the intensity service (grid intensity points from Kafka into the database) until SIGTERM."""
    from prometheus_client import start_http_server

    from processing.intensity import IntensityService

    settings = _settings()
    if settings.intensity.metrics_port:
        start_http_server(settings.intensity.metrics_port, addr="127.0.0.1")
    asyncio.run(IntensityService(settings).run())


def _publish_parsed(parsed: ParsedPoints, out: Path | None, progress: bool) -> None:
    for where, why in parsed.rejected:
        console.print(f"[yellow]rejected[/] {where}: {why}")
    if out is not None:
        out.write_text("".join(p.encode().decode() + "\n" for p in parsed.points), encoding="utf-8")
        _step(f"wrote {len(parsed.points):,} points to {out}")
    elif parsed.points:
        from ingest.intensity import publish

        settings = _settings()
        sent = asyncio.run(publish(settings, parsed.points, progress=progress))
        _step(f"published {sent:,} points to {settings.kafka.intensity_topic}")
    if parsed.rejected:
        console.print(f"[bold red]{len(parsed.rejected):,} rows rejected[/] (not published)")
        raise typer.Exit(2)


OutOption = Annotated[
    Path | None, typer.Option("--out", help="write the points as JSON lines here; publish nothing")
]


@intensity_app.command("publish")
def intensity_publish(
    path: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="points or a saved provider response")
    ],
    fmt: Annotated[
        str, typer.Option("--format", help="auto, jsonl, csv, electricitymaps or watttime")
    ] = "auto",
    zone: Annotated[str | None, typer.Option(help="zone of points that name none")] = None,
    source: Annotated[str | None, typer.Option(help="source of points that name none")] = None,
    forecast: Annotated[
        bool | None, typer.Option("--forecast/--no-forecast", help="mark every point")
    ] = None,
    out: OutOption = None,
    progress: Annotated[bool, typer.Option(help="progress bar")] = True,
) -> None:
    """Publish grid intensity points to Kafka (formats: ingest/intensity.py, docs/carbon-methodology.md)."""
    from ingest.intensity import Defaults, read_points

    try:
        parsed = read_points(path, fmt, Defaults(zone=zone, source=source, forecast=forecast))
    except ValueError as exc:
        console.print(f"[bold red]{path}:[/] {exc}")
        raise typer.Exit(1) from exc
    _publish_parsed(parsed, out, progress)


@intensity_app.command("fetch")
def intensity_fetch(
    provider: Annotated[str, typer.Argument(help="electricitymaps or watttime")],
    zone: Annotated[list[str], typer.Option(help="zone (Electricity Maps) or region (WattTime); repeat")],
    what: Annotated[
        list[str] | None,
        typer.Option(
            help="electricitymaps: latest, history, forecast; watttime: historical, forecast (repeat)"
        ),
    ] = None,
    signal: Annotated[
        str, typer.Option(help="WattTime: co2_moer (marginal) or co2_aoer (average)")
    ] = "co2_moer",
    basis: Annotated[str, typer.Option(help="Electricity Maps: direct or lifecycle")] = "direct",
    every: Annotated[
        str | None, typer.Option(help="fetch again this often (e.g. 15m, 1h) until SIGTERM")
    ] = None,
    out: OutOption = None,
) -> None:
    """Fetch grid intensity from Electricity Maps or WattTime and publish it (credentials from
    METERFLOW_INTENSITY__*). With --every it keeps polling; a failed round is logged and retried."""
    from ingest.intensity_fetch import KINDS, check_request, fetch_once
    from meterflow.contract import EmissionBasis

    if provider not in KINDS:
        raise typer.BadParameter(f"provider must be one of {', '.join(KINDS)}")
    if signal not in ("co2_moer", "co2_aoer"):
        raise typer.BadParameter("signal must be co2_moer or co2_aoer")
    if basis not in ("direct", "lifecycle"):
        raise typer.BadParameter("basis must be direct or lifecycle")
    settings = _settings()
    kinds = what or (["history", "forecast"] if provider == "electricitymaps" else ["historical", "forecast"])
    source = cast("Provider", provider)
    wanted_signal = cast("WattTimeSignal", signal)
    try:
        check_request(settings.intensity, source, kinds)
    except ValueError as exc:
        console.print(f"[bold red]{provider}:[/] {exc}")
        raise typer.Exit(1) from exc

    async def one_round() -> ParsedPoints:
        return await fetch_once(settings.intensity, source, zone, kinds, wanted_signal, EmissionBasis(basis))

    if every is None:
        _publish_parsed(asyncio.run(one_round()), out, progress=False)
    else:
        asyncio.run(_poll_intensity(settings, one_round, _duration_s(every)))


async def _poll_intensity(
    settings: Settings, one_round: Callable[[], Awaitable[ParsedPoints]], period_s: float
) -> None:
    import signal as signals

    from ingest.intensity import publish

    stop = asyncio.Event()
    for sig in (signals.SIGINT, signals.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    while not stop.is_set():
        try:
            parsed = await one_round()
            for where, why in parsed.rejected:
                log.warning("intensity not fetched or rejected (%s): %s", where, why)
            await publish(settings, parsed.points, progress=False)
        except Exception:  # a poller outlives any one bad round: the next one may work
            log.exception("intensity round failed, trying again in %.0f s", period_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period_s)


@intensity_app.command("estimate")
def intensity_estimate(
    mix: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="CSV: ts, duration_s, MWh per mode")
    ],
    zone: Annotated[str, typer.Option(help="the zone the mix is of (e.g. jiangsu, CN-JS)")],
    basis: Annotated[
        list[str] | None, typer.Option(help="lifecycle and/or direct (repeat); default both")
    ] = None,
    out: OutOption = None,
    progress: Annotated[bool, typer.Option(help="progress bar")] = True,
) -> None:
    """Estimate intensity from a generation mix with Electricity Maps' mode factors and publish it."""
    from ingest.intensity import estimate_from_mix
    from meterflow.contract import EmissionBasis

    try:
        bases = [EmissionBasis(b) for b in basis or [b.value for b in EmissionBasis]]
        parsed = estimate_from_mix(mix.read_text(encoding="utf-8"), zone, bases)
    except ValueError as exc:
        console.print(f"[bold red]{mix}:[/] {exc}")
        raise typer.Exit(1) from exc
    _publish_parsed(parsed, out, progress)


@intensity_app.command("simulate-mix")
def intensity_simulate_mix(
    out: Annotated[Path, typer.Option("--out", help="CSV to write")],
    start: Annotated[str, typer.Option(help="first hour, RFC 3339 (default: yesterday 00:00 UTC)")] = "",
    hours: Annotated[int, typer.Option(min=1, help="hours of mix")] = 72,
    seed: Annotated[int, typer.Option(help="random seed")] = 7,
) -> None:
    """Write a simulated hourly generation mix (a coal-heavy eastern province) for `intensity estimate`."""
    from simulators.gridmix import mix_csv, mix_rows

    try:
        first = (
            datetime.fromisoformat(start)
            if start
            else datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
        )
        rows = mix_rows(first, hours, seed=seed)
    except ValueError as exc:
        console.print(f"[bold red]--start:[/] {exc}")
        raise typer.Exit(1) from exc
    out.write_text(mix_csv(rows), encoding="utf-8")
    _step(f"wrote {len(rows)} hours of simulated generation mix to {out}")


# --- the whole pipeline ----------------------------------------------------------------------------


@app.command()
def run(
    enterprises: Annotated[int, typer.Option(help="simulated enterprises")] = 3,
    vpp_resources: Annotated[int, typer.Option(help="simulated VPP resources")] = 40,
    interval_s: Annotated[int, typer.Option(help="seconds between readings of each device")] = 15,
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
    services = (
        ("api", ["api"]),
        ("collector", ["collector"]),
        ("processor", ["processor"]),
        ("vpp", ["vpp"]),
        ("intensity", ["intensity", "serve"]),
    )
    for name, argv in services:
        pid, log_file = stack.start_app(settings, stack.AppProcess(name, argv))
        _step(f"{name} running (pid {pid}), log {log_file}")
    _wait_ready(base)
    zones = _publish_simulated_intensity(settings, enterprises, vpp_resources, interval_s)
    _step(f"estimated grid intensity published for {', '.join(zones)} (simulated generation mix)")
    sim = ["simulate", "--enterprises", str(enterprises), "--vpp-resources", str(vpp_resources)]
    sim += ["--interval-s", str(interval_s), "--mode", "realtime", "--no-progress"]
    pid, log_file = stack.start_app(settings, stack.AppProcess("simulator", sim))
    _step(f"simulated fleet publishing (pid {pid}), log {log_file}")
    now = datetime.now(UTC)
    window = f"start={now - timedelta(hours=1):%Y-%m-%dT%H:%M:%SZ}&end={now + timedelta(days=1):%Y-%m-%dT%H:%M:%SZ}"
    key_source = "METERFLOW_BOOTSTRAP_ADMIN_KEY" if settings.bootstrap_admin_key else ".stack/app/admin-key"
    console.print(
        f"\n[bold green]meterflow is running.[/]\n"
        f"  API        {base}/docs  (admin key: {key_source})\n"
        f"  dashboard  {base}/dashboard/  (asks for the admin key once)\n"
        f'  readings   curl -H "Authorization: Bearer $(cat .stack/app/admin-key)" '
        f"'{base}/v1/devices/s00-main/readings?tenant=factory-000&{window}'\n"
        f"  status     meterflow stack status\n"
        f"  stop       make down   (or: meterflow stack down)\n",
        soft_wrap=True,
    )


def _publish_simulated_intensity(
    settings: Settings, enterprises: int, vpp_resources: int, interval_s: int
) -> list[str]:
    """Three days of estimated intensity around now for the provinces of the fleet `run` simulates."""
    from ingest.intensity import estimate_from_mix, publish
    from meterflow.contract import EmissionBasis, now_ms
    from simulators.gridmix import mix_csv, mix_rows

    spec = _generated_fleet(enterprises=enterprises, vpp_resources=vpp_resources, interval_s=interval_s)
    zones = sorted({site.province for e in spec.enterprises for site in e.sites if site.province})
    first = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    now = now_ms()
    points = []
    for seed, zone in enumerate(zones):
        mix = mix_csv(mix_rows(first, 72, seed=seed))
        # Hours not begun yet are forecasts: an actual estimate for them, published later, replaces them.
        points += [
            p.model_copy(update={"is_forecast": p.ts > now})
            for p in estimate_from_mix(mix, zone, list(EmissionBasis)).points
        ]
    asyncio.run(publish(settings, points, progress=False))
    return zones


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


@dlq_app.command("replay")
def dlq_replay(
    reason: Annotated[
        list[str] | None,
        typer.Option(
            help="reasons to replay (repeat); default: unknown_device, tenant_mismatch, unknown_metric"
        ),
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="only this tenant's dead letters")] = None,
    from_beginning: Annotated[
        bool, typer.Option(help="reconsider letters already replayed or skipped")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="report what would be replayed; produce and commit nothing")
    ] = False,
) -> None:
    """Send dead-lettered readings that now pass (e.g. after registering the device) to the pipeline."""
    from ingest.replay import REPLAYABLE, replay

    settings = _settings()
    reasons = set(reason or [r.value for r in REPLAYABLE])
    summary = asyncio.run(
        replay(settings, reasons=reasons, tenant=tenant, from_beginning=from_beginning, dry_run=dry_run)
    )
    table = Table(title="dead-letter replay" + (" (dry run)" if dry_run else ""), show_header=False)
    table.add_row("letters read", f"{summary.letters:,}")
    table.add_row("matching reasons " + ", ".join(sorted(reasons)), f"{summary.considered:,}")
    table.add_row("readings replayed", f"{summary.replayed_readings:,}")
    table.add_row(
        "still rejected", ", ".join(f"{k}={v}" for k, v in summary.still_rejected.items()) or "none"
    )
    table.add_row(
        "not replayable", ", ".join(f"{k}={v}" for k, v in summary.not_replayable.items()) or "none"
    )
    console.print(table)


# --- audit and retention -------------------------------------------------------------------------------


@audit_app.command("verify")
def audit_verify(
    topic: Annotated[str | None, typer.Option(help="only this Kafka topic's chains")] = None,
    day: Annotated[
        datetime | None, typer.Option(formats=["%Y-%m-%d"], help="only this UTC day (YYYY-MM-DD)")
    ] = None,
    partition: Annotated[int | None, typer.Option(help="only this Kafka partition's chains")] = None,
    allow_unaudited: Annotated[
        bool, typer.Option(help="rows without an audit batch (e.g. from before the chain) do not fail")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Recompute the audit chain from the stored readings; exit 1 if any row or link was tampered with."""
    import psycopg

    from processing.audit import verify

    settings = _settings()

    async def run() -> VerifyReport:
        async with await psycopg.AsyncConnection.connect(settings.db.conninfo()) as conn:
            return await verify(conn, topic=topic, day=day.date() if day else None, partition=partition)

    report = asyncio.run(run())
    if report.broken:
        broken = Table("topic", "partition", "day", "seq", "batch", "rows recorded", "rows found", "problems")
        for b in report.broken:
            broken.add_row(
                b.topic,
                str(b.partition),
                b.day.isoformat(),
                str(b.seq),
                str(b.audit_batch),
                f"{b.row_count:,}",
                f"{b.rows_found:,}",
                ", ".join(p.value for p in b.problems),
            )
        console.print(broken)
    strays = Table("day", "rows without audit batch", "rows whose batch has no entry that day")
    for stray_day in sorted(report.unaudited_rows.keys() | report.unchained_rows.keys()):
        strays.add_row(
            stray_day.isoformat(),
            f"{report.unaudited_rows.get(stray_day, 0):,}",
            f"{report.unchained_rows.get(stray_day, 0):,}",
        )
    if strays.row_count:
        console.print(strays)
    failed = bool(report.broken or report.unchained_rows or (report.unaudited_rows and not allow_unaudited))
    verdict = "[bold red]FAILED[/]" if failed else "[bold green]OK[/]"
    _report(
        f"audit chain {verdict}: {report.entries_checked:,} entries and {report.rows_checked:,} rows checked, "
        f"{len(report.broken):,} entries broken, {report.retired_skipped:,} retired entries skipped",
        report.as_dict(),
        as_json,
    )
    if failed:
        raise typer.Exit(1)


@retention_app.command("apply")
def retention_apply(as_json: JsonFlag = False) -> None:
    """Drop raw readings older than METERFLOW_PROCESSING__RAW_RETENTION_DAYS; retire their audit entries."""
    import psycopg

    from processing.retention import RetentionResult, apply_retention

    settings = _settings()

    async def run() -> RetentionResult:
        async with await psycopg.AsyncConnection.connect(settings.db.conninfo()) as conn:
            return await apply_retention(conn, settings)

    result = asyncio.run(run())
    if result.cutoff is None:
        summary = "no retention configured (processing.raw_retention_days): every raw reading is kept"
    else:
        summary = (
            f"retention ({result.mode}) before {result.cutoff.isoformat()}: "
            f"{len(result.dropped_chunks):,} chunks dropped, {result.retired_entries:,} audit entries retired"
        )
    _report(summary, result.as_dict(), as_json)


# --- benchmarks --------------------------------------------------------------------------------------

JsonFlag = Annotated[bool, typer.Option("--json", help="last line is one JSON object")]


def _report(summary: str, result: dict[str, object], as_json: bool) -> None:
    """The human summary, then (with --json) the result as the last line of standard output."""
    console.print(summary)
    if as_json:
        typer.echo(orjson.dumps(result).decode())


@bench_app.command("processor")
def bench_processor(
    readings: Annotated[int, typer.Option(help="readings to produce and process")] = 1_000_000,
    devices: Annotated[int, typer.Option(help="meters, each with an energy register and power")] = 2000,
    processors: Annotated[
        int,
        typer.Option(
            help="processor processes in one consumer group (default: one per core of a 2-core box)"
        ),
    ] = 2,
    as_json: JsonFlag = False,
) -> None:
    """Kafka to committed rows through processor processes, beside a bare binary COPY of the same rows (needs the stack)."""
    from bench.processor import run_processor_bench

    settings = _settings()
    result = run_processor_bench(
        settings, n_readings=readings, n_devices=devices, processes=processors, tick=_step
    )
    _report(
        f"{processors} processor(s): {result['value']:,} readings/s ({result['readings']:,} readings, "
        f"full polls of {result['readings_per_poll']:,}); "
        f"bare COPY {result['peer_value']:,} readings/s; ratio {result['ratio']}; targets >= 150,000 and >= 0.4",
        result,
        as_json,
    )


@bench_app.command("simulator")
def bench_simulator(
    gateways: Annotated[int, typer.Option(help="gateways, one paho client each")] = 8,
    devices_per_gateway: int = 200,
    minutes: Annotated[int, typer.Option(help="simulated minutes to publish")] = 60,
    as_json: JsonFlag = False,
) -> None:
    """One simulator process publishing gateway batches (QoS 1) beside bare paho (needs Mosquitto)."""
    from bench.simulator import run_simulator_bench

    settings = _settings()
    result = run_simulator_bench(
        settings, gateways=gateways, devices_per_gateway=devices_per_gateway, minutes=minutes, tick=_step
    )
    _report(
        f"simulator {result['value']:,} readings/s ({result['readings']:,} readings, {result['messages']:,} "
        f"messages); bare paho {result['peer_value']:,} readings/s; ratio {result['ratio']}; target >= 50,000",
        result,
        as_json,
    )


@bench_app.command("ingest")
def bench_ingest(
    batch_readings: Annotated[
        int, typer.Option(help="readings sent in 100-reading gateway batches")
    ] = 1_500_000,
    singles: Annotated[
        int, typer.Option(help="single-reading messages, through the collector and to bare paho")
    ] = 150_000,
    profile: Annotated[
        Path | None, typer.Option(help="write a cProfile of the collector (its asyncio thread) here")
    ] = None,
    keep_topics: Annotated[bool, typer.Option(help="keep the run's Kafka topics")] = False,
    ignore_other_collectors: Annotated[
        bool, typer.Option(help="run beside other collectors (they ingest the bench's messages too)")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """One collector process, MQTT to Kafka-acknowledged, beside a bare paho subscriber (needs the stack)."""
    from bench.ingest import run_ingest_bench

    settings = _settings()
    result = run_ingest_bench(
        settings,
        batch_readings=batch_readings,
        singles=singles,
        profile=profile,
        keep_topics=keep_topics,
        ignore_other_collectors=ignore_other_collectors,
        tick=_step,
    )
    _report(
        f"gateway batches {result['batch_readings_per_s']:,} readings/s (target >= 100,000); "
        f"single-reading messages {result['value']:,} readings/s; bare paho {result['peer_value']:,} "
        f"readings/s; ratio {result['ratio']} (target >= 0.5)",
        result,
        as_json,
    )


@bench_app.command("kernel")
def bench_kernel(
    readings: Annotated[int, typer.Option(help="register reads in the large case")] = 10_000_000,
    devices: int = 10_000,
    batch: Annotated[int, typer.Option(help="rows per micro-batch")] = 1_000,
    batches: Annotated[int, typer.Option(help="micro-batches timed (the first of the readings)")] = 1_000,
    as_json: JsonFlag = False,
) -> None:
    """Registers into 1-minute buckets per device: numba kernels beside polars (one thread) and pandas."""
    from bench.kernel import run_kernel_bench

    result = run_kernel_bench(readings=readings, devices=devices, batch=batch, batches=batches, tick=_step)
    micro = cast("dict[str, object]", result["micro_batch"])
    _report(
        f"large: numba {result['value']:,} readings/s; polars {result['peer_value']:,}; pandas "
        f"{result['pandas_value']:,}; ratio {result['ratio']} (target >= 3). micro-batches of {batch:,}: numba "
        f"{micro['value']:,} readings/s; polars {micro['peer_value']:,}; pandas {micro['pandas_value']:,}; "
        f"ratio {micro['ratio']} (target >= 30)",
        result,
        as_json,
    )


@bench_app.command("vpp")
def bench_vpp(
    resources: Annotated[int, typer.Option(help="VPP resources recomputed")] = 100_000,
    vpps: int = 20,
    nodes: Annotated[int, typer.Option(help="topology nodes (feeders, transformers)")] = 2_000,
    as_json: JsonFlag = False,
) -> None:
    """VPP capacity of every resource (15/30/60 min, per VPP and node): numba kernel beside numpy vectorised."""
    from bench.vpp import run_vpp_bench

    result = run_vpp_bench(resources=resources, vpps=vpps, nodes=nodes, tick=_step)
    _report(
        f"{resources:,} resources recomputed in {result['value']} ms (numba); numpy vectorised "
        f"{result['peer_value']} ms; ratio {result['ratio']} (target < 100 ms)",
        result,
        as_json,
    )


@bench_app.command("api")
def bench_api(
    devices: Annotated[int, typer.Option(help="meters with 1-minute aggregates (10 sites)")] = 1000,
    days: Annotated[int, typer.Option(help="days of aggregates, from 2026-10-01 local")] = 30,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 2,
    pool_max: Annotated[int, typer.Option(help="database connections per worker")] = 8,
    # 4 already saturates this 2-core machine (about 830 requests/s); more connections only queue and
    # add their wait to every request's latency (8 gave the same throughput at a p99 of 32-72 ms).
    connections: Annotated[int, typer.Option(help="concurrent HTTP connections")] = 4,
    seconds: Annotated[float, typer.Option(help="seconds per route")] = 10.0,
    as_json: JsonFlag = False,
) -> None:
    """Query API routes under concurrent load (wrk, else httpx) beside /healthz and the route's SQL run
    directly with psycopg; loads its data set first if missing (needs the database)."""
    from bench.api import TARGET_P99_MS, TARGET_RPS, run_api_bench

    settings = _settings()
    result = run_api_bench(
        settings,
        devices=devices,
        days=days,
        workers=workers,
        pool_max=pool_max,
        connections=connections,
        seconds=seconds,
        tick=_step,
    )
    table = Table("route", "p50 ms", "p99 ms", "requests/s", "errors")
    for name, f in cast("dict[str, dict[str, float]]", result["routes"]).items():
        table.add_row(
            name, f"{f['p50_ms']:.2f}", f"{f['p99_ms']:.2f}", f"{f['rps']:,.0f}", f"{f['errors']:.0f}"
        )
    console.print(table)
    _report(
        f"one site, one day at 15 min: p99 {result['p99_ms']} ms (target <= {TARGET_P99_MS:g}), "
        f"{result['value']:,} requests/s (target >= {TARGET_RPS:g}); /healthz {result['peer_value']:,} "
        f"requests/s; ratio {result['ratio']}",
        result,
        as_json,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
