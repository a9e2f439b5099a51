"""The three services of the local stack: configuration, start, health, stop.

Each service owns ``<state>/<name>/`` with its data dir, generated config, ``<name>.pid`` and
``<name>.log``. Starting a healthy service again does nothing, so ``stack up`` is idempotent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import socket
import subprocess
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from deploy.local import bootstrap, proc, tls
from meterflow import brokerauth
from meterflow.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    port: int
    pid: int | None
    healthy: bool
    detail: str
    log_file: Path


class Service(ABC):
    name: str
    run_as: str | None = None

    def __init__(self, settings: Settings, cache_dir: Path) -> None:
        self.settings = settings
        self.cache_dir = cache_dir
        self.home = settings.state_path / self.name
        self.pid_file = self.home / f"{self.name}.pid"
        self.log_file = self.home / f"{self.name}.log"

    @property
    @abstractmethod
    def port(self) -> int: ...

    @abstractmethod
    def configure(self) -> None:
        """Write config and initialise data once; safe to call on every start."""

    @abstractmethod
    def launch(self) -> None: ...

    @abstractmethod
    def check(self) -> str:
        """Raise when unhealthy; return a short detail when healthy."""

    def after_healthy(self) -> None:  # noqa: B027 - an optional hook; most services need no provisioning
        """Post-start provisioning (roles, topics); idempotent."""

    def pid(self) -> int | None:
        return proc.running_pid(self.pid_file)

    def health(self) -> tuple[bool, str]:
        try:
            return True, self.check()
        except Exception as exc:  # noqa: BLE001 - any failure of a probe means "not healthy", with its reason
            return False, str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if self.pid() is not None:
            return
        _ensure_port_free(self.port, self.name)
        self.configure()
        self.launch()

    def wait_healthy(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        detail = ""
        while time.monotonic() < deadline:
            if self.pid() is None:
                raise RuntimeError(
                    f"{self.name} exited during start-up; see {self.log_file}:\n{_tail(self.log_file)}"
                )
            ok, detail = self.health()
            if ok:
                return detail
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not healthy after {timeout_s:.0f} s ({detail}); see {self.log_file}")

    def stop(self) -> bool:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        proc.stop_pid(pid, timeout_s=60)
        self.pid_file.unlink(missing_ok=True)
        return True

    def status(self) -> ServiceStatus:
        pid = self.pid()
        healthy, detail = self.health() if pid is not None else (False, "stopped")
        return ServiceStatus(self.name, self.port, pid, healthy, detail, self.log_file)


def _ensure_port_free(port: int, name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(
                f"port {port} for {name} is taken by another process; stop it or choose another port "
                "with the matching METERFLOW_*__PORT setting"
            )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# --- Mosquitto ---------------------------------------------------------------------------------


class Mosquitto(Service):
    name = "mosquitto"

    @property
    def port(self) -> int:
        return self.settings.mqtt.port

    @property
    def passwd_file(self) -> Path:
        return self.home / "passwd"

    @property
    def acl_file(self) -> Path:
        return self.home / "acl"

    @property
    def conf_file(self) -> Path:
        return self.home / "mosquitto.conf"

    @property
    def fingerprint_file(self) -> Path:
        """What the running broker was started with: see `config_changed`."""
        return self.home / "mosquitto.conf.sha256"

    @property
    def tls_files(self) -> tls.TlsFiles:
        return tls.broker_files(self.settings)

    def service_accounts(self) -> list[brokerauth.BrokerAccount]:
        mqtt = self.settings.mqtt
        return [
            brokerauth.service_account(
                self.passwd_file, mqtt.service_user, mqtt.service_password.get_secret_value()
            )
        ]

    def start(self) -> None:
        if self.pid() is None:
            # The base class checks the plain port only; the TLS listener needs its own free.
            _ensure_port_free(self.settings.mqtt.tls_port, f"{self.name} (TLS)")
        super().start()

    def config_changed(self) -> bool:
        """True when the running broker was started with another config or certificate than `configure`
        would give it now (renewing an expiring certificate is such a change).

        Mosquitto rereads only its password file and ACL on SIGHUP; listeners and certificates need a
        restart. A broker started before fingerprints were kept counts as changed.
        """
        tls.ensure(self.tls_files)
        try:
            started_with = self.fingerprint_file.read_text().strip()
        except FileNotFoundError:
            return True
        return started_with != self._fingerprint(self._render_conf())

    def configure(self) -> None:
        data = self.home / "data"
        data.mkdir(parents=True, exist_ok=True)
        gateways = load_gateway_accounts(self.settings)
        brokerauth.sync(
            passwd_file=self.passwd_file,
            acl_file=self.acl_file,
            pid_file=None,
            service=self.service_accounts(),
            gateways=gateways,
        )
        tls.ensure(self.tls_files)
        conf = self._render_conf()
        self.conf_file.write_text(conf)
        self.fingerprint_file.write_text(self._fingerprint(conf) + "\n")
        if os.geteuid() == 0:
            # Keys included: Mosquitto 2 reads its certificate and key only after dropping to this user.
            proc.chown_tree(self.home, "mosquitto")

    def _render_conf(self) -> str:
        mqtt = self.settings.mqtt
        data = self.home / "data"
        certs = self.tls_files
        conf = f"""# Generated by `meterflow stack up`; edit settings, not this file.
