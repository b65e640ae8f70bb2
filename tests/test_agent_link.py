"""The agent's MQTT link in thread mode: only its network thread touches the socket."""

from __future__ import annotations

import threading
import time

from edge_agent.link import MqttLink
from tests.agent_fixtures import make_config
from tests.brokers import wait_until


def test_a_send_from_another_thread_is_written_by_the_link_thread(tmp_path, broker):
    """paho writes a message from the publishing thread unless told otherwise; with TLS two
    threads on one SSL object can crash the process. The agent publishes from its tick thread:
    the link's own thread must be the only one writing."""
    link = MqttLink(make_config(tmp_path, broker), on_connected=lambda: None, on_desired=lambda b: None,
                    clock=time.monotonic, will_payload=lambda: b"{}")
    writers: set[str] = set()
    loop_write = link.client.loop_write

    def recording_loop_write():
        writers.add(threading.current_thread().name)
        return loop_write()

    link.client.loop_write = recording_loop_write  # type: ignore[method-assign]
    link.start()
    try:
        wait_until(lambda: link.connected, 10, message="the link connects")
        for seq in range(1, 6):
            assert link.send(seq, "telemetry", b"{}")
        acked: list[int] = []
        wait_until(lambda: acked.extend(link.take_acks()) or len(acked) == 5, 10, message="5 PUBACKs")
        assert sorted(acked) == [1, 2, 3, 4, 5]
        assert writers == {link._thread.name}  # type: ignore[union-attr]
    finally:
        link.stop(offline_payload=b"{}")
