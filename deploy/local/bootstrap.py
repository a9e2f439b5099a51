"""One-time installation of what the local stack runs: Debian packages, TimescaleDB, Kafka jars.

Everything is pinned and cached under the cache folder (default ``~/.cache/meterflow``) so a second
checkout or a CI run on the same machine does not download or build again. The system's apt sources
are never changed: the TimescaleDB source package is fetched through a project-local sources list.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PG_MAJOR = 15
# Debian trixie's TimescaleDB source package: the Apache-2 edition, built against PostgreSQL 15.
TIMESCALEDB_VERSION = "2.19.3"
TIMESCALEDB_DEBIAN_VERSION = "2.19.3+dfsg-1+deb13u1"
TIMESCALEDB_SUITE = "trixie"

APT_PACKAGES = (
    "mosquitto",
    "mosquitto-clients",
    f"postgresql-{PG_MAJOR}",
    f"postgresql-server-dev-{PG_MAJOR}",
    "cmake",
    "ninja-build",
    "gcc",
    "dpkg-dev",
    "maven",
    "openjdk-17-jre-headless",
    "openssl",
)

# What the dashboard's browser test drives: Debian's Chromium (Playwright launches it by path, never its
# own download) and a metric-compatible font so screenshots are legible. Not pinned: Debian replaces a
# Chromium version in the security archive when the next one ships, so a pin would stop installing.
BROWSER_PACKAGES = ("chromium", "fonts-liberation")
CHROMIUM = Path("/usr/bin/chromium")

Step = Callable[[str], None]


class BootstrapError(RuntimeError):
    pass


def _run(
    argv: Sequence[str], *, log_file: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.run(list(argv), stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, check=False)
    if proc.returncode != 0:
        raise BootstrapError(f"`{' '.join(argv)}` failed with exit code {proc.returncode}; see {log_file}")


def _privileged(argv: Sequence[str]) -> list[str]:
    if os.geteuid() == 0:
        return list(argv)
    if shutil.which("sudo"):
        return ["sudo", "-n", *argv]
    raise BootstrapError(
        f"installing system packages needs root; run `sudo {' '.join(argv)}` once, then try again"
    )


def missing_packages(packages: Sequence[str] = APT_PACKAGES) -> list[str]:
    missing = []
    for pkg in packages:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True, check=False
        )
        if "install ok installed" not in proc.stdout:
            missing.append(pkg)
    return missing


def install_packages(step: Step, log_file: Path, packages: Sequence[str] = APT_PACKAGES) -> None:
    missing = missing_packages(packages)
    if not missing:
        return
    step(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(_privileged(["apt-get", "update", "-q"]), log_file=log_file, env=env)
    _run(
        _privileged(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]),
        log_file=log_file,
        env=env,
    )


def install_browser(step: Step, log_file: Path) -> Path:
    """Install the browser the dashboard tests drive, once; return its path."""
    install_packages(step, log_file, BROWSER_PACKAGES)
    return CHROMIUM


def pg_bindir() -> Path:
    return Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin")


def _pg_config(flag: str) -> Path:
    out = subprocess.run(
        [str(pg_bindir() / "pg_config"), flag], capture_output=True, text=True, check=True
    ).stdout.strip()
    return Path(out)


def timescaledb_installed() -> bool:
    control = _pg_config("--sharedir") / "extension" / f"timescaledb--{TIMESCALEDB_VERSION}.sql"
    library = _pg_config("--pkglibdir") / f"timescaledb-{TIMESCALEDB_VERSION}.so"
    return control.exists() and library.exists()


def install_timescaledb(step: Step, cache_dir: Path, log_file: Path) -> None:
    """Fetch Debian's source package, build it once against PostgreSQL 15, install from the cache."""
    if timescaledb_installed():
        return
    work = cache_dir / f"timescaledb-{TIMESCALEDB_DEBIAN_VERSION}"
    staged = work / "staged"
    if not (staged / ".complete").exists():
        apt_dir = work / "apt"
        for sub in ("lists/partial", "cache/archives/partial"):
            (apt_dir / sub).mkdir(parents=True, exist_ok=True)
        sources = apt_dir / "sources.list"
        sources.write_text(
            "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
            f"http://deb.debian.org/debian {TIMESCALEDB_SUITE} main\n"
        )
        apt_opts = [
            f"-o=Dir::Etc::SourceList={sources}",
            "-o=Dir::Etc::SourceParts=/dev/null",
            f"-o=Dir::State::Lists={apt_dir / 'lists'}",
            f"-o=Dir::Cache={apt_dir / 'cache'}",
            "-o=APT::Sandbox::User=root",
        ]
        src_dir = work / "src"
        src_dir.mkdir(parents=True, exist_ok=True)
        dsc = src_dir / f"timescaledb_{TIMESCALEDB_DEBIAN_VERSION}.dsc"
        if not dsc.exists():
            step(f"fetching TimescaleDB {TIMESCALEDB_DEBIAN_VERSION} source from Debian {TIMESCALEDB_SUITE}")
            _run(["apt-get", *apt_opts, "update", "-q"], log_file=log_file)
            _run(
                [
                    "apt-get",
                    *apt_opts,
                    "source",
                    "--download-only",
                    f"timescaledb={TIMESCALEDB_DEBIAN_VERSION}",
                ],
                log_file=log_file,
                cwd=src_dir,
            )
        tree = work / "tree"
        if tree.exists():
            shutil.rmtree(tree)
        _run(["dpkg-source", "-x", str(dsc), str(tree)], log_file=log_file)
        step(f"building TimescaleDB {TIMESCALEDB_VERSION} (Apache-2 edition) against PostgreSQL {PG_MAJOR}")
        build = tree / "build"
        _run(
            [
                "cmake",
                "-S",
                str(tree),
                "-B",
                str(build),
                "-G",
                "Ninja",
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DPG_CONFIG={pg_bindir() / 'pg_config'}",
                "-DAPACHE_ONLY=1",
                "-DSEND_TELEMETRY_DEFAULT=OFF",
                "-DUSE_TELEMETRY=OFF",
                "-DREGRESS_CHECKS=OFF",
                "-DTAP_CHECKS=OFF",
                "-DWARNINGS_AS_ERRORS=OFF",
                "-DUSE_OPENSSL=OFF",
                "-DLINTER=OFF",
            ],
            log_file=log_file,
        )
        _run(["ninja", "-C", str(build)], log_file=log_file)
        if staged.exists():
            shutil.rmtree(staged)
        _run(
            ["ninja", "-C", str(build), "install"],
            log_file=log_file,
            env={**os.environ, "DESTDIR": str(staged)},
        )
        (staged / ".complete").write_text(TIMESCALEDB_DEBIAN_VERSION + "\n")
        shutil.rmtree(tree)
    step("installing the cached TimescaleDB build into PostgreSQL's directories")
    _run(_privileged(["cp", "-a", "--no-preserve=ownership", f"{staged}/usr/.", "/usr/"]), log_file=log_file)
    if not timescaledb_installed():
        raise BootstrapError("TimescaleDB files were copied but PostgreSQL does not see them")


