"""Drive a simulation in one of three time modes and hand every publish to a sink.

- realtime: simulated time is wall time, from now on.
- accelerated: simulated time runs `speed` x faster, starting far enough in the past that it reaches
  now at the end (readings from the future would rightly be rejected).
- backfill: a past window pushed as fast as the sink takes it, optionally capped at a reading rate.

The sink is an MQTT publisher in production and a list in tests, so the same code path is tested.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from meterflow.contract import TOPIC_ROOT, now_ms
from simulators.encoding import GatewayEncoder, Publish
from simulators.engine import MINUTE_MS, Batch, MeterExchange, ReadingFaults, Simulation
from simulators.faults import FaultConfig, Outgoing, Scheduler
from simulators.spec import FleetSpec
from simulators.truth import TruthRecorder

log = logging.getLogger(__name__)

Mode = Literal["realtime", "accelerated", "backfill"]
LOG_EVERY_S = 60.0  # without a progress bar, a progress line this often
Sink = Callable[[int, str, bytes], None]


@dataclass(slots=True)
class RunOptions:
    mode: Mode = "backfill"
    start_ms: int | None = None
    duration_s: float | None = 3600.0
    speed: float = 1440.0
    max_readings_per_s: float | None = None
    faults: FaultConfig = field(default_factory=FaultConfig)
    truth_dir: Path | None = None
    max_payload_bytes: int = 256 * 1024
    progress: bool = False
    # Readings a gateway collects before it uploads: 1 sends every reading instant on its own, 5 with
    # 1-minute meters makes one message per device group every 5 minutes (several points per device).
    batch_ticks: int = 1
    # Benchmarks publish beside the contract's topics so that no collector ingests them.
    topic_root: str = TOPIC_ROOT


@dataclass(frozen=True, slots=True)
class Window:
    start_ms: int
    end_ms: int | None
    speed: float  # simulated seconds per wall second; inf = unpaced


def plan_window(options: RunOptions, wall_ms: int) -> Window:
    """Where simulated time starts and ends, and how fast it runs, for the chosen mode."""
    duration_ms = None if options.duration_s is None else int(options.duration_s * 1000)
    if options.mode == "realtime":
        start = options.start_ms if options.start_ms is not None else wall_ms - wall_ms % MINUTE_MS
        return Window(start, None if duration_ms is None else start + duration_ms, 1.0)
    if duration_ms is None:
        raise ValueError(f"{options.mode} mode needs a duration")
    if options.start_ms is not None:
        start = options.start_ms
    else:
        start = wall_ms - duration_ms
        start -= start % MINUTE_MS
    if start % MINUTE_MS:
        raise ValueError("the start must be on a minute boundary")
    speed = options.speed if options.mode == "accelerated" else math.inf
    return Window(start, start + duration_ms, speed)


@dataclass(slots=True)
class RunResult:
    window: Window
    ticks: int = 0
    messages: int = 0
    readings: int = 0
    true_readings: int = 0
    wall_s: float = 0.0
    manifest: dict[str, Any] | None = None

    @property
    def readings_per_s(self) -> float:
        return self.readings / self.wall_s if self.wall_s > 0 else 0.0


class _Uploads:
    """Gateways that upload every `ticks` reading instants: their batches are merged until then."""

    def __init__(self, ticks: int) -> None:
        if ticks < 1:
            raise ValueError("batch_ticks must be at least 1")
        self._ticks = ticks
        self._open: dict[int, tuple[Batch, int]] = {}

    def add(self, batch: Batch) -> list[Batch]:
        if self._ticks == 1:
            return [batch]
        held, count = self._open.get(batch.gateway, (None, 0))
        if held is None:
            held = Batch(batch.gateway, batch.ts_ms, {})
        for device, points in batch.points.items():
            held.points.setdefault(device, []).extend(points)
        held.ts_ms = batch.ts_ms
        if count + 1 < self._ticks:
            self._open[batch.gateway] = (held, count + 1)
            return []
        self._open.pop(batch.gateway, None)
        return [held]

    def flush(self) -> list[Batch]:
        ready = [held for held, _ in self._open.values()]
        self._open.clear()
        return ready


class _Pacer:
    """Holds the loop back to the mode's speed and the optional reading-rate cap."""

    def __init__(self, window: Window, max_rate: float | None, stop: threading.Event) -> None:
        self._window = window
        self._max_rate = max_rate
        self._stop = stop
        self._wall0 = time.monotonic()

    def wait(self, sim_ms: int, readings: int) -> None:
        targets = [0.0]
        if math.isfinite(self._window.speed):
            targets.append((sim_ms - self._window.start_ms) / 1000.0 / self._window.speed)
        if self._max_rate:
            targets.append(readings / self._max_rate)
        delay = self._wall0 + max(targets) - time.monotonic()
        if delay > 0:
            self._stop.wait(delay)


