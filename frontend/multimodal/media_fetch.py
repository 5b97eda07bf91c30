"""Media URLs from untrusted requests -> raw bytes, under the operator's rules (the vLLM flags and env variables).

Accepted forms, everything else is refused:
```
data:<mime>;base64,<payload>   always; the decoded size counts against the byte limit
file:///abs/path               only with --allowed-local-media-path, and only inside that folder after
                               resolving symlinks and `..`; regular files only
http(s)://host/...             any host, or only hosts in --allowed-media-domains; every redirect hop is
                               checked again; one deadline (VLLM_IMAGE/VIDEO_FETCH_TIMEOUT) covers all hops
```
Every failure is a `MediaFetchError` whose message is safe to show the client: it names what the client sent
(shortened), never a resolved path, the allowed folder or a traceback.
"""
from __future__ import annotations

import asyncio
import binascii
import functools
import os
import re
import ssl
import stat
import urllib.parse
from base64 import b64decode
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import httpx

MediaKind = Literal["image", "video"]

IMAGE_FETCH_TIMEOUT_ENV = "VLLM_IMAGE_FETCH_TIMEOUT"
VIDEO_FETCH_TIMEOUT_ENV = "VLLM_VIDEO_FETCH_TIMEOUT"
MAX_MEDIA_BYTES_ENV = "CONVEYOR_MAX_MEDIA_BYTES"
DEFAULT_IMAGE_FETCH_TIMEOUT_S = 5.0  # vLLM's defaults
DEFAULT_VIDEO_FETCH_TIMEOUT_S = 30.0
DEFAULT_MAX_MEDIA_BYTES = 64 << 20
MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_SHOWN_URL_CHARS = 100


class MediaFetchError(ValueError):
    """A media URL could not be loaded; `str(error)` is a user-facing message (callers answer 400)."""


@dataclass(frozen=True)
class MediaFetchConfig:
    """The operator's rules for media URLs.

    `allowed_media_domains`: None lets http(s) reach any host (vLLM's default); a tuple (even an empty one)
    allows exactly those hosts, compared case-insensitively and without ports.
    """

    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] | None = None
    image_fetch_timeout_s: float = DEFAULT_IMAGE_FETCH_TIMEOUT_S
    video_fetch_timeout_s: float = DEFAULT_VIDEO_FETCH_TIMEOUT_S
    max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES

    def __post_init__(self) -> None:
        if self.image_fetch_timeout_s <= 0 or self.video_fetch_timeout_s <= 0:
            raise ValueError("media fetch timeouts must be positive")
        if self.max_media_bytes <= 0:
            raise ValueError("max_media_bytes must be positive")

    @classmethod
    def from_env(cls, allowed_local_media_path: str | None = None,
                 allowed_media_domains: tuple[str, ...] | None = None,
                 environ: Mapping[str, str] | None = None) -> MediaFetchConfig:
        """The CLI values plus the timeouts and byte limit from the environment. Raises ValueError (at startup)
        for an unreadable env value or an allowed folder that is not a directory."""
        env = os.environ if environ is None else environ
        if allowed_local_media_path is not None and not os.path.isdir(allowed_local_media_path):
            raise ValueError(f"--allowed-local-media-path {allowed_local_media_path!r} is not a directory")
        return cls(allowed_local_media_path=allowed_local_media_path,
                   allowed_media_domains=allowed_media_domains,
                   image_fetch_timeout_s=_env_number(env, IMAGE_FETCH_TIMEOUT_ENV, DEFAULT_IMAGE_FETCH_TIMEOUT_S),
                   video_fetch_timeout_s=_env_number(env, VIDEO_FETCH_TIMEOUT_ENV, DEFAULT_VIDEO_FETCH_TIMEOUT_S),
                   max_media_bytes=int(_env_number(env, MAX_MEDIA_BYTES_ENV, DEFAULT_MAX_MEDIA_BYTES, whole=True)))

    def fetch_timeout_s(self, kind: MediaKind) -> float:
        return self.image_fetch_timeout_s if kind == "image" else self.video_fetch_timeout_s


def _env_number(env: Mapping[str, str], name: str, default: float, whole: bool = False) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw) if whole else float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not {'an integer' if whole else 'a number'}") from None


