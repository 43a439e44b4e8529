"""Keys: loading an RSA signing key, and one key per peer for its peer id and its DHT records.

Upstream lacks a loader: ``RSAPrivateKey`` can serialise itself but only ever generates new keys (or
unpickles), so a coordinator that must keep its identity across restarts fills the private key in.

A peer's libp2p identity (behind its peer id) and the RSA key that signs its DHT records are two keys in
hivemind: records are signed with ``RSAPrivateKey.process_wide()``, a key made up per process, so nothing
ties the ``peer_id`` written inside a record to the key that signed it, and one peer can pass itself off as
another in what it reports. :func:`sign_records_with_identity` makes them one key: the peer's identity file
holds an RSA key (hivemind's ``P2P.generate_identity`` writes such files), and that key becomes the
process-wide one. Then :func:`peer_id_of_owner` derives the peer id from a record's ``[owner:…]`` tag, as
libp2p derives it from the identity, and a reader can check the two agree.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import multihash
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.message import DecodeError
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p.p2p_daemon import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

UPSTREAM = {
    "hivemind.utils.crypto.RSAPrivateKey": "9cf8c6adaef3b056",  # its _private_key is filled in from DER;
    # and its _process_wide_key is set to the identity's key
    "hivemind.p2p.p2p_daemon.P2P.generate_identity": "6310daf4f73d3f35",  # the identity files we create
    "hivemind.p2p.p2p_daemon_bindings.datastructures.PeerID.from_identity": "cb8bfbf83ce3628a",  # the peer id
    "hivemind.dht.crypto.RSASignatureValidator": "d94b229e21a2b8aa",  # PUBLIC_KEY_FORMAT of owner tags
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``)."""


class IdentityError(ValueError):
    """An identity file that cannot be this peer's: the message names the file and says why, in one line."""


def load_private_key(der: bytes) -> RSAPrivateKey:
    """The key whose ``to_bytes()`` is ``der`` (a DER-encoded RSA private key)."""
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = serialization.load_der_private_key(der, password=None)
    return key


def read_identity(path: Path) -> RSAPrivateKey:
    """The RSA key in a libp2p identity file (``--identity-path``; a serialised libp2p ``PrivateKey``)."""
    try:
        message = crypto_pb2.PrivateKey.FromString(path.read_bytes())
    except (OSError, DecodeError) as error:
        raise IdentityError(f"{path}: not a libp2p identity file ({error})") from None
    if message.key_type != crypto_pb2.KeyType.RSA:
        raise IdentityError(
            f"{path}: the identity's key is {crypto_pb2.KeyType.Name(message.key_type)}; a peer signs its "
            "records with that key, which must be RSA (move the file away and a new one is made)"
        )
    try:
        return load_private_key(message.data)
    except ValueError as error:
        raise IdentityError(f"{path}: not a libp2p identity file ({error})") from None


@dataclass(frozen=True)
class SigningIdentity:
    """The identity a peer's DHT starts with (``path``) and signs its records with."""

    path: Path
    fresh: bool
    """Made just now (no other peer can hold it: libp2p's check for a taken identity can be skipped)."""
    temporary: bool
    """Made for this process alone (no ``--identity-path``): :meth:`forget` it once the DHT has started."""

    def forget(self) -> None:
        if self.temporary:
            shutil.rmtree(self.path.parent, ignore_errors=True)


def sign_records_with_identity(identity_path: Path | None) -> SigningIdentity:
    """Make the key of this peer's identity (``identity_path``, made when missing; a temporary one without a
    path) the key this process signs its DHT records with. Call it once per process, before its DHT starts and
    before anything signs (hivemind's progress tracker and averagers take the process-wide key then)."""
    temporary = identity_path is None
    if identity_path is None:
        identity_path = Path(tempfile.mkdtemp(prefix="potluck-identity-")) / "identity.key"
    fresh = not identity_path.exists()
    if fresh:
        identity_path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(identity_path))
    key = read_identity(identity_path)
    with RSAPrivateKey._process_wide_key_lock:
        RSAPrivateKey._process_wide_key = key
    return SigningIdentity(identity_path, fresh, temporary)


@functools.lru_cache(maxsize=4096)
def peer_id_of_owner(owner: bytes) -> str | None:
    """The base58 libp2p peer id of a peer whose identity key is the RSA key in ``owner`` (a record's
    ``[owner:…]`` tag, ``records.public_key_tag``); None if ``owner`` holds no RSA public key. Cached: the
    coordinator and every shard client ask it for the same owners at each read of the DHT."""
    prefix, suffix = RSASignatureValidator.PUBLIC_KEY_FORMAT.split(b"_key_")
    if not (owner.startswith(prefix) and owner.endswith(suffix)):
        return None
    try:
        public = serialization.load_ssh_public_key(owner[len(prefix) : len(owner) - len(suffix)])
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    if not isinstance(public, rsa.RSAPublicKey):
        return None
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()
