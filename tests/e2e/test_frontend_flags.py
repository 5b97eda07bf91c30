"""vLLM's frontend flags on one real server (two API servers sharing the port): HTTPS with a self-signed certificate
made here, --root-path, CORS, --enable-request-id-headers, --enable-force-include-usage, --enable-log-requests
with --max-log-len, --metrics-require-api-key; and the same flags parsed for `conveyor frontend`."""
from __future__ import annotations

import datetime
import ipaddress
import ssl
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.server_harness import ConveyorServer

API_KEY = "sk-flags"
ORIGIN = "http://good.example"
PREFIX = "/prefix"


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A key and a certificate for 127.0.0.1 and localhost (cryptography, no CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                              x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    key_path, cert_path = folder / "key.pem", folder / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class HttpsServer(ConveyorServer):
    """ConveyorServer whose readiness probe speaks HTTPS, trusting `cert_path`."""

    def __init__(self, model: str, *args: str, cert_path: Path, **kwargs: Any) -> None:
        self.tls = ssl.create_default_context(cafile=str(cert_path))
        super().__init__(model, *args, **kwargs)
        self.base_url = self.base_url.replace("http://", "https://")

    def _wait_healthy(self, timeout_s: float) -> None:
        url = f"https://127.0.0.1:{self.port}/health"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited during start-up:\n{self.log_tail()}")
            try:
                if httpx.get(url, verify=self.tls, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not healthy over HTTPS after {timeout_s} s:\n{self.log_tail()}")

    def http(self, **headers: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, verify=self.tls, timeout=120,
                            headers={"Authorization": f"Bearer {API_KEY}", **headers})


@pytest.fixture(scope="module")
def server(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpsServer]:
    key_path, cert_path = _self_signed_certificate(tmp_path_factory.mktemp("tls"))
    server = HttpsServer(str(tiny_models / "llama"), "--served-model-name", "tiny-llama", "--max-model-len", "128",
                         "--kv-cache-memory", "32MiB", "--api-server-count", "2",
                         "--ssl-keyfile", str(key_path), "--ssl-certfile", str(cert_path),
                         "--root-path", PREFIX, "--allowed-origins", f'["{ORIGIN}"]', "--allow-credentials",
                         "--enable-request-id-headers", "--enable-force-include-usage",
                         "--enable-log-requests", "--max-log-len", "3", "--metrics-require-api-key",
                         "--uvicorn-log-level", "info", "--disable-uvicorn-access-log",
                         cert_path=cert_path, api_key=API_KEY)
    server.cert_path = cert_path  # type: ignore[attr-defined]
    yield server
    assert server.stop() == []


def test_openai_client_over_https_with_the_self_signed_certificate(server: HttpsServer) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0,
                           http_client=httpx.Client(verify=server.tls))
    for _ in range(4):  # new connections, spread over both API servers
        answer = client.chat.completions.create(model="tiny-llama", max_tokens=3,
                                                messages=[{"role": "user", "content": "hi"}])
        assert answer.usage is not None and answer.usage.completion_tokens == 3
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate is refused
        httpx.get(f"{server.base_url}/health", timeout=10)


def test_root_path_serves_with_and_without_the_prefix(server: HttpsServer) -> None:
    """vLLM's --root-path (FastAPI's root_path): a proxy may strip the prefix or pass it on."""
    with server.http() as http:
        assert http.get("/v1/models").json()["data"][0]["id"] == "tiny-llama"
        assert http.get(f"{PREFIX}/v1/models").json()["data"][0]["id"] == "tiny-llama"
        assert http.get("/openapi.json").json()["servers"] == [{"url": PREFIX}]
    bare = httpx.Client(base_url=server.base_url, verify=server.tls, timeout=30)
    assert bare.get(f"{PREFIX}/health").status_code == 200  # open behind the prefix too
    assert bare.get(f"{PREFIX}/v1/models").status_code == 401  # and guarded behind it


def test_metrics_require_the_key_when_asked(server: HttpsServer) -> None:
    bare = httpx.Client(base_url=server.base_url, verify=server.tls, timeout=30)
    assert bare.get("/metrics").status_code == 401
    assert bare.get("/health").status_code == 200 and bare.get("/version").status_code == 200
    with server.http() as http:
        assert http.get("/metrics").status_code == 200


def test_cors_preflight_answers_the_allowed_origin_only(server: HttpsServer) -> None:
    bare = httpx.Client(base_url=server.base_url, verify=server.tls, timeout=30)
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = bare.options("/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200  # no key needed: browsers send none on a preflight
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert allowed.headers["access-control-allow-credentials"] == "true"
    refused = bare.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    # A 401 still carries the CORS header, so a browser page can read why it was refused.
    unauthorized = bare.get("/v1/models", headers={"Origin": ORIGIN})
    assert unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == ORIGIN


def test_request_id_headers(server: HttpsServer) -> None:
    with server.http() as http:
        fresh = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert fresh.status_code == 200 and len(fresh.headers["x-request-id"]) == 32
        assert fresh.json()["id"] == f"cmpl-{fresh.headers['x-request-id']}"  # the response is named after it
        echoed = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                           headers={"X-Request-Id": "my-request-7"})
        assert echoed.headers["x-request-id"] == "my-request-7" and echoed.json()["id"] == "cmpl-my-request-7"
        assert http.get("/health").headers["x-request-id"]
        assert httpx.get(f"{server.base_url}/v1/models", verify=server.tls).headers["x-request-id"]  # 401 too


def test_force_include_usage_in_streams_without_stream_options(server: HttpsServer) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0,
                           http_client=httpx.Client(verify=server.tls))
    chat = list(client.chat.completions.create(model="tiny-llama", max_tokens=4, stream=True,
                                               messages=[{"role": "user", "content": "hi"}]))
    assert chat[-1].usage is not None and chat[-1].usage.completion_tokens == 4
    completion = list(client.completions.create(model="tiny-llama", prompt="hi", max_tokens=4, stream=True))
    assert completion[-1].usage is not None and completion[-1].usage.completion_tokens == 4