per_listener_settings false
allow_anonymous false
password_file {self.passwd_file}
acl_file {self.acl_file}
persistence true
persistence_location {data}/
autosave_interval 30
log_dest stdout
log_type error
log_type warning
log_type notice
log_type information
log_timestamp_format %Y-%m-%dT%H:%M:%S
connection_messages true
# Defaults (1000 messages) silently drop QoS 1 messages for a lagging persistent subscriber.
max_queued_messages {mqtt.max_queued_messages}
max_queued_bytes {mqtt.max_queued_bytes}
max_inflight_messages {mqtt.max_inflight_messages}
set_tcp_nodelay true
listener {mqtt.port} 127.0.0.1
protocol mqtt
# Same accounts and ACL as the plain listener: per_listener_settings is false.
listener {mqtt.tls_port} 127.0.0.1
protocol mqtt
cafile {certs.ca_cert}
certfile {certs.server_cert}
keyfile {certs.server_key}
tls_version tlsv1.2
"""
        if os.geteuid() == 0:
            conf += "user mosquitto\n"
        return conf

    def _fingerprint(self, conf: str) -> str:
        digest = hashlib.sha256(conf.encode())
        certs = self.tls_files
        for path in (certs.ca_cert, certs.server_cert, certs.server_key):
            digest.update(path.read_bytes())
        return digest.hexdigest()

    def launch(self) -> None:
        proc.start_detached(
            ["mosquitto", "-c", str(self.conf_file)],
            log_file=self.log_file,
            pid_file=self.pid_file,
        )

    def check(self) -> str:
        tls_port = self.settings.mqtt.tls_port
        self._connack(self.port, ca_file=None)
        try:
            # Verified like a client would: against the stack's CA, with hostname checking.
            self._connack(tls_port, ca_file=self.tls_files.ca_cert)
        except (OSError, RuntimeError) as exc:
            raise RuntimeError(f"TLS listener on port {tls_port}: {exc}") from exc
        return f"MQTT CONNACK ok, also over TLS on port {tls_port}"

    def _connack(self, port: int, *, ca_file: Path | None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"meterflow-health-{uuid.uuid4().hex[:8]}"
        )
        client.username_pw_set(
            self.settings.mqtt.service_user, self.settings.mqtt.service_password.get_secret_value()
        )
        if ca_file is not None:
            client.tls_set(ca_certs=str(ca_file))
        client.connect(self.settings.mqtt.host, port, keepalive=5)
        try:
            client.loop_start()
            deadline = time.monotonic() + 3
            while not client.is_connected():
                if time.monotonic() > deadline:
                    raise RuntimeError("no CONNACK (check credentials in the broker log)")
                time.sleep(0.05)
        finally:
            client.disconnect()
            client.loop_stop()


def load_gateway_accounts(settings: Settings) -> list[brokerauth.GatewayAccount]:
    """Gateway credentials from the registry, when the database is up and migrated."""
    try:
        with psycopg.connect(settings.db.conninfo(), connect_timeout=2) as conn:
            rows = conn.execute(
                "SELECT tenant_id, gateway_id, mqtt_password_hash FROM gateways WHERE enabled"
            ).fetchall()
    except psycopg.Error:
        return []
    return [brokerauth.GatewayAccount(t, g, h) for t, g, h in rows]


# --- PostgreSQL + TimescaleDB ------------------------------------------------------------------


class Postgres(Service):
    name = "postgres"
    run_as = "postgres" if os.geteuid() == 0 else None

    @property
    def port(self) -> int:
        return self.settings.db.port

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def socket_dir(self) -> Path:
        return self.home / "run"

    def pid(self) -> int | None:
        # postmaster.pid is PostgreSQL's own pid file; ours mirrors it for a uniform layout.
        pid = proc.running_pid(self.data_dir / "postmaster.pid")
        if pid is not None and proc.read_pid(self.pid_file) != pid:
            self.pid_file.write_text(f"{pid}\n")
        return pid

    def _pg(self, tool: str, *args: str) -> list[str]:
        return proc.run_as_argv(self.run_as, [str(bootstrap.pg_bindir() / tool), *args])

    def configure(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self.run_as:
            proc.chown_tree(self.home, self.run_as)
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run(
                self._pg(
                    "initdb",
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                ),
                check=True,
                capture_output=True,
            )
        conf = f"""# Generated by `meterflow stack up`; included from postgresql.conf.
