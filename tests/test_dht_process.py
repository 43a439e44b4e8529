"""A peer's DHT process outlives a request it cannot read: one whose sender exited before the DHT process read it
(an averager shut down with a DHT request in flight, as a peer leaves)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
from hivemind.utils.timed_storage import get_dht_time

from potluck.hivemind_ext.dht import start_dht


def _store_and_exit(dht) -> None:
    dht.store(
        "sender", 1, get_dht_time() + 60, return_future=True
    )  # its answer's pipe leaves with this process


@pytest.mark.timeout(60)
def test_the_dht_process_skips_a_request_whose_sender_exited_and_serves_on(capfd):
    dht = start_dht([], ["/ip4/127.0.0.1/tcp/0"], [], None)
    try:
        os.kill(dht.pid, signal.SIGSTOP)  # the request waits in the pipe until its sender has gone
        try:
            sender = mp.get_context("fork").Process(target=_store_and_exit, args=(dht,))
            sender.start()
            sender.join(30)
            assert sender.exitcode == 0
        finally:
            os.kill(dht.pid, signal.SIGCONT)
        asked = time.monotonic()
        assert dht.store("key", "value", get_dht_time() + 60, return_future=True).result(timeout=10)
        answered = time.monotonic() - asked
        assert dht.get("key", latest=True).value == "value" and dht.is_alive()
        # hivemind logged the failed read with a traceback and then held every request for its wait_timeout (3 s);
        # an EOFError there (a sender half gone) ended the DHT process
        assert answered < 2.0, answered
        assert "Traceback" not in capfd.readouterr().err
    finally:
        dht.shutdown()
