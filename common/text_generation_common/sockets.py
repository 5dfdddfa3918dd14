"""Sockets several servers on one host must not share: the shards' unix sockets and the TCP ports.

A socket file left by a process that died is stale and may be replaced; one that a live process answers on
belongs to a running server and is never touched (removing it would cut that server off from its shard).
"""

from __future__ import annotations

import errno
import random
import socket
from collections.abc import Collection
from pathlib import Path


class SocketInUse(RuntimeError):
    """A socket path or port that a running process holds."""


def unix_socket_answers(path: str | Path, timeout_s: float = 1.0) -> bool:
    """Whether a process accepts connections on the unix socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout_s)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError, socket.timeout):
            return False
        except OSError as error:
            if error.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                return False
            raise
        return True


def claim_unix_socket(path: str | Path, what: str) -> None:
    """Make `path` free for a new socket: remove a stale socket file, refuse one a live process answers on."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir():
        raise SocketInUse(f"{what} {path} is a directory")
    if unix_socket_answers(path):
        raise SocketInUse(f"{what} {path} is in use: a running server answers on it (give another path)")
    path.unlink()


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise SocketInUse if something listens on (host, port). SO_REUSEADDR, as servers bind: a port whose
    old connections are only waiting to close counts as free."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise SocketInUse(f"{what} {port} on {host} is in use (give another port)") from None
            raise


def _ephemeral_port_low() -> int:
    """The lowest port the kernel hands out for bind(0) and outgoing connections (Linux; its default elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1", avoid: Collection[int] = ()) -> int:
    """A TCP port nothing listens on now, chosen below the kernel's ephemeral range, and none of `avoid` (ports
    already promised to a server that has not bound them yet).

    A port that bind(0) returned can be handed out again before its new owner binds it: torch.distributed's
    gloo pairs and every outgoing connection draw from the ephemeral range. Ports below it are only ever taken
    by a process that names them, so the one returned stays free until the caller binds it."""
    low = _ephemeral_port_low()
    candidates = list(range(max(1024, low - 12000), low))
    random.shuffle(candidates)
    for port in [port for port in candidates if port not in avoid][:200]:
        try:
            check_port_free(host, port, "port")
        except SocketInUse:
            continue
        return port
    raise SocketInUse(f"no free TCP port on {host} below the ephemeral range starting at {low}")


def free_ports(count: int, host: str = "127.0.0.1", avoid: Collection[int] = ()) -> list[int]:
    """`count` distinct ports as `free_port` picks them, none of `avoid`: the ports of one server or one test."""
    ports: list[int] = []
    for _ in range(count):
        ports.append(free_port(host, avoid={*avoid, *ports}))
    return ports
