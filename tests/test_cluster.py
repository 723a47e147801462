"""The same tus flow on a three-node Redis Cluster (real Valkey processes in cluster mode):
every Lua step touches keys of one hash slot, so the layout works unchanged across nodes."""

from __future__ import annotations

import base64
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
import redis
from aiohttp import web

from tests.support.processes import free_port
from tests.support.tus import TUS, patch_headers
from tests.support.waiting import wait_until_sync
from tusserver.http.app import build_app
from tusserver.settings import Settings
from tusserver.store.client import connect
from tusserver.store.embedded import find_server_binary
from tusserver.store.records import SHARD_COUNT, new_upload_id, shard_of
from tusserver.store.state import UploadState

SLOTS = 16384


def free_cluster_port() -> int:
    """A free TCP port whose cluster-bus port (+10000) is free too."""
    while True:  # a search, not a wait: each try is another port
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = str(find_server_binary())
    nodes: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        for index in range(3):
            folder = tmp_path_factory.mktemp(f"node{index}")
            port = free_cluster_port()
            process = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--save", "", "--appendonly", "no",
                 "--dir", str(folder), "--logfile", "node.log"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            nodes.append((process, port))
        clients = [redis.Redis(port=port) for _, port in nodes]
        wait_until_sync(
            lambda: all(_answers(c) for c in clients), 20, 0.05, what="every node answers"
        )
        per_node = SLOTS // len(clients)
        for index, client in enumerate(clients):
            last = SLOTS - 1 if index == len(clients) - 1 else (index + 1) * per_node - 1
            client.cluster("ADDSLOTSRANGE", str(index * per_node), str(last))
        for _, port in nodes[1:]:
            clients[0].cluster("MEET", "127.0.0.1", str(port))
        wait_until_sync(
            lambda: all(c.cluster("INFO")["cluster_state"] == "ok" for c in clients),
            20,
            0.05,
            what="the cluster formed",
        )
        for client in clients:
            client.close()
        yield f"redis://127.0.0.1:{nodes[0][1]}/0"
    finally:
        for process, _ in nodes:
            process.terminate()
        for process, _ in nodes:
            process.wait(10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
async def cluster_server(cluster_url: str, tmp_path: Path) -> AsyncIterator[str]:
    settings = replace(Settings(data_dir=tmp_path / "data", port=0))
    runner = web.AppRunner(build_app(settings, cluster_url), shutdown_timeout=2)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/files/"
    finally:
        await runner.cleanup()


def slot_owners(cluster_url: str) -> set[int]:
    """Which nodes (by port) hold some upload state key."""
    with redis.Redis.from_url(cluster_url) as client:
        owners = set()
        for shard in range(SHARD_COUNT):
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", f"tus:{{{shard}}}:x"))
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    owners.add(int(primary[1]))
        return owners


async def test_uploads_work_across_cluster_nodes(cluster_server: str, cluster_url: str) -> None:
    assert len(slot_owners(cluster_url)) == 3  # the shards really are spread over the nodes
    async with aiohttp.ClientSession() as http:
        urls = []
        for index in range(12):  # enough uploads to land in shards on every node
            body = f"upload {index}".encode()
            headers = {**TUS, "Upload-Length": str(len(body))}
            async with http.post(cluster_server, headers=headers) as response:
                assert response.status == 201, await response.text()
                url = response.headers["Location"]
            async with http.patch(url, data=body, headers=patch_headers(0)) as response:
                assert response.status == 204, await response.text()
            async with http.get(url) as response:
                assert await response.read() == body
            urls.append(url)
        async with http.get(cluster_server + "?limit=5") as response:
            first_page = await response.json()
        assert len(first_page["uploads"]) == 5
        async with http.delete(urls[0], headers=TUS) as response:
            assert response.status == 204
        async with http.head(urls[0], headers=TUS) as response:
            assert response.status == 404  # gone: --gone-status, 404 by default


async def test_a_batch_completes_on_a_cluster(cluster_server: str, cluster_url: str) -> None:
    """The batch's Lua steps touch its members' keys and its own in one hash slot."""
    async with aiohttp.ClientSession() as http:
        async with http.post(cluster_server + "batches", json={"files": 6}) as response:
            assert response.status == 201, await response.text()
            name = (await response.json())["id"]
        for index in range(6):
            body = f"member {index}".encode()
            value = base64.b64encode(f"dir/{index}.txt".encode()).decode()
            batch = base64.b64encode(name.encode()).decode()
            headers = {
                **TUS, "Upload-Length": str(len(body)),
                "Upload-Metadata": f"batch {batch},relativePath {value}",
            }  # fmt: skip
            async with http.post(cluster_server, headers=headers) as response:
                assert response.status == 201, await response.text()
                url = response.headers["Location"]
            async with http.patch(url, data=body, headers=patch_headers(0)) as response:
                assert response.status == 204, await response.text()
        async with http.get(cluster_server + f"batches/{name}") as response:
            view = await response.json()
        assert view["state"] == "completed" and view["progress"]["files_completed"] == 6
        async with http.delete(cluster_server + f"batches/{name}") as response:
            assert response.status == 204
        async with http.get(url) as response:
            assert response.status == 404


async def test_lock_requests_are_counted_in_each_shards_slot_on_a_cluster(
    cluster_url: str,
) -> None:
    """The renewals read every shard's ask counter in one call across the nodes, and a
    request to a holder moves its own shard's counter only."""
    client = await connect(cluster_url)
    try:
        state = UploadState(client, tombstone_ttl_s=60, path_of=lambda upload_id: upload_id)
        shards = list(range(SHARD_COUNT))
        before = await state.ask_counts(shards)
        upload_id = new_upload_id()
        assert await state.try_lock(upload_id, 3000) is not None
        assert await state.ask_holder(upload_id, "stop", 3000)
        after = await state.ask_counts(shards)
        moved = [shard for shard in shards if before[shard] != after[shard]]
        assert moved == [shard_of(upload_id)]
    finally:
        await client.aclose()