async def load_media_bytes(url: str, kind: MediaKind, config: MediaFetchConfig) -> bytes:
    """The bytes behind one image or video URL (data:, file:// or http(s)://), at most `config.max_media_bytes`.

    Raises MediaFetchError, with a message for the client, for any URL the rules refuse or that cannot be read.
    """
    match = _SCHEME.match(url)
    scheme = url[:match.end()].lower() if match and url[match.end():match.end() + 1] == ":" else ""
    if scheme == "data":
        return _decode_data_url(url, kind, config.max_media_bytes)
    if scheme == "file":
        given, real = _local_path(url, kind, config.allowed_local_media_path)
        return await asyncio.to_thread(_read_local_file, real, given, kind, config.max_media_bytes)
    if scheme in ("http", "https"):
        return await _fetch_http(url, kind, config)
    if not url:
        raise MediaFetchError(f"the {kind} URL is empty")
    raise MediaFetchError(f"unsupported {kind} URL {_shown(url)}: use http(s)://, data:<mime>;base64,<data> "
                          "or file:// (when the server allows local media)")


def _shown(url: str) -> str:
    """The client's own URL, quoted and cut short enough for an error message."""
    cut = url if len(url) <= _SHOWN_URL_CHARS else url[:_SHOWN_URL_CHARS] + "..."
    return repr(cut)


def _too_large(kind: MediaKind, max_bytes: int) -> MediaFetchError:
    return MediaFetchError(f"the {kind} is larger than the limit of {max_bytes} bytes ({MAX_MEDIA_BYTES_ENV})")


# --- data: ---------------------------------------------------------------------------------------------------

def _decode_data_url(url: str, kind: MediaKind, max_bytes: int) -> bytes:
    header, comma, payload = url[len("data:"):].partition(",")
    _, semicolon, encoding = header.rpartition(";")
    if not comma or not semicolon or encoding.strip().lower() != "base64":
        raise MediaFetchError(f"the {kind} data URL must have the form data:<mime>;base64,<data>")
    # 4 base64 characters carry 3 bytes, less at most 2 of padding: refuse before allocating the decoded copy.
    if len(payload) // 4 * 3 - 2 > max_bytes:
        raise _too_large(kind, max_bytes)
    try:
        data = b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: non-ASCII characters
        raise MediaFetchError(f"the {kind} data URL does not hold valid base64 ({exc})") from None
    if len(data) > max_bytes:
        raise _too_large(kind, max_bytes)
    return data


# --- file:// -------------------------------------------------------------------------------------------------

def _local_path(url: str, kind: MediaKind, allowed_folder: str | None) -> tuple[str, str]:
    """A file:// URL's path as given and as resolved (checked to lie inside `allowed_folder`)."""
    if allowed_folder is None:
        raise MediaFetchError(f"cannot load a local {kind} file: the server was not started with "
                              "--allowed-local-media-path")
    parts = urllib.parse.urlsplit(url)
    given = urllib.parse.unquote(parts.path)
    if parts.netloc not in ("", "localhost") or not given.startswith("/") or "\x00" in given:
        raise MediaFetchError(f"the {kind} file URL {_shown(url)} must name an absolute local path "
                              "(file:///path/to/file)")
    root = os.path.realpath(allowed_folder)
    real = os.path.realpath(given)  # symlinks and `..` resolved, so neither can step out of the folder
    if os.path.commonpath([root, real]) != root:
        raise MediaFetchError(f"the {kind} file {given!r} is outside the folder allowed by "
                              "--allowed-local-media-path")
    return given, real


