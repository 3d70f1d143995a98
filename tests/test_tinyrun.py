"""The shared test helpers keep the promises the suite relies on."""

from __future__ import annotations

import itertools
import socket

import tinyrun


def test_ports_are_handed_out_once_from_the_workers_own_block(monkeypatch):
    monkeypatch.setattr(tinyrun, "_next_port", itertools.count())
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    block = 10000 + 3 * tinyrun.PORT_BLOCK
    with socket.socket() as held:  # a port taken by something else is skipped, not handed out
        held.bind(("127.0.0.1", block))
        ports = [tinyrun.free_port() for _ in range(20)]
    assert ports == list(range(block + 1, block + 21))