KAFKA_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.meterflow.local</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{scala}</artifactId>
      <version>{version}</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-reload4j</artifactId>
      <version>1.7.36</version>
    </dependency>
  </dependencies>
</project>
"""


def kafka_libs(cache_dir: Path, version: str, scala: str) -> Path:
    return cache_dir / f"kafka_{scala}-{version}" / "libs"


def install_kafka(step: Step, cache_dir: Path, version: str, scala: str, log_file: Path) -> Path:
    """Resolve the broker's jars from Maven Central with mvn into the cache; nothing else is downloaded."""
    libs = kafka_libs(cache_dir, version, scala)
    marker = libs / ".complete"
    if marker.exists():
        return libs
    step(f"resolving Apache Kafka {version} (Scala {scala}) jars from Maven Central")
    home = libs.parent
    home.mkdir(parents=True, exist_ok=True)
    (home / "pom.xml").write_text(KAFKA_POM.format(scala=scala, version=version))
    if libs.exists():
        shutil.rmtree(libs)
    _run(
        [
            "mvn",
            "-q",
            "-B",
            f"-Dmaven.repo.local={cache_dir / 'm2'}",
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs}",
            "-DincludeScope=runtime",
        ],
        log_file=log_file,
        cwd=home,
    )
    marker.write_text(version + "\n")
    return libs
