"""Access tokens of private runs: which peer may take part in a run, until when, signed by the run's owner.

A run spec with ``access.private: true`` names the public half of an owner key (``access.owner_key``: the
``.pub`` file that ``potluck access keygen`` or a coordinator writes). The owner issues each approved peer a
token (``potluck access grant``) naming the run, the peer's libp2p peer id and an expiry, signed with that key.
A peer publishes its token under the run's access key in the DHT (:func:`access_key`); every other peer checks
it before it lets that peer average with it, download its state, call its shard servers, or count its records
(``hivemind_ext/access.py``). libp2p authenticates the peer id of every stream, so a token is of no use to
anyone but the peer it names, and publishing it gives nothing away.

Tokens are short-lived on purpose: revoking a peer is not renewing its token, and it is out once its token
expires. Peers compare expiry times with their own clocks: keep clocks within a small part of a token's life.

Format: ``potluck-access-1.<payload>.<signature>``, the payload canonical JSON, both base64url.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

TOKEN_PREFIX = "potluck-access-1"
MAX_TOKEN_CHARS = 4096
"""A token is about 500 characters; longer text is refused before it is decoded."""
_OWNER_TAG = re.compile(r"^\[owner:(.+)\]$")


def access_key(run_id: str) -> str:
    """The DHT key under which the run's peers publish their tokens (one subkey per peer, signed by it)."""
    return f"{run_id}_access"


class TokenError(ValueError):
    """A token that cannot be used: the message says why, in one line."""


@dataclass(frozen=True)
class AccessToken:
    run_id: str
    peer_id: str
    """The base58 libp2p peer id of the one peer this token admits."""
    issued_at: float
    expires_at: float
    """Unix time after which nobody accepts this token."""

    def payload(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    def valid_at(self, now: float) -> bool:
        return now < self.expires_at


def owner_public_key(text: str) -> RSAPublicKey:
    """The owner key a spec names: an ``ssh-rsa …`` public key, or hivemind's ``[owner:ssh-rsa …]`` tag (what
    ``potluck access keygen`` and the coordinator write into their ``.pub`` files). Raises ``ValueError``."""
    text = text.strip()
    if match := _OWNER_TAG.match(text):
        text = match.group(1)
    try:
        return RSAPublicKey.from_bytes(text.encode())
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"not an RSA public key in OpenSSH form ({str(error).splitlines()[0][:80]})"
        ) from None


def issue_token(owner: RSAPrivateKey, run_id: str, peer_id: str, ttl: float, now: float | None = None) -> str:
    """A token admitting ``peer_id`` to ``run_id`` for ``ttl`` seconds from ``now``, signed with ``owner``."""
    if not (math.isfinite(ttl) and ttl > 0):
        raise TokenError(f"ttl: must be a positive number of seconds, not {ttl!r}")
    now = time.time() if now is None else now
    token = AccessToken(run_id=run_id, peer_id=peer_id, issued_at=now, expires_at=now + ttl)
    payload = token.payload()
    signature = base64.b64decode(owner.sign(payload))
    return ".".join((TOKEN_PREFIX, _b64(payload), _b64(signature)))


def read_token(text: str | bytes, owner: RSAPublicKey) -> AccessToken:
    """The token in ``text`` if the owner key signed it; raises :class:`TokenError` naming what is wrong. It does
    not check expiry, run or peer: :meth:`AccessToken.valid_at` and the caller do."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise TokenError("not text") from None
    text = text.strip()
    if len(text) > MAX_TOKEN_CHARS:
        raise TokenError(f"{len(text)} characters, more than a token's {MAX_TOKEN_CHARS}")
    parts = text.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise TokenError(f"not a Potluck access token (expected {TOKEN_PREFIX}.<payload>.<signature>)")
    try:
        payload, signature = _unb64(parts[1]), _unb64(parts[2])
    except (binascii.Error, ValueError):
        raise TokenError("not base64url") from None
    if not owner.verify(payload, base64.b64encode(signature)):
        raise TokenError("not signed by the run's owner key (access.owner_key)")
    try:
        fields = json.loads(payload)
        token = AccessToken(
            run_id=str(fields["run_id"]),
            peer_id=str(fields["peer_id"]),
            issued_at=float(fields["issued_at"]),
            expires_at=float(fields["expires_at"]),
        )
    except (ValueError, TypeError, KeyError) as error:
        raise TokenError(f"payload: {error!r}") from None
    return token


def token_checker(run_id: str, owner_key: str) -> Callable[[object], tuple[str, float]]:
    """What ``hivemind_ext.access.AccessList`` checks a published value with: the peer id a token signed by
    ``owner_key`` admits to ``run_id``, and until when; ``ValueError`` (:class:`TokenError`) for anything else."""
    owner = owner_public_key(owner_key)

    def check(value: object) -> tuple[str, float]:
        if not isinstance(value, (str, bytes)):
            raise TokenError(f"not a token but {type(value).__name__}")
        token = read_token(value, owner)
        if token.run_id != run_id:
            raise TokenError(f"it is for run {token.run_id!r}")
        return token.peer_id, token.expires_at

    return check


def check_own_token(token: AccessToken, run_id: str, peer_id: str, now: float | None = None) -> None:
    """Raise :class:`TokenError` unless ``token`` admits ``peer_id`` to ``run_id`` now (a peer's own, at start)."""
    now = time.time() if now is None else now
    if token.run_id != run_id:
        raise TokenError(f"it is for run {token.run_id!r}, not {run_id!r}")
    if token.peer_id != peer_id:
        raise TokenError(
            f"it is for peer {token.peer_id}, and this peer's identity is {peer_id} (--identity-path)"
        )
    if not token.valid_at(now):
        raise TokenError(f"it expired {now - token.expires_at:.0f} s ago: ask the run's owner for a new one")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
