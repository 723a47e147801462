"""Which process of `tusserver --workers N` holds a connection, read from /proc (Linux only):
the workers are the supervisor's children, and a worker holds the server side of each
connection it accepted."""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.processes import ServerProcess
from tests.support.raw_http import TCP_ESTABLISHED, TCP_LISTEN, RawRequest, tcp_sockets


def children_of(pid: int) -> set[int]:
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                children.add(int(entry))
    return children


def socket_inodes_of(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tcp_socket_inodes(local_port: int, remote_port: int | None) -> set[int]:
    """The inodes of the IPv4 sockets on 127.0.0.1:`local_port`: the listening ones (remote
    None) or the one connected to 127.0.0.1:`remote_port`."""
    inodes = set()
    for socket in tcp_sockets():
        if socket.local_port != local_port:
            continue
        if remote_port is None and socket.state == TCP_LISTEN:
            inodes.add(socket.inode)
        if remote_port is not None and socket.state == TCP_ESTABLISHED:
            if socket.remote_port == remote_port:
                inodes.add(socket.inode)
    assert inodes, f"no socket on port {local_port} (peer {remote_port})"
    return inodes


def holder_of(server: ServerProcess, request: RawRequest, workers: set[int]) -> int | None:
    """The pid of the worker holding the server side of `request`'s open connection; None
    while no worker has accepted it yet."""
    client_port = request.writer.get_extra_info("sockname")[1]
    (inode,) = tcp_socket_inodes(server.port, client_port)
    owners = [pid for pid in workers if inode in socket_inodes_of(pid)]
    assert len(owners) <= 1, owners
    return owners[0] if owners else None


def worker_of(server: ServerProcess, request: RawRequest, workers: set[int]) -> int:
    """The pid of the worker holding the server side of `request`'s open connection."""
    owner = holder_of(server, request, workers)
    assert owner is not None, "no worker holds the connection"
    return owner