def test_log_requests_cut_to_max_log_len(server: HttpsServer) -> None:
    with server.http() as http:
        assert http.post("/v1/completions", json={"prompt": "a long prompt of many tokens", "max_tokens": 1},
                         headers={"X-Request-Id": "log-probe"}).status_code == 200
    deadline = time.monotonic() + 10
    while "Received request cmpl-log-probe" not in server.log_tail(400) and time.monotonic() < deadline:
        time.sleep(0.2)
    line = next(line for line in server.log_tail(400).splitlines() if "Received request cmpl-log-probe" in line)
    assert "more)" in line and "a long prompt" not in line  # 3 token ids and 3 characters at most
    assert "GET /health" not in server.log_tail(400)  # --disable-uvicorn-access-log at log level info


def test_conveyor_frontend_takes_the_same_flags(tmp_path: Path) -> None:
    """`conveyor frontend` shares the flag group: the flags reach its FrontendConfig (no engine needed)."""
    from conveyor.config_from_args import frontend_config_from_args
    from conveyor.flags import build_parser

    args = build_parser().parse_args(
        ["frontend", "--engine-address", "tcp://127.0.0.1:1", "--api-key", "a", "b", "--api-key", "c",
         "--ssl-keyfile", "k.pem", "--ssl-certfile", "c.pem", "--ssl-ca-certs", "ca.pem", "--ssl-cert-reqs", "2",
         "--root-path", "/p", "--allowed-origins", '["http://x"]', "--allowed-methods", '["GET"]',
         "--allowed-headers", '["authorization"]', "--allow-credentials", "--enable-log-requests",
         "--max-log-len", "9", "--disable-uvicorn-access-log", "--uvicorn-log-level", "debug",
         "--enable-request-id-headers", "--enable-force-include-usage", "--disable-log-stats",
         "--metrics-require-api-key"])
    config = frontend_config_from_args(args)
    assert config.api_key == ("a", "b", "c") and config.ssl_cert_reqs == 2 and config.ssl_ca_certs == "ca.pem"
    assert (config.root_path, config.allowed_origins, config.allowed_methods) == ("/p", ("http://x",), ("GET",))
    assert config.allow_credentials and config.enable_log_requests and config.max_log_len == 9
    assert config.disable_uvicorn_access_log and config.enable_request_id_headers
    assert config.enable_force_include_usage and config.metrics_require_api_key
    only_key = build_parser().parse_args(["frontend", "--engine-address", "tcp://127.0.0.1:1",
                                          "--ssl-keyfile", "k.pem"])
    with pytest.raises(SystemExit):
        frontend_config_from_args(only_key)
