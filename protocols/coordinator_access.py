"""How a client reaches a coordinator that runs TLS and asks for the operator credential.

Every client of the coordinator's gRPC API (``potluck run``, ``run-peer --coordinator``, ``potluck swarm
init``) takes the same two things: the certificate to trust (``--tls-ca``, a PEM file: the coordinator's
self-signed certificate or the CA that signed it) and, for calls that change something, the operator
token (``--operator-token-file``, or ``$POTLUCK_OPERATOR_TOKEN``). The coordinator checks the token with
``authorization: Bearer <token>`` metadata (``coordinator/auth.py``).

Files are read and checked here, before anything heavy loads: a bad one is a :class:`AccessError` whose
message is one line naming the flag and the file.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

OPERATOR_TOKEN_ENV = "POTLUCK_OPERATOR_TOKEN"
_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


class AccessError(ValueError):
    """A TLS or token file that cannot be used; the message names the flag and the file."""


@dataclass(frozen=True)
class CoordinatorAccess:
    """What a client needs beyond the address. The default is today's open, plaintext coordinator."""

    tls_ca: bytes | None = None
    """PEM certificates to trust; ``None``: plaintext (a coordinator with TLS on refuses the connection)."""
    operator_token: str | None = None
    """Sent only with calls that change something (publish, status changes); reads never carry it."""


def read_pem_certificates(path: Path, flag: str) -> bytes:
    """The bytes of a PEM file holding at least one certificate; :class:`AccessError` otherwise."""
    data = read_flag_file(path, flag)
    if _PEM_CERTIFICATE not in data:
        raise AccessError(f"{flag} {path}: not a PEM certificate (no '-----BEGIN CERTIFICATE-----' line)")
    return data


def read_operator_token(path: Path, flag: str = "--operator-token-file") -> str:
    """The token in ``path`` (surrounding whitespace dropped); :class:`AccessError` if it is empty."""
    try:
        token = read_flag_file(path, flag).decode().strip()
    except UnicodeDecodeError:
        raise AccessError(f"{flag} {path}: not a text file") from None
    return check_token(token, f"{flag} {path}")


def check_token(token: str, source: str) -> str:
    if not token:
        raise AccessError(f"{source}: the operator token is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        # it travels in an HTTP/2 header: a line break or a space would be cut or refused on the way
        raise AccessError(f"{source}: the operator token holds spaces or control characters")
    return token


def read_flag_file(path: Path, flag: str) -> bytes:
    """The bytes of the file a flag names; :class:`AccessError` (one line) if it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise AccessError(f"{flag} {path}: no such file") from None
    except OSError as e:
        raise AccessError(f"{flag} {path}: cannot read it ({e.strerror})") from None


def add_access_arguments(parser: argparse.ArgumentParser, prefix: str = "", operator: bool = True) -> None:
    """``--{prefix}tls-ca`` and, for clients that change things, ``--operator-token-file``."""
    parser.add_argument(
        f"--{prefix}tls-ca",
        type=Path,
        metavar="PEM",
        help="the coordinator runs TLS: trust this certificate (its --tls-self-signed certificate or its CA)",
    )
    if operator:
        parser.add_argument(
            "--operator-token-file",
            type=Path,
            metavar="FILE",
            help=f"the coordinator's operator token, for publishing and status changes (default: ${OPERATOR_TOKEN_ENV})",
        )


def access_from_args(args: argparse.Namespace, prefix: str = "") -> CoordinatorAccess:
    """Read the files :func:`add_access_arguments` named; :class:`AccessError` for a bad one."""
    ca_path = getattr(args, f"{prefix}tls_ca".replace("-", "_"))
    tls_ca = read_pem_certificates(ca_path, f"--{prefix}tls-ca") if ca_path is not None else None
    token_path = getattr(args, "operator_token_file", None)
    if token_path is not None:
        token = read_operator_token(token_path)
    elif hasattr(args, "operator_token_file") and os.environ.get(OPERATOR_TOKEN_ENV) is not None:
        token = check_token(os.environ[OPERATOR_TOKEN_ENV].strip(), f"${OPERATOR_TOKEN_ENV}")
    else:
        token = None
    return CoordinatorAccess(tls_ca, token)
