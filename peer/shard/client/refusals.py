"""A server's ``bad_request`` is not taken on its word alone.

A server that refuses a request as malformed may be right (the caller's bug) or faulty or hostile: were its word
enough, any server in the DHT could stop every client routed to it. So a refusal is handled as a failure (the
server is banned and the request goes to another server, as the fault rules of ``expert_calls.py`` and ``spans.py``
say), and kept here; it is raised as the caller's bug (:class:`wire.RemoteError` of kind ``bad_request``, naming
every refusing server's answer) only when a second, different server refuses the same request too, or when no other
server is left to ask. The servers it names were then right: their bans are lifted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from potluck.peer.shard.wire import BAD_REQUEST, FORBIDDEN, RemoteError

Blocks = tuple[int, int] | None
"""The blocks a request ran (``start``, ``end``) on a span server; None for an expert call."""


def is_refusal(error: BaseException) -> bool:
    """A ``bad_request``, or a private run's ``forbidden`` (this peer holds no valid access token, says the server:
    taken on its word no more than a ``bad_request``)."""
    return isinstance(error, RemoteError) and error.kind in (BAD_REQUEST, FORBIDDEN)


def _same_request(a: Blocks, b: Blocks) -> bool:
    """Requests of one call to two servers are the same one where their blocks overlap (a re-route may split a
    span differently)."""
    return a is None or b is None or (a[0] < b[1] and b[0] < a[1])


@dataclass
class Refusals:
    """The ``bad_request`` answers to one call (an expert call; a pass through the blocks), by server."""

    call: str
    """What the call does, for the error (``forward of expert 0.1``)."""
    unban: Callable[[str], None]
    """Lifts a server's ban: that of a server whose refusal is raised (it was right)."""
    answers: list[tuple[str, Blocks, RemoteError]] = field(default_factory=list)

    def note(self, peer_id: str, error: BaseException, blocks: Blocks = None) -> None:
        """After ``peer_id`` failed with ``error`` (and was banned): keep a refusal, and raise it with an earlier
        one of another server for the same request. Other failures pass."""
        if not is_refusal(error):
            return
        earlier = [a for a in self.answers if a[0] != peer_id and _same_request(a[1], blocks)]
        self.answers.append((peer_id, blocks, error))
        if earlier:
            raise self._raised([earlier[0], self.answers[-1]], "") from error

    def none_left(self, why: BaseException | None = None, blocks: Blocks = None) -> None:
        """No other server is left to ask (``why``: what said so): a refusal kept for ``blocks`` is raised."""
        kept = [a for a in self.answers if _same_request(a[1], blocks)]
        if kept:
            reason = (
                f"; no other server is left to ask ({why})" if why else "; no other server is left to ask"
            )
            raise self._raised(kept[-1:], reason) from why

    def _raised(self, answers: list[tuple[str, Blocks, RemoteError]], reason: str) -> RemoteError:
        for peer_id, _, _ in answers:
            self.unban(peer_id)
        said = "; ".join(
            f"server {peer_id}{f' on blocks {blocks[0]}:{blocks[1]}' if blocks else ''} answered {error}"
            for peer_id, blocks, error in answers
        )
        kind = FORBIDDEN if all(error.kind == FORBIDDEN for _, _, error in answers) else BAD_REQUEST
        what = (
            "refused: this peer holds no valid access token" if kind == FORBIDDEN else "refused as malformed"
        )
        return RemoteError(f"{self.call}: {what} ({said}){reason}", kind)
