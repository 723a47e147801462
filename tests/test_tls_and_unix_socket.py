"""--tls-cert/--tls-key and --unix-socket on real tusserver processes: an upload over HTTPS
verified against a CA made in the test, a certificate replaced and reloaded on SIGHUP while
the server runs, and an upload through a unix socket."""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
import os
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.processes import StartProcess, start_server
from tests.support.tus import (
    TUS,
    completed_digest,
    create_upload,
    head_offset,
    patch_headers,
    repr_digest_of,
)
from tests.support.waiting import wait_until


@dataclass
class Authority:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    pem_path: Path


CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True,
    crl_sign=True, encipher_only=False, decipher_only=False,
)  # fmt: skip


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_authority(folder: Path) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name("tusserver test CA"))
        .issuer_name(_name("tusserver test CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    pem_path = folder / "ca.pem"
    pem_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return Authority(key, certificate, pem_path)


def issue_server_certificate(authority: Authority, cert_path: Path, key_path: Path) -> int:
    """A certificate for 127.0.0.1 signed by `authority`, written as PEM; its serial."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    serial = x509.random_serial_number()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(authority.key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return serial


async def served_serial(host: str, port: int, trust: ssl.SSLContext) -> int:
    """The serial number of the certificate a new TLS connection is shown (verified)."""
    _reader, writer = await asyncio.open_connection(host, port, ssl=trust)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()
        await writer.wait_closed()


async def test_an_upload_over_tls_verified_by_a_test_ca_and_a_reload_on_sighup(
    tmp_path: Path, processes: StartProcess
) -> None:
    authority = make_authority(tmp_path)
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    first_serial = issue_server_certificate(authority, cert_path, key_path)
    server = await start_server(
        processes, tmp_path / "data", "--tls-cert", str(cert_path), "--tls-key", str(key_path)
    )
    assert server.url.startswith("https://127.0.0.1:")
    trust = ssl.create_default_context(cafile=str(authority.pem_path))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as http:
        url = await create_upload(http, server.url, 5)
        assert url.startswith("https://127.0.0.1:")
        async with http.patch(url, data=b"hello", headers=patch_headers(0)) as patched:
            assert patched.status == 204
        assert await head_offset(http, url) == 5
        # a body large enough for a receiving thread (16 MiB) is read on the event loop
        # under TLS (the socket carries TLS records, not the body)
        large = os.urandom(16 * 2**20)
        large_url = await create_upload(http, server.url, len(large))
        body = io.BytesIO(large)
        async with http.patch(large_url, data=body, headers=patch_headers(0)) as patched:
            assert patched.status == 204
            assert "Connection" not in patched.headers
        assert await completed_digest(http, large_url) == repr_digest_of(large)
    async with aiohttp.ClientSession() as untrusting:  # the system's CAs do not know ours
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await untrusting.head(url, headers=TUS)

    assert await served_serial("127.0.0.1", server.port, trust) == first_serial
    second_serial = issue_server_certificate(authority, cert_path, key_path)
    server.process.send_signal(signal.SIGHUP)

    async def shows_the_new_certificate() -> bool:
        return await served_serial("127.0.0.1", server.port, trust) == second_serial

    await wait_until(shows_the_new_certificate, what="the reloaded certificate")
    assert server.process.poll() is None


async def test_an_upload_through_a_unix_socket(tmp_path: Path, processes: StartProcess) -> None:
    socket_path = tmp_path / "tus.sock"
    server = await start_server(processes, tmp_path / "data", "--unix-socket", str(socket_path))
    assert server.url.startswith(f"unix:{socket_path}")
    assert socket_path.is_socket()
    endpoint = "http://127.0.0.1/files/"  # the Host a local proxy would pass on
    connector = aiohttp.UnixConnector(path=str(socket_path))
    async with aiohttp.ClientSession(connector=connector) as http:
        url = await create_upload(http, endpoint, 3)
        assert url.startswith("http://127.0.0.1/files/")
        async with http.patch(url, data=b"abc", headers=patch_headers(0)) as patched:
            assert patched.status == 204
        assert await head_offset(http, url) == 3
        # a 16 MiB body through the Unix socket is read straight from it (files/receive.py),
        # and the connection then serves the next request
        large = os.urandom(16 * 2**20)
        large_url = await create_upload(http, endpoint, len(large))
        body = io.BytesIO(large)
        async with http.patch(large_url, data=body, headers=patch_headers(0)) as patched:
            assert patched.status == 204
            assert "Connection" not in patched.headers
        assert await completed_digest(http, large_url) == repr_digest_of(large)
    assert server.stop() == 0
    assert not socket_path.exists()  # the socket file is removed on a clean stop


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sighup_without_tls_changes_nothing(
    tmp_path: Path, processes: StartProcess, workers: str
) -> None:
    """Log rotation sends SIGHUP: without a certificate to reload, the server (and, with
    --workers, every worker it passes the signal on to) keeps serving."""
    server = await start_server(processes, tmp_path / "data", "--workers", workers)
    async with aiohttp.ClientSession() as http:
        url = await create_upload(http, server.url, 4)
        for sent in range(1, 3):  # one at a time: signals of one kind do not queue
            server.process.send_signal(signal.SIGHUP)

            async def logged(sent: int = sent) -> bool:
                seen = server.log().count("SIGHUP: no TLS certificate to reload")
                return seen >= sent * int(workers)

            await wait_until(logged, 10, what="every process logged the SIGHUP")
        assert server.process.poll() is None
        async with http.patch(url, data=b"abcd", headers=patch_headers(0)) as response:
            assert response.status == 204
        assert await head_offset(http, url) == 4
