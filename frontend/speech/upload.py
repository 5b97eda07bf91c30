"""multipart/form-data uploads read from the raw body stream, with a size limit enforced while reading.

FastAPI's `Form()`/`File()` would spool the whole body before the handler runs; here the limit is checked on the
Content-Length header before reading anything, and counted on the file part while the body streams in, so an
over-limit upload is refused without ever holding it. An over-limit body is still read to its end (and thrown
away) when it is at most `_DRAIN_FACTOR` x the limit: HTTP/1.1 clients that do not send `Expect: 100-continue`
(httpx, the openai package) only read the answer after sending everything, and a connection closed under them
shows up as a network error instead of the 413.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from python_multipart.exceptions import ParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from frontend.errors import APIError, BadRequestError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_FILE_SIZE_ENV = "VLLM_MAX_AUDIO_CLIP_FILESIZE_MB"
DEFAULT_MAX_FILE_SIZE_MB = 25.0
MAX_FIELD_BYTES = 1 << 20  # a text field (prompt, language, ...) larger than this is not a form field
_FORM_OVERHEAD_BYTES = 4 * MAX_FIELD_BYTES  # boundaries, part headers and the text fields around the file
_DRAIN_FACTOR = 4


class PayloadTooLargeError(APIError):
    status_code = 413


def max_file_bytes() -> int:
    """VLLM_MAX_AUDIO_CLIP_FILESIZE_MB (default 25) in bytes; read per request so tests can change it."""
    raw = os.environ.get(MAX_FILE_SIZE_ENV, "")
    try:
        megabytes = float(raw) if raw.strip() else DEFAULT_MAX_FILE_SIZE_MB
    except ValueError:
        megabytes = DEFAULT_MAX_FILE_SIZE_MB
    return int(megabytes * 1024 * 1024)


def too_large(limit: int, what: str = "the audio file") -> PayloadTooLargeError:
    return PayloadTooLargeError(f"{what} is larger than the maximum of {limit / 2**20:g} MB "
                                f"({MAX_FILE_SIZE_ENV})", param="file", code="file_too_large")


@dataclass
class UploadedForm:
    """Text fields (every value, in order) and the one file part."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    file: bytes | None = None
    filename: str | None = None

    def values(self, list_fields: tuple[str, ...] = ()) -> dict[str, Any]:
        """One value per field (the last one given), except `list_fields`, which keep every value."""
        return {name: values if name in list_fields else values[-1] for name, values in self.fields.items()}


class _FormCollector:
    """python-multipart callbacks that collect one form; raise as soon as the file part passes `file_limit`."""

    def __init__(self, file_field: str, file_limit: int) -> None:
        self.form = UploadedForm()
        self.file_field = file_field
        self.file_limit = file_limit
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._name: str | None = None
        self._filename: str | None = None
        self._data = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field_data,
                "on_header_value": self._header_value_data, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end}

    def _part_begin(self) -> None:
        self._headers.clear()
        self._data.clear()
        self._name, self._filename = None, None

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            raise BadRequestError("a multipart part has no name (Content-Disposition: form-data; name=...)")
        self._name = name.decode("utf-8", "replace")
        filename = options.get(b"filename")
        self._filename = None if filename is None else filename.decode("utf-8", "replace")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]
        is_file = self._name == self.file_field
        if is_file and len(self._data) > self.file_limit:
            raise too_large(self.file_limit)
        if not is_file and len(self._data) > MAX_FIELD_BYTES:
            raise BadRequestError(f"form field '{self._name}' is larger than {MAX_FIELD_BYTES} bytes",
                                  param=self._name)

    def _part_end(self) -> None:
        assert self._name is not None
        if self._name == self.file_field:
            if self.form.file is not None:
                raise BadRequestError(f"more than one '{self.file_field}' part in the form", param=self.file_field)
            self.form.file, self.form.filename = bytes(self._data), self._filename
        else:
            self.form.fields.setdefault(self._name, []).append(self._data.decode("utf-8", "replace"))
        self._data.clear()


async def read_form(request: Request, file_field: str = "file", file_limit: int | None = None) -> UploadedForm:
    """Parse a multipart/form-data body as it streams in. 413 (before reading, when Content-Length already says
    so) for a file part over `file_limit` (default: `max_file_bytes()`); 400 for anything that is not a form."""
    limit = max_file_bytes() if file_limit is None else file_limit
    body_limit = limit + _FORM_OVERHEAD_BYTES
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        await _drain(request, body_limit)
        raise BadRequestError("expected a multipart/form-data body with the audio in a 'file' part (as the openai "
                              f"client and `curl -F file=@audio.wav` send it), got {content_type.decode() or 'none'}",
                              param=file_field)
    declared = _content_length(request)
    if declared is not None and declared > body_limit:
        if declared <= _DRAIN_FACTOR * limit:  # else: not worth reading; the client sees the connection close
            await _drain(request, declared)
        raise too_large(limit)
    collector = _FormCollector(file_field, limit)
    parser = MultipartParser(options[b"boundary"], collector.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise too_large(limit)
            parser.write(chunk)
        parser.finalize()
    except APIError:
        await _drain(request, _DRAIN_FACTOR * limit)
        raise
    except ParseError as exc:
        raise BadRequestError(f"malformed multipart/form-data body: {exc}") from None
    if collector.form.file is None:
        raise BadRequestError(f"the form has no '{file_field}' part: upload the audio as the '{file_field}' field",
                              param=file_field)
    return collector.form


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise BadRequestError(f"invalid Content-Length header {raw!r}") from None


async def _drain(request: Request, max_bytes: int) -> None:
    """Read and discard the rest of the body (at most `max_bytes`), so the client gets to read our answer."""
    if max_bytes <= 0:
        return
    discarded = 0
    try:
        async for chunk in request.stream():
            discarded += len(chunk)
            if discarded > max_bytes:
                return
    except (ClientDisconnect, RuntimeError):  # RuntimeError: the stream was already consumed
        return
