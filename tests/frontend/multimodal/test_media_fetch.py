"""Media URL loading under the operator's rules (frontend/multimodal/media_fetch.py): data: URLs, file:// URLs
against a real folder, and http(s) against a real local server (ThreadingHTTPServer in a thread)."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import gzip
import io
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from frontend.multimodal.media_fetch import (
    MediaFetchConfig,
    MediaFetchError,
    MediaKind,
    load_media_bytes,
)

LIMIT_BYTES = 1000  # the small byte limit most tests run under
SLOW_S = 1.0  # how long /slow waits before answering; the short timeout below is well under it
SHORT_TIMEOUT_S = 0.2


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 30, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()


def load(url: str, config: MediaFetchConfig, kind: MediaKind = "image") -> bytes:
    return asyncio.run(load_media_bytes(url, kind, config))


def refused(url: str, config: MediaFetchConfig, kind: MediaKind = "image") -> str:
    """The message of the MediaFetchError loading `url` raises (and a check that it is that type, not another)."""
    with pytest.raises(MediaFetchError) as info:
        load(url, config, kind)
    assert type(info.value) is MediaFetchError
    assert "Traceback" not in str(info.value)
    return str(info.value)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        port = self.server.server_address[1]  # type: ignore[index]  # an (host, port) pair for AF_INET
        routes: dict[str, Callable[[], None]] = {
            "/image.png": lambda: self._send(200, PNG),
            "/redirect": lambda: self._redirect("/image.png"),
            "/redirect-absolute": lambda: self._redirect(f"http://127.0.0.1:{port}/redirect"),
            "/redirect-out": lambda: self._redirect(f"http://localhost:{port}/image.png"),
            "/redirect-file": lambda: self._redirect("file:///etc/passwd"),
            "/loop": lambda: self._redirect("/loop"),
            "/slow": self._slow,
            "/large": lambda: self._send(200, b"x" * (LIMIT_BYTES + 1)),
            "/exact": lambda: self._send(200, b"x" * LIMIT_BYTES),
            "/large-declared": self._large_declared,
            "/endless": self._endless,
            "/gzip": lambda: self._send(200, gzip.compress(PNG), {"Content-Encoding": "gzip"}),
        }
        route = routes.get(self.path.split("?")[0])
        try:
            route() if route else self._send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError):  # the client aborted, as the tests want it to
            pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self._send(302, b"", {"Location": location})

    def _slow(self) -> None:
        time.sleep(SLOW_S)
        self._send(200, PNG)

    def _large_declared(self) -> None:
        """Declares a huge body, sends a little and stalls: only a client that trusts Content-Length returns fast."""
        self.send_response(200)
        self.send_header("Content-Length", str(10**9))
        self.end_headers()
        self.wfile.write(b"x" * 100)
        self.wfile.flush()
        time.sleep(SLOW_S)

    def _endless(self) -> None:
        """A chunked body with no end: only a client that counts while streaming stops before the timeout."""
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            self.wfile.write(b"100\r\n" + b"x" * 256 + b"\r\n")
            self.wfile.flush()
            time.sleep(0.001)


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    """A port on 127.0.0.1 that nothing listens on while the `with` block runs."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield int(bound.getsockname()[1])


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that aborts (as these tests make it) resets the connection; anything else still prints."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = _QuietServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def http_config() -> MediaFetchConfig:
    return MediaFetchConfig(allowed_media_domains=("127.0.0.1",), image_fetch_timeout_s=SHORT_TIMEOUT_S * 10,
                            max_media_bytes=LIMIT_BYTES)


# --- config ----------------------------------------------------------------------------------------------------

def test_config_defaults_follow_vllm() -> None:
    config = MediaFetchConfig.from_env(environ={})
    assert (config.image_fetch_timeout_s, config.video_fetch_timeout_s) == (5.0, 30.0)
    assert config.max_media_bytes == 64 * 2**20
    assert config.allowed_local_media_path is None and config.allowed_media_domains is None