listen_addresses = '127.0.0.1'
port = {self.port}
unix_socket_directories = '{self.socket_dir}'
shared_preload_libraries = 'timescaledb'
timescaledb.telemetry_level = off
max_connections = 200
shared_buffers = 1GB
work_mem = 32MB
maintenance_work_mem = 256MB
max_wal_size = 4GB
checkpoint_timeout = 15min
max_worker_processes = 16
timescaledb.max_background_workers = 8
password_encryption = scram-sha-256
"""
        (self.data_dir / "meterflow.conf").write_text(conf)
        main_conf = self.data_dir / "postgresql.conf"
        include = "include_if_exists = 'meterflow.conf'"
        if include not in main_conf.read_text():
            with main_conf.open("a") as f:
                f.write(f"\n{include}\n")
        if self.run_as:
            proc.chown_tree(self.home, self.run_as)

    def launch(self) -> None:
        subprocess.run(
            self._pg(
                "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w", "-t", "120", "start"
            ),
            check=True,
            capture_output=True,
        )
        self.pid()

    def _admin_conn(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user="postgres",
            dbname=dbname,
            connect_timeout=2,
            autocommit=True,
        )

    def check(self) -> str:
        with self._admin_conn() as conn:
            row = conn.execute("SELECT current_setting('server_version')").fetchone()
        return f"PostgreSQL {row[0] if row else '?'}"

    def after_healthy(self) -> None:
        db = self.settings.db
        password = db.password.get_secret_value()
        with self._admin_conn() as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (db.user,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(
                sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
                    sql.SQL(verb), sql.Identifier(db.user), sql.Literal(password)
                )
            )
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db.name,)).fetchone():
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(db.name), sql.Identifier(db.user)
                    )
                )
        with self._admin_conn(db.name) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")

    def stop(self) -> bool:
        if self.pid() is None:
            return False
        subprocess.run(
            self._pg("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", "stop"),
            check=False,
            capture_output=True,
        )
        self.pid_file.unlink(missing_ok=True)
        return True


# --- Kafka (KRaft) -----------------------------------------------------------------------------


class Kafka(Service):
    name = "kafka"

    @property
    def port(self) -> int:
        return int(self.settings.kafka.bootstrap.rsplit(":", 1)[1])

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def configure(self) -> None:
        k = self.settings.kafka
        host = k.bootstrap.rsplit(":", 1)[0]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = f"""# Generated by `meterflow stack up`: single-node KRaft (broker + controller).
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{host}:{k.controller_port}
listeners=PLAINTEXT://{host}:{self.port},CONTROLLER://{host}:{k.controller_port}
advertised.listeners=PLAINTEXT://{host}:{self.port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={self.data_dir}
num.partitions={k.partitions}
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=168
"""
        (self.home / "server.properties").write_text(props)
        (self.home / "log4j.properties").write_text(
            "log4j.rootLogger=INFO, stdout\n"
            "log4j.logger.kafka.request.logger=WARN\n"
            "log4j.logger.org.apache.kafka.clients=WARN\n"
            "log4j.appender.stdout=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.stdout.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
        )
        if not (self.data_dir / "meta.properties").exists():
            cluster_id = kraft_cluster_id()
            subprocess.run(
                [
                    *self._java(),
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    str(self.home / "server.properties"),
                ],
                check=True,
                capture_output=True,
            )

    def _java(self) -> list[str]:
        k = self.settings.kafka
        libs = bootstrap.kafka_libs(self.cache_dir, k.version, k.scala_version)
        return [
            "java",
            f"-Xmx{k.heap}",
            f"-Xms{k.heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.home / 'log4j.properties'}",
            "-cp",
            f"{libs}/*",
        ]

    def launch(self) -> None:
        proc.start_detached(
            [*self._java(), "kafka.Kafka", str(self.home / "server.properties")],
            log_file=self.log_file,
            pid_file=self.pid_file,
        )

    def check(self) -> str:
        return asyncio.run(_kafka_check(self.settings.kafka.bootstrap))

    def after_healthy(self) -> None:
        asyncio.run(ensure_topics(self.settings))


async def _kafka_check(bootstrap_servers: str) -> str:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=3000)
    # A refused connection while the broker boots is the expected answer of a probe, not an error.
    aiokafka_log = logging.getLogger("aiokafka")
    level = aiokafka_log.level
    aiokafka_log.setLevel(logging.CRITICAL)
    try:
        await asyncio.wait_for(admin.start(), 5)
        cluster = await asyncio.wait_for(admin.describe_cluster(), 5)
    finally:
        aiokafka_log.setLevel(level)
        with contextlib.suppress(Exception):
            await admin.close()
    return f"KRaft cluster {cluster['cluster_id']}, {len(cluster['brokers'])} broker(s)"


def kraft_cluster_id() -> str:
    """A random KRaft cluster id (URL-safe base64 of a UUID). Like Kafka's own `Uuid.randomUuid`, it
    never starts with '-': the storage tool would read such an id as an option and refuse to format."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


async def ensure_topics(settings: Settings) -> None:
    """Create meterflow's topics, or grow their partition counts to the configured ones."""
    from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic

    k = settings.kafka
    wanted = {
        k.readings_topic: k.partitions,
        k.dlq_topic: k.dlq_partitions,
        k.intensity_topic: k.intensity_partitions,
    }
    admin = AIOKafkaAdminClient(bootstrap_servers=k.bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(name, n, 1) for name, n in wanted.items() if name not in existing]
        if missing:
            await admin.create_topics(missing)
        described = await admin.describe_topics([n for n in wanted if n in existing])
        grow = {
            d["topic"]: NewPartitions(wanted[d["topic"]])
            for d in described
            if len(d["partitions"]) < wanted[d["topic"]]
        }
        if grow:
            await admin.create_partitions(grow)
    finally:
        await admin.close()
