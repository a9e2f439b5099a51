"""The local broker's TLS material: a self-signed CA and a server certificate, made with the openssl CLI.

Files live in ``<state>/mosquitto/tls/`` and survive restarts. `ensure` reissues only what is missing,
broken or within `RENEW_BEFORE_S` of expiry; the CA outlives many server certificates, so a client that
trusts ``ca.crt`` keeps trusting the broker across renewals.
"""

from __future__ import annotations

import secrets
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from meterflow.settings import Settings

CA_DAYS = 3650
SERVER_DAYS = 365
RENEW_BEFORE_S = 30 * 86_400
# The TLS listener binds 127.0.0.1 only, so these are the only names a client can reach it by.
SERVER_HOSTNAME = "localhost"
SERVER_IP = "127.0.0.1"

# Explicit extensions rather than the system openssl.cnf defaults, so the certificates are the same on
# every machine and pass strict verification (Python >= 3.13 sets VERIFY_X509_STRICT by default).
_OPENSSL_CNF = f"""[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:{SERVER_HOSTNAME}, IP:{SERVER_IP}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def broker_files(settings: Settings) -> TlsFiles:
    """Where the local stack keeps the broker's TLS files; clients verify the broker with ``ca_cert``."""
    folder = settings.state_path / "mosquitto" / "tls"
    return TlsFiles(
        ca_cert=folder / "ca.crt",
        ca_key=folder / "ca.key",
        server_cert=folder / "server.crt",
        server_key=folder / "server.key",
    )


def ensure(files: TlsFiles) -> None:
    """Create or renew the CA and the server certificate as needed; a no-op when both are good."""
    folder = files.ca_cert.parent
    folder.mkdir(parents=True, exist_ok=True)
    # Clients that are not the broker read ca.crt, so the folder stays listable; the keys are 0600.
    folder.chmod(0o755)
    if not _pair_usable(files.ca_cert, files.ca_key):
        _issue_ca(files)
    if not (_pair_usable(files.server_cert, files.server_key) and _server_verifies(files)):
        _issue_server(files)


def _issue_ca(files: TlsFiles) -> None:
    with tempfile.TemporaryDirectory(dir=files.ca_cert.parent) as tmp:
        work = Path(tmp)
        cnf = work / "openssl.cnf"
        cnf.write_text(_OPENSSL_CNF)
        key, cert = work / "ca.key", work / "ca.crt"
        _new_key(key)
        _openssl(
            "req", "-x509", "-new", "-key", str(key), "-sha256", "-days", str(CA_DAYS),
            "-subj", "/CN=meterflow local development CA", "-config", str(cnf), "-extensions", "ca",
            "-out", str(cert),
        )  # fmt: skip
        _install(key, files.ca_key, 0o600)
        _install(cert, files.ca_cert, 0o644)


def _issue_server(files: TlsFiles) -> None:
    with tempfile.TemporaryDirectory(dir=files.server_cert.parent) as tmp:
        work = Path(tmp)
        cnf = work / "openssl.cnf"
        cnf.write_text(_OPENSSL_CNF)
        key, csr, cert = work / "server.key", work / "server.csr", work / "server.crt"
        _new_key(key)
        _openssl(
            "req", "-new", "-key", str(key), "-subj", f"/CN={SERVER_HOSTNAME}", "-config", str(cnf),
            "-out", str(csr),
        )  # fmt: skip
        # A random serial: a reissued certificate must never repeat one its CA already signed.
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(files.ca_cert), "-CAkey", str(files.ca_key),
            "-set_serial", f"0x{secrets.token_hex(16)}", "-days", str(SERVER_DAYS), "-sha256",
            "-extfile", str(cnf), "-extensions", "server", "-out", str(cert),
        )  # fmt: skip
        # Key before certificate: if we stop in between, the pair no longer matches and the next
        # `ensure` reissues it.
        _install(key, files.server_key, 0o600)
        _install(cert, files.server_cert, 0o644)


def _new_key(path: Path) -> None:
    # RSA rather than ECDSA: every TLS stack a metering gateway ships with speaks it.
    _openssl("genpkey", "-quiet", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(path))
    path.chmod(0o600)


def _install(src: Path, dest: Path, mode: int) -> None:
    src.chmod(mode)
    src.replace(dest)


def _pair_usable(cert: Path, key: Path) -> bool:
    """Both files exist, the key belongs to the certificate and it is not about to expire."""
    if not (cert.exists() and key.exists()):
        return False
    if not _succeeds("x509", "-in", str(cert), "-noout", "-checkend", str(RENEW_BEFORE_S)):
        return False
    try:
        cert_pub = _openssl("x509", "-in", str(cert), "-noout", "-pubkey")
        key_pub = _openssl("pkey", "-in", str(key), "-pubout")
    except RuntimeError:
        return False
    return cert_pub == key_pub


def _server_verifies(files: TlsFiles) -> bool:
    """The server certificate chains to the current CA and names what clients connect to."""
    return _succeeds(
        "verify", "-CAfile", str(files.ca_cert), "-purpose", "sslserver",
        "-verify_hostname", SERVER_HOSTNAME, "-verify_ip", SERVER_IP, str(files.server_cert),
    )  # fmt: skip


def _openssl(*args: str) -> str:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")
    return result.stdout


def _succeeds(*args: str) -> bool:
    return subprocess.run(["openssl", *args], capture_output=True, check=False).returncode == 0
