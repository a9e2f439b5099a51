"""The collector's registry checks and the replay of dead letters, without a database: a device's
registration bounds its readings, and `meterflow dlq replay` reads the one-letter-per-message shape."""

from __future__ import annotations

import orjson

from ingest.payloads import Limits, Rejection, parse_message
from ingest.registry import Registry, check_ownership
from ingest.replay import ReplaySummary, _replay_one
from meterflow.contract import DeadLetterReason, TelemetryTopic, decode_record, encode_dead_letter

NOW = 1763712000000
TOPIC = "meterflow/v1/acme/gw-1/telemetry"
LIMITS = Limits(max_payload_bytes=256 * 1024, max_future_skew_ms=300_000)


def _registry(*devices: tuple[str, str, float | None, float | None]) -> Registry:
    registry = Registry("", rated_power_factor=100.0)
    registry._gateways = {"gw-1": "acme"}
    for row in devices:
        registry._add_device(row)
    return registry


def _check(registry: Registry, doc: object) -> tuple[list[tuple[str, str, float]], list[Rejection]]:
    parsed = parse_message(
        TelemetryTopic("acme", "gw-1", None), orjson.dumps(doc), received_ms=NOW, limits=LIMITS
    )
    checked, _ = check_ownership(parsed, "acme", "gw-1", registry, reject_unknown_metrics=False)
    rows = [(d.device, r.metric, r.value) for d in checked.accepted for r in d.readings]
    return rows, checked.rejected


def test_rated_power_and_register_max_bound_a_devices_readings() -> None:
    registry = _registry(("m-1", "acme", 50.0, 99_999.99), ("m-2", "acme", None, None))
    rows, rejected = _check(
        registry,
        {
            "m-1": [
                # 50 x rated is a spike the processor flags: kept. 101 x rated cannot be measured.
                {"ts": NOW, "values": {"power_kw": 2500.0, "energy_import_kwh": 99_999.0}},
                {"ts": NOW - 60_000, "values": {"power_kw": -5050.0, "energy_import_kwh": 100_000.0}},
            ],
            "m-2": [{"ts": NOW, "values": {"power_kw": 9e6, "energy_import_kwh": 5e9}}],
        },
    )
    assert sorted(rows) == [
        ("m-1", "energy_import_kwh", 99_999.0),
        ("m-1", "power_kw", 2500.0),
        ("m-2", "energy_import_kwh", 5e9),
        ("m-2", "power_kw", 9e6),
    ]
    assert [(r.reason, r.device, r.metric) for r in rejected] == [
        (DeadLetterReason.OUT_OF_RANGE, "m-1", "power_kw"),
        (DeadLetterReason.OUT_OF_RANGE, "m-1", "energy_import_kwh"),
    ]


def test_a_device_with_every_reading_out_of_its_bounds_produces_nothing() -> None:
    rows, rejected = _check(
        _registry(("m-1", "acme", 1.0, None)), {"m-1": [{"ts": NOW, "values": {"power_kw": 1e3}}]}
    )
    assert rows == [] and [r.reason for r in rejected] == [DeadLetterReason.OUT_OF_RANGE]


def _letter(payload: bytes, rejections: list[Rejection], *, truncate: bool = False) -> bytes:
    first = rejections[0]
    value = encode_dead_letter(
        reason=first.reason.value,
        detail=first.detail,
        payload=payload,
        cap=256 * 1024,
        received_ms=NOW,
        rejected=[r.entry() for r in rejections],
        topic=TOPIC,
        tenant="acme",
        gateway="gw-1",
        device=None,
    )
    if not truncate:
        return value
    letter = orjson.loads(value)
    letter["rejected"], letter["rejected_truncated"] = letter["rejected"][:1], True
    return orjson.dumps(letter)


def _replay(raw: bytes, registry: Registry, reasons: set[str]) -> tuple[list[str], ReplaySummary]:
    summary = ReplaySummary()
    sends = _replay_one(raw, summary, registry, LIMITS, reasons, "acme", False)
    return sorted(decode_record(value).device for _, value in sends), summary


BATCH = {
    "m-1": [{"ts": NOW, "values": {"power_kw": 1.0}}],
    "theirs": [{"ts": NOW, "values": {"power_kw": 2.0}}],
    "late": [{"ts": NOW, "values": {"power_kw": 3.0}}],
    "later": [{"ts": NOW, "values": {"power_kw": 4.0}}],
}
REJECTIONS = [
    Rejection(DeadLetterReason.TENANT_MISMATCH, "another tenant's", "theirs"),
    Rejection(DeadLetterReason.UNKNOWN_DEVICE, "not registered", "late"),
    Rejection(DeadLetterReason.UNKNOWN_DEVICE, "not registered", "later"),
]


def test_replay_sends_the_devices_a_letter_refused_for_the_reasons_asked() -> None:
    registry = _registry(
        ("m-1", "acme", None, None), ("theirs", "other", None, None), ("late", "acme", None, None)
    )
    raw = _letter(orjson.dumps(BATCH), REJECTIONS)
    sent, summary = _replay(raw, registry, {"unknown_device"})
    assert sent == ["late"]
    assert summary.still_rejected == {"unknown_device": 1}
    sent, summary = _replay(raw, registry, {"tenant_mismatch"})
    assert sent == [] and summary.still_rejected == {"tenant_mismatch": 1}
    assert _replay(raw, registry, {"unknown_metric"})[1].considered == 0


def test_replay_of_a_cut_list_sends_every_reading_that_now_passes() -> None:
    registry = _registry(
        ("m-1", "acme", None, None), ("late", "acme", None, None), ("later", "acme", None, None)
    )
    raw = _letter(orjson.dumps(BATCH), REJECTIONS, truncate=True)
    # The list names only "theirs"; the readings of "late" and "later" are found again all the same
    # (and "m-1"'s, which the processor stores once).
    assert _replay(raw, registry, {"unknown_device"})[0] == ["late", "later", "m-1"]


def test_replay_still_reads_version_1_letters() -> None:
    registry = _registry(("late", "acme", None, None))
    letter = {
        "v": 1,
        "reason": "unknown_device",
        "detail": "not registered",
        "topic": TOPIC,
        "tenant": "acme",
        "gateway": "gw-1",
        "device": "late",
        "received_ms": NOW,
        "payload": orjson.dumps(BATCH).decode(),
        "payload_encoding": "utf-8",
        "payload_bytes": 0,
        "payload_truncated": False,
    }
    assert _replay(orjson.dumps(letter), registry, {"unknown_device"})[0] == ["late"]


class _NoRows:
    async def fetchall(self) -> list[object]:
        return []

    async def fetchone(self) -> None:
        return None


class _EmptyDb:
    closed = False

    async def execute(self, query: str, params: object = None) -> _NoRows:
        return _NoRows()


async def test_fresh_unknown_ids_by_the_thousand_keep_the_miss_cache_bounded() -> None:
    """Ids are chosen by the sender: remembering every one of them grew the collector without limit."""
    registry = Registry("", max_misses=100)
    registry._conn = _EmptyDb()  # type: ignore[assignment]
    registry._gateways = {"gw-1": "acme"}
    for batch in range(50):
        await registry.look_up("acme", "gw-1", [f"fresh-{batch}-{i}" for i in range(100)])
    assert len(registry._misses) == 100
    assert ("acme", "fresh-49-99") in registry._misses
