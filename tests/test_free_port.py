"""Listen ports for brokers, servers and agents started by tests and simulations."""

from __future__ import annotations

from firmware_sim import local


def test_ports_are_distinct_and_below_the_ephemeral_range():
    ports = [local.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert max(ports) < local._ephemeral_low()


def test_parallel_workers_take_disjoint_slices(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    slices = []
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        low, high = local._slice()
        port = local.free_port()
        assert low <= port < high
        slices.append((low, high))
    assert slices[0][1] <= slices[1][0]


def test_a_port_someone_listens_on_is_not_handed_out(monkeypatch):
    import socket

    low, _ = local._slice()
    monkeypatch.setattr(local, "_slice", lambda: (low, low + 2))
    monkeypatch.setattr(local, "_handed_out", set())
    with socket.socket() as s:
        s.bind(("127.0.0.1", low))
        s.listen()
        assert local.free_port() == low + 1
