"""Settings for every meterflow process, read from environment variables prefixed ``METERFLOW_``.

Nested groups use ``__`` as delimiter, e.g. ``METERFLOW_KAFKA__BOOTSTRAP=127.0.0.1:19092``.
Build one ``Settings()`` at a process entry point and pass it down; there is no module-level instance,
so tests can construct their own.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True)


class MqttSettings(_Group):
    host: str = "127.0.0.1"
    port: int = 18830
    # Second listener: MQTT over TLS (1.2 minimum), same accounts and ACL. The local stack signs its
    # certificate with its own CA, <state_dir>/mosquitto/tls/ca.crt (deploy.local.tls.broker_files).
    tls_port: int = 18883
    # The collector's own broker account; gateways get theirs from the API.
    service_user: str = "meterflow-collector"
    service_password: SecretStr = SecretStr("meterflow-collector-dev")
    client_id: str = "meterflow-collector"
    qos: int = Field(default=1, ge=0, le=1)
    keepalive_s: int = 30
    # Mosquitto's per-client queue for the collector's persistent session: what it holds while Kafka is
    # down. Sized for a 5-minute outage at the ingest benchmark's rates with room to spare: single
    # readings at 25,000 messages/s are 7.5 M messages (~0.5 GB of payload); 100-reading batches at
    # 1,000 messages/s are 0.3 M messages (~1.5 GB). A message over either limit is dropped, logged by
    # the broker and counted in meterflow_broker_publish_messages{kind="dropped"}.
    max_queued_messages: int = 10_000_000
    max_queued_bytes: int = 4 * 1024**3
    max_inflight_messages: int = 1000


class KafkaSettings(_Group):
    bootstrap: str = "127.0.0.1:19092"
    controller_port: int = 19093
    heap: str = "768m"
    version: str = "3.9.1"
    scala_version: str = "2.13"
    readings_topic: str = "meterflow.readings.v1"
    dlq_topic: str = "meterflow.dlq.v1"
    # Grid carbon intensity per zone (low volume: a point per zone per hour or five minutes).
    intensity_topic: str = "meterflow.grid-intensity.v1"
    intensity_partitions: int = Field(default=1, ge=1)
    partitions: int = Field(default=6, ge=1)
    dlq_partitions: int = Field(default=1, ge=1)
    processor_group: str = "meterflow-processor"


class DbSettings(_Group):
    host: str = "127.0.0.1"
    port: int = 15432
    name: str = "meterflow"
    user: str = "meterflow"
    password: SecretStr = SecretStr("meterflow-dev")
    pool_max: int = 10

    def conninfo(self, *, dbname: str | None = None) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(
            host=self.host,
            port=self.port,
            dbname=dbname or self.name,
            user=self.user,
            password=self.password.get_secret_value(),
            application_name="meterflow",
        )

    def sqlalchemy_url(self) -> str:
        from sqlalchemy.engine import URL

        url = URL.create(
            "postgresql+psycopg",
            username=self.user,
            password=self.password.get_secret_value(),
            host=self.host,
            port=self.port,
            database=self.name,
        )
        return url.render_as_string(hide_password=False)


class ApiSettings(_Group):
    host: str = "127.0.0.1"
    port: int = 18000
    default_page_size: int = 1000
    max_page_size: int = 10_000
    # Token bucket per API key, per API process: sustained requests/s and burst size (429 beyond).
    rate_limit_per_s: float = Field(default=100.0, gt=0)
    rate_limit_burst: int = Field(default=200, ge=1)
    # A key's role and tenant are cached this long per process; a revocation made through another
    # process takes effect within it (the revoking process drops its cache entry at once).
    key_cache_s: float = Field(default=5.0, ge=0)
    # Load and carbon series: at most this many points per request ("range too large" beyond).
    max_points: int = Field(default=50_000, ge=1)
    # Carbon-efficiency grading: refuse to grade when fewer enterprises of the industry report.
    grading_min_peers: int = Field(default=5, ge=1)
    # YAML files replacing the packaged grading schemes and time-of-use calendars (api/data/*.yaml).
    grading_schemes_file: Path | None = None
    tou_calendars_file: Path | None = None


class IngestSettings(_Group):
    max_payload_bytes: int = 256 * 1024
    max_future_skew_s: int = 300
    # Messages held between MQTT receipt and Kafka acknowledgement; beyond it the collector stops
    # acknowledging so the broker keeps the rest.
    max_inflight: int = 5000
    # Dead letters keep the original payload up to the payload limit, so `meterflow dlq replay` can
    # send what was rejected once its cause is fixed (an oversized payload is cut and not replayable).
    dlq_payload_cap_bytes: int = 256 * 1024
    metrics_port: int = 19101
    # Metrics outside the canonical set: kept and counted ("keep"), or dead-lettered ("reject").
    unknown_metrics: Literal["keep", "reject"] = "keep"
    registry_refresh_s: float = 60.0
    # Readings stamped before this are dead-lettered (past_ts); see meterflow.contract.DEFAULT_MIN_TS_MS.
    min_ts: AwareDatetime = datetime(2000, 1, 1, tzinfo=UTC)
    # Plausible ranges replacing meterflow.contract.METRIC_RANGES for the metrics named, e.g.
    # METERFLOW_INGEST__METRIC_RANGES='{"power_kw": [-5e5, 5e5]}'; beyond them readings are out_of_range.
    metric_ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)
    # A device with a registered rated power refuses power readings beyond it times this factor. Wide:
    # spikes up to it are stored and flagged by the processor (plausibility_margin), not refused.
    rated_power_factor: float = Field(default=100.0, gt=1.0)
    # Dead-letter bytes a gateway may cause per minute (a token bucket of this size, refilled evenly).
    # Beyond it its dead letters are counted, not written, and one dlq_budget letter a minute says so:
    # a gateway with a broken clock or a hostile one cannot fill the dead-letter topic.
    dlq_budget_bytes_per_min: int = Field(default=8 * 1024 * 1024, gt=0)

    @field_validator("metric_ranges")
    @classmethod
    def _ranges_are_intervals(cls, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        # A NaN or reversed bound would refuse every reading of the metric.
        for metric, (low, high) in ranges.items():
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise ValueError(f"range of {metric!r} must be finite with low <= high, got [{low}, {high}]")
        return ranges


class ProcessingSettings(_Group):
    max_batch_records: int = 1000
    poll_timeout_ms: int = 500
    metrics_port: int = 19102
    # Register gaps up to this long are interpolated (estimated); longer ones are still pro-rated so that
    # bucket sums equal register deltas, but flagged substituted.
    max_interp_gap_s: int = Field(default=3600, gt=0)
    # A register advance above rated power x elapsed time x this margin is implausible (flagged, not
    # booked); instantaneous power beyond rated x margin is a spike.
    plausibility_margin: float = Field(default=1.5, gt=1.0)
    # Raw readings older than this many days are dropped (whole chunks) and their audit entries
    # retired. None keeps everything: carbon records must be kept for at least five years.
    raw_retention_days: int | None = Field(default=None, ge=1)
    # How often each processor applies that retention between polls (it is idempotent).
    retention_every_s: float = Field(default=3600.0, gt=0)


class VppSettings(_Group):
    """The vpp service (flexibility capacity) and demand-response evaluation."""

    # Its own consumer group on the readings topic: it reads every partition, beside the processors.
    group: str = "meterflow-vpp"
    poll_timeout_ms: int = Field(default=200, ge=1)
    # Capacity is recomputed after every poll that changed telemetry, and at least this often (staleness
    # moves with the clock alone).
    recompute_every_s: float = Field(default=1.0, gt=0)
    # Resource models and device ratings are reloaded this often.
    registry_refresh_s: float = Field(default=5.0, gt=0)
    # A resource silent for more than this many telemetry intervals is stale (reference notes 5.2).
    stale_factor: float = Field(default=3.0, gt=0)
    durations_min: tuple[int, ...] = (15, 30, 60)
    # Confidence per resource class: deliverable = computed flexibility x factor (nameplate is not derated).
    derate_battery: float = Field(default=0.95, gt=0, le=1)
    derate_pv: float = Field(default=0.8, gt=0, le=1)
    derate_ev_charger: float = Field(default=0.7, gt=0, le=1)
    derate_building_load: float = Field(default=0.6, gt=0, le=1)
    derate_base_station: float = Field(default=0.9, gt=0, le=1)
    metrics_port: int = 19103
    # Demand response: days are local days in this zone; a response is valid when delivered / committed
    # reaches this ratio (per event, overridable when the event is created).
    timezone: str = "Asia/Shanghai"
    dr_valid_ratio: float = Field(default=0.8, gt=0)
    # Baselines look this many days back for candidate days.
    dr_lookback_days: int = Field(default=45, ge=2)


class IntensitySettings(_Group):
    """The intensity service: grid carbon intensity points from Kafka into ``grid_intensity``."""

    group: str = "meterflow-intensity"
    poll_timeout_ms: int = Field(default=500, ge=1)
    max_batch_records: int = Field(default=5000, ge=1)
    metrics_port: int = 19104
    # `meterflow intensity fetch`: provider credentials and endpoints.
    electricitymaps_token: SecretStr | None = None
    electricitymaps_url: str = "https://api.electricitymaps.com/v3"
    watttime_username: str | None = None
    watttime_password: SecretStr | None = None
    watttime_url: str = "https://api.watttime.org"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="METERFLOW_",
        env_nested_delimiter="__",
        env_ignore_empty=True,
        frozen=True,
        extra="ignore",
    )

    state_dir: Path = Path(".stack")
    log_level: str = "INFO"
    log_json: bool = False
    # Contract: the first admin key comes from METERFLOW_BOOTSTRAP_ADMIN_KEY when set.
    bootstrap_admin_key: SecretStr | None = None
    mqtt: MqttSettings = MqttSettings()
    kafka: KafkaSettings = KafkaSettings()
    db: DbSettings = DbSettings()
    api: ApiSettings = ApiSettings()
    ingest: IngestSettings = IngestSettings()
    processing: ProcessingSettings = ProcessingSettings()
    vpp: VppSettings = VppSettings()
    intensity: IntensitySettings = IntensitySettings()

    @property
    def state_path(self) -> Path:
        return self.state_dir.resolve()
