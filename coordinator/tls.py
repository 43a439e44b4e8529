"""The coordinator's TLS certificate: loaded from PEM files, or made self-signed for the names it binds.

``--tls-cert``/``--tls-key`` take an operator's own certificate (from a CA, or ``openssl``);
``--tls-self-signed DIR`` writes ``DIR/coordinator.crt`` and ``DIR/coordinator.key`` on first start and
reuses them afterwards, so clients keep trusting the same file (``--tls-ca DIR/coordinator.crt``).
Both are checked here, before anything heavy loads: a bad file is a :class:`TlsError` of one line.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from potluck.protocols.coordinator_access import AccessError, read_flag_file

SELF_SIGNED_DAYS = 825
"""Validity of a self-signed certificate; delete the two files to make a new one (clients must then
trust the new certificate)."""

_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class TlsError(AccessError):
    """A certificate or key that cannot be used; the message names the flag and the file."""


@dataclass(frozen=True)
class ServerCertificate:
    cert_pem: bytes
    key_pem: bytes
    cert_path: Path
    names: tuple[str, ...]
    """The DNS names and addresses the certificate is valid for (clients must dial one of them)."""


def load_certificate(cert_path: Path, key_path: Path) -> ServerCertificate:
    """Read and check a PEM certificate and its private key (``--tls-cert``, ``--tls-key``)."""
    cert_pem, key_pem = read_flag_file(cert_path, "--tls-cert"), read_flag_file(key_path, "--tls-key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise TlsError(f"--tls-cert {cert_path}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TlsError(f"--tls-key {key_path}: not an unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, public) != cert.public_key().public_bytes(
        serialization.Encoding.PEM, public
    ):
        raise TlsError(f"--tls-key {key_path}: not the private key of --tls-cert {cert_path}")
    return ServerCertificate(cert_pem, key_pem, cert_path, _names_in(cert))


def self_signed_certificate(folder: Path, host: str) -> ServerCertificate:
    """``folder``'s certificate and key, written first if missing, valid for the names ``host`` serves."""
    cert_path, key_path = folder / "coordinator.crt", folder / "coordinator.key"
    if cert_path.exists() and key_path.exists():
        return load_certificate(cert_path, key_path)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    names = names_for(host)
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "potluck coordinator")])
    san = [x509.IPAddress(ipaddress.ip_address(n)) if _is_address(n) else x509.DNSName(n) for n in names]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # a client whose clock is a little behind
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return load_certificate(cert_path, key_path)


def names_for(host: str) -> tuple[str, ...]:
    """What a client may dial to reach ``host``: itself, or every local name when it binds all addresses."""
    names = ["localhost", "127.0.0.1", "::1"]
    if host in _WILDCARD_HOSTS:
        names += [socket.gethostname(), socket.getfqdn()]
    else:
        names.append(host.strip("[]"))
    return tuple(dict.fromkeys(n for n in names if n))


def _names_in(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return (*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress)))


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
