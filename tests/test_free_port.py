"""The test helpers' free ports: free now, and out of reach of the kernel's ephemeral ports."""

from __future__ import annotations

import socket

import pytest
from drivers import LOWEST_PICKED_PORT, ephemeral_port_range_start, free_port


def test_a_free_port_is_below_the_ephemeral_range_and_can_be_bound():
    start = ephemeral_port_range_start()
    if start is None:
        pytest.skip("no /proc/sys/net/ipv4/ip_local_port_range here")
    ports = {free_port() for _ in range(20)}
    assert all(LOWEST_PICKED_PORT <= port < start for port in ports)
    for port in ports:
        with socket.socket() as server:
            server.bind(("0.0.0.0", port))
            server.listen()
