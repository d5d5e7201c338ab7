"""Where Ray work runs: the worker setup hook binds gloo to the node's Ray address."""

from __future__ import annotations

import os

import pytest

from mint_ray.ray_cluster import interface_of, setup_worker


def test_the_interface_of_an_address() -> None:
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("192.0.2.77") is None  # TEST-NET-1: on no interface here


def test_setup_binds_gloo_to_the_ray_address_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """(It also applies the console's rules, as init_ray does in this process anyway.)"""
    import ray

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    setup_worker()
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")  # a person's choice is kept
    setup_worker()
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth7"
