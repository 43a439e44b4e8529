"""What a volunteer reads in ``run-peer``'s log: hivemind's expected failures as one line, not a traceback."""

from __future__ import annotations

import io
import logging

import pytest
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import AllreduceException

from potluck.peer.cli import quiet_log_filters

pytestmark = pytest.mark.unit


def test_a_round_that_found_no_group_is_one_warning_line_and_bugs_keep_their_traceback():
    out = io.StringIO()
    handler = logging.StreamHandler(out)  # as run-peer's handlers are set up without --verbose
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for noise in quiet_log_filters():
        handler.addFilter(noise)
    for name, error in [
        ("hivemind.test_log_lines", AllreduceException("Averaging step failed: could not find a group")),
        ("hivemind.test_log_lines", MatchmakingException("Unable to run All-Reduce: cancelled")),
        ("hivemind.test_log_lines", KeyError("a bug of hivemind's")),
        ("potluck.test_log_lines", AllreduceException("not hivemind's own log")),
    ]:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.propagate = False
        try:
            raise error
        except Exception:
            logger.exception(str(error))
        finally:
            logger.removeHandler(handler)
    log = out.getvalue()
    lines = log.splitlines()
    warning = logging.getLevelName(logging.WARNING)  # hivemind names it WARN
    assert lines[:2] == [
        f"{warning} hivemind.test_log_lines: Averaging step failed: could not find a group",
        f"{warning} hivemind.test_log_lines: Unable to run All-Reduce: cancelled",
    ], log
    # anything else keeps its level and traceback: a KeyError in hivemind, and Potluck's own logs
    assert (
        lines[2] == 'ERROR hivemind.test_log_lines: "a bug of hivemind\'s"' and log.count("Traceback") == 2
    ), log
    assert "AllreduceException: not hivemind's own log" in log, log
