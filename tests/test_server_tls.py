"""TLS, and mTLS when a client CA is given (certificates made with the openssl command)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

pytest.importorskip("tensorflow", reason="the server tests need the server extra")

from _serving import start_server, stop_server
from fovea.v1 import classifier_pb2 as pb
from fovea.v1 import classifier_pb2_grpc


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


def _list_models(port: int, credentials: grpc.ChannelCredentials) -> list:
    with grpc.secure_channel(f"localhost:{port}", credentials) as ch:
        stub = classifier_pb2_grpc.ClassifierServiceStub(ch)
        return list(stub.ListModels(pb.ListModelsRequest(), timeout=10).models)


def test_tls_and_mtls(certs: Path, tmp_path: Path) -> None:
    ca = (certs / "ca.pem").read_bytes()
    client_key, client_cert = (certs / "client.key").read_bytes(), (certs / "client.pem").read_bytes()
    tls = {"tls_cert": str(certs / "server.pem"), "tls_key": str(certs / "server.key")}

    srv = start_server(tmp_path, **tls)
    try:
        assert _list_models(srv.port, grpc.ssl_channel_credentials(ca)) == []
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch, pytest.raises(grpc.RpcError):
            classifier_pb2_grpc.ClassifierServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=5)
    finally:
        stop_server(srv)

    srv = start_server(tmp_path, tls_client_ca=str(certs / "ca.pem"), **tls)
    try:
        with_cert = grpc.ssl_channel_credentials(ca, private_key=client_key, certificate_chain=client_cert)
        assert _list_models(srv.port, with_cert) == []
        with pytest.raises(grpc.RpcError) as info:
            _list_models(srv.port, grpc.ssl_channel_credentials(ca))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop_server(srv)
