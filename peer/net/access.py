"""A peer of a private run: its own access token checked at start, published in the DHT and renewed from its file,
and the run's access list set before anything that serves or averages starts (``hivemind_ext/access.py``).

The token file (``run-peer --access-token FILE``) is read again at every tick: whoever renews the peer's token
(the run's owner, ``potluck access grant``) overwrites the file, and the peer publishes the new one; or the owner
publishes renewed tokens in the DHT itself (``potluck access serve``). A peer whose token expired with no newer one
in sight keeps running, and says so once: the others refuse it until a new token arrives.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hivemind.dht import DHT
from hivemind.p2p import PeerID

from potluck.hivemind_ext.access import AccessList, admit_with
from potluck.protocols.access import (
    AccessToken,
    TokenError,
    access_key,
    check_own_token,
    owner_public_key,
    read_token,
    token_checker,
)
from potluck.protocols.runspec import RunSpec
from potluck.runtime.periodic import Periodic

logger = logging.getLogger(__name__)

PUBLISH_EVERY = 5.0
"""Seconds between two publications of this peer's token (and reads of the others')."""


class AccessTokenError(ValueError):
    """A private run's token that this peer cannot use: one line naming the file or flag."""


def read_own_token(spec: RunSpec, token_path: Path | None, identity_path: Path | None) -> AccessToken | None:
    """This peer's token for ``spec``'s run, checked before anything loads (None for a public run). The token
    names one peer id, so a private run needs the identity it was issued for (``--identity-path``)."""
    if not spec.access.private:
        return None
    if token_path is None:
        raise AccessTokenError(
            f"run {spec.run_id!r} is private: give --access-token FILE, a token from the run's owner "
            "(potluck access grant; your peer id: potluck access peer-id --identity-path FILE)"
        )
    if identity_path is None or not identity_path.exists():
        raise AccessTokenError(
            f"run {spec.run_id!r} is private: give --identity-path, the identity file whose peer id "
            f"{token_path} was issued for"
        )
    peer_id = PeerID.from_identity(identity_path.read_bytes()).to_base58()
    try:
        text = token_path.read_text()
    except OSError as e:
        raise AccessTokenError(f"--access-token {token_path}: cannot read it ({e.strerror})") from None
    try:
        token = read_token(text, owner_public_key(spec.access.owner_key))
        check_own_token(token, spec.run_id, peer_id)
    except TokenError as e:
        raise AccessTokenError(f"--access-token {token_path}: {e}") from None
    return token


class TokenPublisher:
    """Publishes this peer's token under the run's access key, and reads the others', every few seconds."""

    def __init__(self, dht: DHT, key_tag: bytes, spec: RunSpec, token_path: Path, access: AccessList):
        self.dht, self.key_tag, self.spec, self.token_path, self.access = (
            dht,
            key_tag,
            spec,
            token_path,
            access,
        )
        self._owner = owner_public_key(spec.access.owner_key)
        self._told_expired = False
        self._periodic = Periodic(self.tick, PUBLISH_EVERY, "potluck-access")

    def start(self) -> TokenPublisher:
        self.tick()  # before the first round: the others admit this peer once they read its token
        self._periodic.start()
        return self

    def tick(self) -> None:
        try:
            text = self.token_path.read_text().strip()
            token = read_token(text, self._owner)
        except (OSError, TokenError) as e:
            logger.warning(f"--access-token {self.token_path}: {e}; publishing the last good one")
            token = None
        self.access.read()
        if token is not None:
            self._publish(text, token)

    def _publish(self, text: str, token: AccessToken) -> None:
        now = time.time()
        if not token.valid_at(now):
            renewed = self.access.holds_token(
                str(self.dht.peer_id)
            )  # by the owner in the DHT (potluck access serve)
            if not renewed and not self._told_expired:
                logger.warning(
                    f"private run {self.spec.run_id!r}: this peer's access token expired {now - token.expires_at:.0f}"
                    f" s ago and the owner published no newer one; the others refuse it until {self.token_path} holds"
                    " a new one"
                )
            self._told_expired = not renewed
            return
        self._told_expired = False
        self.dht.store(
            access_key(self.spec.run_id), subkey=self.key_tag, value=text, expiration_time=token.expires_at
        )

    def stop(self) -> None:
        self._periodic.stop(grace=1)


def join_private_run(
    dht: DHT, key_tag: bytes, spec: RunSpec, token_path: Path | None
) -> TokenPublisher | None:
    """For a private run: publish this peer's token, read the others', and make this process and the averagers it
    starts from now on admit only peers with a token. Call before the averagers or servers start. None: public."""
    if not spec.access.private:
        admit_with(None)
        return None
    access = AccessList(access_key(spec.run_id), token_checker(spec.run_id, spec.access.owner_key), dht)
    admit_with(access)
    return TokenPublisher(dht, key_tag, spec, token_path, access).start()