def test_config_reads_env_and_cli_values(tmp_path: Path) -> None:
    env = {"VLLM_IMAGE_FETCH_TIMEOUT": "2.5", "VLLM_VIDEO_FETCH_TIMEOUT": "60", "CONVEYOR_MAX_MEDIA_BYTES": "1234"}
    config = MediaFetchConfig.from_env(str(tmp_path), ("example.com",), environ=env)
    assert config == MediaFetchConfig(str(tmp_path), ("example.com",), 2.5, 60.0, 1234)
    assert (config.fetch_timeout_s("image"), config.fetch_timeout_s("video")) == (2.5, 60.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_media_bytes = 1  # type: ignore[misc]


@pytest.mark.parametrize("env", [{"VLLM_IMAGE_FETCH_TIMEOUT": "soon"}, {"CONVEYOR_MAX_MEDIA_BYTES": "1.5"},
                                 {"CONVEYOR_MAX_MEDIA_BYTES": "0"}, {"VLLM_VIDEO_FETCH_TIMEOUT": "-1"}])
def test_config_refuses_bad_env_values(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        MediaFetchConfig.from_env(environ=env)


def test_config_refuses_a_missing_allowed_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        MediaFetchConfig.from_env(str(tmp_path / "missing"), environ={})


# --- data: -----------------------------------------------------------------------------------------------------

def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_data_url_round_trips() -> None:
    config = MediaFetchConfig()
    assert load(data_url(PNG), config) == PNG
    assert load(data_url(PNG, "video/mp4"), config, "video") == PNG
    assert load(data_url(PNG).replace(";base64", ";BASE64"), config) == PNG
    assert load("DATA:image/png;name=a.png;base64," + base64.b64encode(PNG).decode(), config) == PNG


@pytest.mark.parametrize("url", ["data:image/png;base64,not base64!", "data:image/png;base64,iVBORw0KGgo",
                                 "data:image/png;base64,aGVsbG8=\n", "data:image/png;base64,ééé="])
def test_data_url_with_bad_base64_is_refused(url: str) -> None:
    assert "does not hold valid base64" in refused(url, MediaFetchConfig())


@pytest.mark.parametrize("url", ["data:image/png,rawbytes", "data:image/png;base64", "data:base64,aGVsbG8="])
def test_data_url_must_be_base64(url: str) -> None:
    assert "data:<mime>;base64,<data>" in refused(url, MediaFetchConfig())


def test_data_url_size_limit_is_exact() -> None:
    config = MediaFetchConfig(max_media_bytes=LIMIT_BYTES)
    assert load(data_url(b"\x01" * LIMIT_BYTES), config) == b"\x01" * LIMIT_BYTES
    message = refused(data_url(b"\x01" * (LIMIT_BYTES + 1)), config)
    assert f"larger than the limit of {LIMIT_BYTES} bytes" in message and "CONVEYOR_MAX_MEDIA_BYTES" in message


def test_data_url_over_the_limit_is_refused_before_decoding() -> None:
    # Invalid base64 that is far too long: decoding first would report the bad base64, not the size.
    url = "data:image/png;base64," + "!" * (4 * LIMIT_BYTES)
    assert "larger than the limit" in refused(url, MediaFetchConfig(max_media_bytes=LIMIT_BYTES))


# --- file:// ---------------------------------------------------------------------------------------------------

@pytest.fixture
def media_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(allowed folder holding image.png, sub/ and a symlink escaping it; a sibling folder holding secret.png)."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "image.png").write_bytes(PNG)
    (allowed / "my image.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(b"secret")
    (allowed / "escape.png").symlink_to(outside / "secret.png")
    (allowed / "inner-link.png").symlink_to(allowed / "image.png")
    return allowed, outside


def file_config(allowed: Path, max_media_bytes: int = LIMIT_BYTES * 10) -> MediaFetchConfig:
    return MediaFetchConfig(allowed_local_media_path=str(allowed), max_media_bytes=max_media_bytes)


def test_file_inside_the_allowed_folder_loads(media_dirs: tuple[Path, Path]) -> None:
    allowed, _ = media_dirs
    config = file_config(allowed)
    assert load(f"file://{allowed}/image.png", config) == PNG
    assert load(f"file://localhost{allowed}/image.png", config) == PNG
    assert load(f"file://{allowed}/sub/../image.png", config) == PNG  # `..` that stays inside is fine
    assert load(f"file://{allowed}/my%20image.png", config) == PNG
    assert load(f"file://{allowed}/inner-link.png", config) == PNG  # a symlink that stays inside is fine
    assert load(f"file://{allowed}/image.png", config, "video") == PNG


def test_file_outside_the_allowed_folder_is_refused(media_dirs: tuple[Path, Path]) -> None:
    allowed, outside = media_dirs
    config = file_config(allowed)
    for url in (f"file://{outside}/secret.png", f"file://{allowed}/../outside/secret.png",
                f"file://{allowed}/sub/../../outside/secret.png", f"file://{allowed}/%2e%2e/outside/secret.png",
                "file:///etc/passwd", f"file://{allowed}-sibling/x.png"):
        message = refused(url, config)
        assert "outside the folder allowed by --allowed-local-media-path" in message, url


def test_file_symlink_pointing_outside_is_refused_without_naming_its_target(media_dirs: tuple[Path, Path]) -> None:
    allowed, outside = media_dirs
    message = refused(f"file://{allowed}/escape.png", file_config(allowed))
    assert "outside the folder" in message
    assert str(outside) not in message


def test_file_outside_is_refused_whether_or_not_it_exists(media_dirs: tuple[Path, Path]) -> None:
    allowed, outside = media_dirs  # the same answer for both, so a client cannot probe the server's files
    config = file_config(allowed)
    assert (refused(f"file://{outside}/secret.png", config).replace("secret", "?")
            == refused(f"file://{outside}/missing.png", config).replace("missing", "?"))


def test_file_urls_need_the_allowed_folder(media_dirs: tuple[Path, Path]) -> None:
    allowed, _ = media_dirs
    message = refused(f"file://{allowed}/image.png", MediaFetchConfig())
    assert "--allowed-local-media-path" in message and str(allowed) not in message


def test_file_must_be_an_existing_regular_file(media_dirs: tuple[Path, Path]) -> None:
    allowed, _ = media_dirs
    config = file_config(allowed)
    assert "is not a regular file" in refused(f"file://{allowed}/sub", config)
    assert "is not a regular file" in refused(f"file://{allowed}", config)
    assert "does not exist" in refused(f"file://{allowed}/missing.png", config)
    assert "does not exist" in refused(f"file://{allowed}/image.png/deeper", config)


def test_file_fifo_is_refused_without_blocking(media_dirs: tuple[Path, Path]) -> None:
    allowed, _ = media_dirs
    os.mkfifo(allowed / "pipe")
    assert "is not a regular file" in refused(f"file://{allowed}/pipe", file_config(allowed))


def test_file_size_limit(media_dirs: tuple[Path, Path]) -> None:
    allowed, _ = media_dirs
    (allowed / "exact.bin").write_bytes(b"x" * LIMIT_BYTES)
    (allowed / "large.bin").write_bytes(b"x" * (LIMIT_BYTES + 1))
    config = file_config(allowed, max_media_bytes=LIMIT_BYTES)
    assert load(f"file://{allowed}/exact.bin", config) == b"x" * LIMIT_BYTES
    assert f"larger than the limit of {LIMIT_BYTES} bytes" in refused(f"file://{allowed}/large.bin", config)


@pytest.mark.parametrize("url", ["file:image.png", "file://example.com/image.png", "file://", "file:///a%00b"])
def test_file_url_must_name_an_absolute_local_path(url: str, media_dirs: tuple[Path, Path]) -> None:
    allowed, _ = media_dirs
    assert "must name an absolute local path" in refused(url, file_config(allowed))


# --- other schemes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["ftp://127.0.0.1/image.png", "/etc/passwd", "image.png", "javascript:alert(1)",
                                 "gopher://x", " http://127.0.0.1/", "C:\\images\\a.png"])
def test_unsupported_urls_are_refused(url: str) -> None:
    message = refused(url, MediaFetchConfig(allowed_local_media_path="/"))
    assert message.startswith("unsupported image URL") and repr(url) in message


def test_empty_url_is_refused() -> None:
    assert refused("", MediaFetchConfig(), "video") == "the video URL is empty"


def test_long_urls_are_shortened_in_messages() -> None:
    message = refused("ftp://" + "a" * 10_000, MediaFetchConfig())
    assert len(message) < 300


# --- http(s):// ------------------------------------------------------------------------------------------------

def test_http_fetch_returns_the_body(base_url: str, http_config: MediaFetchConfig) -> None:
    assert load(f"{base_url}/image.png", http_config) == PNG
    assert load(f"{base_url}/image.png", http_config, "video") == PNG
    assert load(f"{base_url}/exact", http_config) == b"x" * LIMIT_BYTES


def test_any_host_is_allowed_without_a_domain_list(base_url: str) -> None:
    config = MediaFetchConfig(max_media_bytes=LIMIT_BYTES)
    assert load(base_url.replace("127.0.0.1", "localhost") + "/image.png", config) == PNG
    assert load(f"{base_url}/redirect-out", config) == PNG


def test_redirects_inside_the_allowed_domains_are_followed(base_url: str, http_config: MediaFetchConfig) -> None:
    assert load(f"{base_url}/redirect", http_config) == PNG
    assert load(f"{base_url}/redirect-absolute", http_config) == PNG  # two hops


def test_host_outside_the_allowed_domains_is_refused(base_url: str, http_config: MediaFetchConfig) -> None:
    message = refused(base_url.replace("127.0.0.1", "localhost") + "/image.png", http_config)
    assert "has host 'localhost'" in message and "--allowed-media-domains" in message


def test_domain_match_ignores_case(base_url: str) -> None:
    config = MediaFetchConfig(allowed_media_domains=("LocalHost",), max_media_bytes=LIMIT_BYTES)
    assert load(base_url.replace("127.0.0.1", "LOCALhost") + "/image.png", config) == PNG


def test_empty_domain_list_allows_no_host(base_url: str) -> None:
    assert "--allowed-media-domains" in refused(f"{base_url}/image.png", MediaFetchConfig(allowed_media_domains=()))


def test_redirect_out_of_the_allowed_domains_is_refused(base_url: str, http_config: MediaFetchConfig) -> None:
    message = refused(f"{base_url}/redirect-out", http_config)
    assert "redirected to" in message and "has host 'localhost'" in message and "--allowed-media-domains" in message


def test_redirect_to_a_file_url_is_refused(base_url: str) -> None:
    message = refused(f"{base_url}/redirect-file", MediaFetchConfig(allowed_local_media_path="/"))
    assert "redirected to 'file:///etc/passwd'" in message and "not an http(s) URL" in message


def test_redirect_loop_stops_after_five_hops(base_url: str, http_config: MediaFetchConfig) -> None:
    assert "more than 5 redirects" in refused(f"{base_url}/loop", http_config)


def test_non_2xx_is_refused(base_url: str, http_config: MediaFetchConfig) -> None:
    assert "HTTP 404" in refused(f"{base_url}/missing", http_config)


def test_slow_server_times_out_with_the_kinds_timeout(base_url: str) -> None:
    config = MediaFetchConfig(image_fetch_timeout_s=SHORT_TIMEOUT_S, video_fetch_timeout_s=SLOW_S * 5)
    started = time.monotonic()
    message = refused(f"{base_url}/slow", config)
    assert time.monotonic() - started < SLOW_S
    assert f"took longer than {SHORT_TIMEOUT_S:g} s" in message and "VLLM_IMAGE_FETCH_TIMEOUT" in message
    assert load(f"{base_url}/slow", config, "video") == PNG


def test_body_over_the_limit_is_refused(base_url: str, http_config: MediaFetchConfig) -> None:
    assert f"larger than the limit of {LIMIT_BYTES} bytes" in refused(f"{base_url}/large", http_config)


def test_declared_length_over_the_limit_is_refused_up_front(base_url: str, http_config: MediaFetchConfig) -> None:
    started = time.monotonic()
    assert "larger than the limit" in refused(f"{base_url}/large-declared", http_config)
    assert time.monotonic() - started < SLOW_S  # it did not wait for the body


def test_streamed_body_is_cut_off_at_the_limit(base_url: str, http_config: MediaFetchConfig) -> None:
    started = time.monotonic()
    assert "larger than the limit" in refused(f"{base_url}/endless", http_config)
    assert time.monotonic() - started < SLOW_S * 1.5


def test_compressed_body_is_refused(base_url: str) -> None:
    assert "compressed (gzip)" in refused(f"{base_url}/gzip", MediaFetchConfig())


def test_connection_failure_is_a_media_fetch_error() -> None:
    with socket_port() as port:  # bound but never listening: the connection is refused
        message = refused(f"http://127.0.0.1:{port}/image.png", MediaFetchConfig())
    assert message.startswith("could not fetch the image from") and "ConnectError" in message


@pytest.mark.parametrize("url", ["http://", "https:///path", "http://[::1/x"])
def test_http_url_without_a_valid_host_is_refused(url: str) -> None:
    message = refused(url, MediaFetchConfig())
    assert "not a valid URL" in message or "not an http(s) URL with a host" in message