def _read_local_file(real_path: str, given: str, kind: MediaKind, max_bytes: int) -> bytes:
    """Read a resolved path (blocking; run in a thread); messages name only the path the client gave.
    O_NOFOLLOW: a symlink swapped in after the check is refused; O_NONBLOCK: opening a FIFO does not hang (it is
    then refused as not a regular file)."""
    shown = repr(given)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real_path, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise MediaFetchError(f"the {kind} file {shown} does not exist") from None
    except OSError as exc:
        raise MediaFetchError(f"cannot open the {kind} file {shown} ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MediaFetchError(f"the {kind} file {shown} is not a regular file")
        if info.st_size > max_bytes:
            raise _too_large(kind, max_bytes)
        data = _read_at_most(fd, max_bytes + 1)  # +1: a file that grew after fstat is still caught
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise _too_large(kind, max_bytes)
    return data


def _read_at_most(fd: int, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    remaining = max_bytes
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


# --- http(s):// ----------------------------------------------------------------------------------------------

async def _fetch_http(url: str, kind: MediaKind, config: MediaFetchConfig) -> bytes:
    timeout_s = config.fetch_timeout_s(kind)
    env = IMAGE_FETCH_TIMEOUT_ENV if kind == "image" else VIDEO_FETCH_TIMEOUT_ENV
    try:
        return await asyncio.wait_for(_follow_redirects(url, kind, config, timeout_s), timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise MediaFetchError(f"fetching the {kind} from {_shown(url)} took longer than {timeout_s:g} s "
                              f"({env})") from None
    except httpx.HTTPError as exc:
        raise MediaFetchError(f"could not fetch the {kind} from {_shown(url)} ({type(exc).__name__})") from None


async def _follow_redirects(url: str, kind: MediaKind, config: MediaFetchConfig, timeout_s: float) -> bytes:
    """GET with redirects followed by hand, so each hop's host is checked before we connect to it."""
    target = _checked_http_url(url, kind, config.allowed_media_domains)
    # A fresh client per fetch: cookies one site sets must not travel with another request's fetch.
    async with httpx.AsyncClient(verify=_ssl_context(), timeout=timeout_s, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            # identity: a compressed body could expand far past the byte limit inside one decoded chunk.
            async with client.stream("GET", target, headers={"Accept-Encoding": "identity"}) as response:
                location = response.headers.get("location")
                if response.status_code in _REDIRECT_STATUSES and location:
                    target = _checked_http_url(url, kind, config.allowed_media_domains, (response.url, location))
                    continue
                if not response.is_success:
                    raise MediaFetchError(f"fetching the {kind} from {_shown(url)} failed: the server answered "
                                          f"HTTP {response.status_code}")
                return await _read_body(response, url, kind, config.max_media_bytes)
    raise MediaFetchError(f"fetching the {kind} from {_shown(url)} failed: more than {MAX_REDIRECTS} redirects")


def _checked_http_url(url: str, kind: MediaKind, allowed_domains: tuple[str, ...] | None,
                      redirect: tuple[httpx.URL, str] | None = None) -> httpx.URL:
    """The client's `url`, or the `redirect` (the answering URL and its Location header) met while fetching it,
    parsed once by httpx: the host we check is the host httpx connects to (no parser disagreement over `\\`,
    `@` or `#` tricks)."""
    redirected = "" if redirect is None else f" redirected to {_shown(redirect[1])}, which"
    try:
        parsed = httpx.URL(url) if redirect is None else redirect[0].join(redirect[1])
    except (httpx.InvalidURL, ValueError, TypeError):
        raise MediaFetchError(f"the {kind} URL {_shown(url)}{redirected} is not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise MediaFetchError(f"the {kind} URL {_shown(url)}{redirected} is not an http(s) URL with a host")
    if allowed_domains is not None:
        host_names = {parsed.host.lower(), parsed.raw_host.decode("ascii", "replace").lower()}  # unicode, IDNA
        if host_names.isdisjoint(domain.lower() for domain in allowed_domains):
            raise MediaFetchError(f"the {kind} URL {_shown(url)}{redirected} has host {parsed.host!r}; that "
                                  "host is not in the server's --allowed-media-domains")
    return parsed


async def _read_body(response: httpx.Response, url: str, kind: MediaKind, max_bytes: int) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise MediaFetchError(f"fetching the {kind} from {_shown(url)} failed: the server sent it compressed "
                              f"({encoding}) although asked not to")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:  # refuse before reading anything
        raise _too_large(kind, max_bytes)
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > max_bytes:  # leaving the stream's context closes the connection mid-body
            raise _too_large(kind, max_bytes)
    return bytes(body)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """Built once: loading the CA bundle costs milliseconds per client otherwise."""
    return httpx.create_ssl_context()
