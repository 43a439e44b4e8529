"""Expected groups: a search that knows how many peers to expect assembles as soon as they have all joined.

hivemind's leader assembles its group when ``target_group_size`` peers have joined or when its declared expiration
(``min_matchmaking_time`` after it began, or the step's ``scheduled_time``) passes. A caller that starts its
search once it sees every peer of the round ready (DiLoCo) learns of the last one's readiness up to a poll period
late, so the peers begin their searches up to that far apart: with the window only ``matchmaking_time`` long, a
peer that began it 0.5 s after the first missed the group on a busy machine, round after round (4 DiLoCo peers
averaged as 3 + 1 in every outer step of a test run, the fourth catching up by download each time). The caller
widens the window (``scheduled_time``) to cover that spread, and says in its gathered mapping how many peers it
expects (:data:`EXPECT`): for that search this peer's ``target_group_size`` is that many (never more than the run's
own), so the leader does not wait out the wider window once everyone is in. A peer the caller did not expect is
refused as "group is full", as a full group's leader refuses today; fewer peers than expected assemble when the
window ends, as before.
"""

from __future__ import annotations

import contextlib

from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import StepControl

UPSTREAM = {
    "hivemind.averaging.matchmaking.Matchmaking.looking_for_group": "a7f0ac4565e90cc9",  # wrapped: holds the search lock
    "hivemind.averaging.matchmaking.Matchmaking.rpc_join_group": "0d6120e412849439",  # assembles at target_group_size
    "hivemind.averaging.matchmaking.Matchmaking._check_reasons_to_reject": "c694e8194862154f",  # refuses past it
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``)."""

EXPECT = "expect"
"""The key of the caller's gathered mapping that says how many peers (itself included) its search expects."""


class ExpectedGroups(DecentralizedAverager):
    """Sets matchmaking's ``target_group_size`` for one search to the peers the caller expects (module docstring)."""

    _expecting = False

    async def _step(self, *, step: StepControl, future_for_init):
        if not self._expecting:
            self._expecting = True
            matchmaking = self._matchmaking
            own_target, holding = matchmaking.target_group_size, matchmaking.looking_for_group

            @contextlib.asynccontextmanager
            async def looking_for_group(step: StepControl):
                # inside hivemind's lock for one search at a time: a search queued behind a running one (a
                # round that outlived its cancel) must not change the running one's target
                async with holding(step):
                    expected = self._expected(step.data_for_gather)
                    if expected is not None and (own_target is None or expected < own_target):
                        matchmaking.target_group_size = expected
                    try:
                        yield
                    finally:
                        matchmaking.target_group_size = own_target

            matchmaking.looking_for_group = looking_for_group
        return await super()._step(step=step, future_for_init=future_for_init)

    def _expected(self, data_for_gather: bytes) -> int | None:
        try:
            _, _, user = self.serializer.loads(data_for_gather)
            expected = self.serializer.loads(user).get(EXPECT)
        except Exception:  # noqa: BLE001 (a caller that gathers no mapping expects nothing)
            return None
        return expected if isinstance(expected, int) and expected >= 2 else None
