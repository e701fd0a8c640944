"""Block every connection and name lookup that is not to this machine: the node must never
reach outside (no weights, fonts or telemetry from the network)."""

from __future__ import annotations

import socket

LOCAL = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "", None}
_real_getaddrinfo = socket.getaddrinfo
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


class NetworkBlocked(OSError):
    pass


def _check(host: object) -> None:
    if host not in LOCAL:
        raise NetworkBlocked(f"blocked: network access to {host!r}")


def _getaddrinfo(host, *args, **kwargs):  # noqa: ANN001, ANN202
    _check(host)
    return _real_getaddrinfo(host, *args, **kwargs)


def _connect(self, address):  # noqa: ANN001, ANN202
    if isinstance(address, tuple):
        _check(address[0])
    return _real_connect(self, address)


def _connect_ex(self, address):  # noqa: ANN001, ANN202
    if isinstance(address, tuple):
        _check(address[0])
    return _real_connect_ex(self, address)


def block() -> None:
    socket.getaddrinfo = _getaddrinfo
    socket.socket.connect = _connect
    socket.socket.connect_ex = _connect_ex