def run(
    spec: FleetSpec,
    options: RunOptions,
    sink: Sink,
    *,
    stop: threading.Event | None = None,
    on_start: Callable[[list[GatewayEncoder], int], None] | None = None,
    armed_rollovers: list[tuple[str, str]] | None = None,
    on_exchange: Callable[[MeterExchange], None] | None = None,
) -> RunResult:
    """Simulate the fleet over the planned window, sending every publish to `sink(gateway, topic,
    payload)`; writes ground truth when `options.truth_dir` is set. `on_exchange` hears of each meter
    exchange before any reading taken at or after it is published, as a site crew would report it.

    `spec` is the fleet as registered: register faults (see `faults.arm_rollovers`) are applied before
    registration, since a register's maximum is part of what meterflow is told about a meter."""
    stop = stop or threading.Event()
    wall = now_ms()
    window = plan_window(options, wall)
    f = options.faults
    sim = Simulation(
        spec,
        window.start_ms,
        faults=ReadingFaults(
            spike=f.spike, glitch=f.glitch, frozen=f.frozen, meter_exchange_per_day=f.meter_exchange
        ),
    )
    gateways = list(spec.gateways())
    encoders = [
        GatewayEncoder(e.tenant, g.gateway, sim.device_names, g.format, options.topic_root)
        for e, _, g in gateways
    ]
    scheduler = Scheduler(
        f,
        seed=spec.seed,
        tick_ms=sim.tick_ms,
        gateway_topics=[enc.batch_topic for enc in encoders],
        gateway_tenants=[e.tenant for e, _, _ in gateways],
        gateway_formats=[g.format for _, _, g in gateways],
        device_names=sim.device_names,
        max_payload_bytes=options.max_payload_bytes,
        wall_clock_ms=wall,
    )
    truth = TruthRecorder(sim, options.truth_dir) if options.truth_dir else None
    result = RunResult(window)
    if on_start:
        on_start(encoders, window.start_ms)

    def send(out: Outgoing) -> None:
        publishes: list[Publish]
        if out.kind == "batch" and out.batch is not None:
            publishes = encoders[out.gateway].encode(out.batch, historical=out.historical)
            result.readings += out.batch.reading_count
        elif out.topic is not None and out.payload is not None:
            publishes = [(out.topic, out.payload)]
        else:
            raise ValueError(f"nothing to publish in {out}")
        for topic, payload in publishes:
            sink(out.gateway, topic, payload)
        result.messages += len(publishes)

    pacer = _Pacer(window, options.max_readings_per_s, stop)
    uploads = _Uploads(options.batch_ticks)
    started = time.monotonic()
    total_ticks = None if window.end_ms is None else (window.end_ms - window.start_ms) // sim.tick_ms + 1
    with _ProgressBar(options.progress, total_ticks) as (progress, task):
        last_update = 0.0
        reported_exchanges = 0
        for batches, snapshot, ts in sim.run(window.end_ms if window.end_ms is not None else 2**62):
            if truth is not None and snapshot is not None:
                truth.snapshot(ts, snapshot)
            if on_exchange is not None:
                while reported_exchanges < len(sim.log.exchanges):
                    on_exchange(sim.log.exchanges[reported_exchanges])
                    reported_exchanges += 1
            for batch in batches:
                result.true_readings += batch.reading_count
                for ready in uploads.add(batch):
                    scheduler.submit(ready)
            pacer.wait(ts, result.readings)
            for out in scheduler.due(ts):
                send(out)
            result.ticks += 1
            now = time.monotonic()
            if progress is not None and now - last_update > 0.25:
                last_update = now
                _update(progress, task, result, ts, now - started)
            elif progress is None and now - last_update > LOG_EVERY_S:
                last_update = now
                log.info(
                    "simulated to %s: %d readings in %d messages (%.0f readings/s), %d delayed by faults",
                    _iso(ts), result.readings, result.messages, result.readings / max(now - started, 1e-9),
                    scheduler.pending,
                )  # fmt: skip
            if stop.is_set():
                log.info("stop requested: flushing %d delayed messages", scheduler.pending)
                break
        for ready in uploads.flush():
            scheduler.submit(ready)
        for out in scheduler.drain():
            send(out)
        result.wall_s = time.monotonic() - started
        if progress is not None:
            _update(progress, task, result, sim.ts_ms - sim.tick_ms, result.wall_s)
    if truth is not None:
        result.manifest = truth.finish(
            faults=f,
            expected=scheduler.expected,
            fault_log=sim.log,
            armed_rollovers=armed_rollovers or [],
            published={
                "messages": result.messages,
                "readings": result.readings,
                "true_readings": result.true_readings,
            },
        )
    return result


class _ProgressBar:
    """A rich progress bar with live rate when asked for, else nothing (logs carry the figures)."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self._progress = (
            Progress(
                TextColumn("[bold]simulating"),
                BarColumn(),
                TextColumn("{task.fields[sim]}"),
                TextColumn("{task.fields[readings]:>12,} readings"),
                TextColumn("{task.fields[rate]:>9,.0f}/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            if enabled
            else None
        )
        self._total = total

    def __enter__(self) -> tuple[Progress | None, Any]:
        if self._progress is None:
            return None, None
        self._progress.start()
        return self._progress, self._progress.add_task("sim", total=self._total, sim="", readings=0, rate=0.0)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _iso(ts_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts_ms / 1000))


def _update(progress: Progress, task: Any, result: RunResult, sim_ms: int, elapsed_s: float) -> None:
    progress.update(
        task,
        completed=result.ticks,
        sim=_iso(sim_ms),
        readings=result.readings,
        rate=result.readings / elapsed_s if elapsed_s > 0 else 0.0,
    )
