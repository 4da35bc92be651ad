"""TLS, and mTLS when a client CA is given (certificates made with the openssl command)."""

from __future__ import annotations

import http.client
import shutil
import ssl
import subprocess
from pathlib import Path

import grpc
import pytest

pytest.importorskip("tensorflow", reason="the server tests need the server extra")

from _serving import client, start_server, stop_server
from fovea.client import FoveaError


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "1", "-subj", "/CN=fovea-test-ca", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext", cwd=d)  # fmt: skip
    return d


def test_tls_and_mtls(certs: Path, tmp_path: Path) -> None:
    ca = certs / "ca.pem"
    tls = {"tls_cert": str(certs / "server.pem"), "tls_key": str(certs / "server.key")}

    srv = start_server(tmp_path, **tls)
    try:
        with client(srv.port, host="localhost", root_certificates=ca) as fovea:
            assert fovea.list_models() == []
        with client(srv.port, host="localhost") as plaintext, pytest.raises(FoveaError):
            plaintext.list_models(timeout=5)
        # The v2 REST port takes the same certificate.
        assert _https_status(srv.http_port, ca) == 200
    finally:
        stop_server(srv)

    srv = start_server(tmp_path, tls_client_ca=str(ca), **tls)
    try:
        mtls = {"private_key": certs / "client.key", "certificate_chain": certs / "client.pem"}
        with client(srv.port, host="localhost", root_certificates=ca, **mtls) as fovea:
            assert fovea.list_models() == []
        with (
            client(srv.port, host="localhost", root_certificates=ca) as no_cert,
            pytest.raises(FoveaError) as info,
        ):
            no_cert.list_models(timeout=5)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert _https_status(srv.http_port, ca, certs / "client.pem", certs / "client.key") == 200
        # No client certificate: refused in the handshake (TLS 1.2) or right after it (TLS 1.3).
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _https_status(srv.http_port, ca)
    finally:
        stop_server(srv)


def _https_status(port: int, ca: Path, cert: Path | None = None, key: Path | None = None) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        connection.request("GET", "/v2/health/live")
        return connection.getresponse().status
    finally:
        connection.close()
