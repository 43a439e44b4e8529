"""Loading an RSA signing key that was saved with ``RSAPrivateKey.to_bytes()``.

Upstream lacks a loader: ``RSAPrivateKey`` can serialise itself but only ever generates new keys (or
unpickles), so a coordinator that must keep its identity across restarts fills the private key in.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from hivemind.utils.crypto import RSAPrivateKey

UPSTREAM = {
    "hivemind.utils.crypto.RSAPrivateKey": "9cf8c6adaef3b056",  # its _private_key is filled in from DER
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``)."""


def load_private_key(der: bytes) -> RSAPrivateKey:
    """The key whose ``to_bytes()`` is ``der`` (a DER-encoded RSA private key)."""
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = serialization.load_der_private_key(der, password=None)
    return key
