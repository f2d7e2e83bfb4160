"""fleetctl's HTTP client for the control socket: http.client over an AF_UNIX stream socket.

Standard library only (``fleetctl status`` must start in well under 150 ms, Python included):
no aiohttp, no pydantic. Every failure a user can cause or meet becomes a ``ClientError``
carrying fleetctl's exit code and one clear message, never a traceback:

- the socket is missing, refuses, or is not ours to open -> exit 3 with what to do about it;
- the daemon answers with an ``ErrorBody`` -> exit 1 with its message and stable code;
- the daemon answers something that is not the API's shape -> exit 1, "malformed response".
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from types import UnionType

    from fleetd.api.schemas import ActionResult, EventJson, Explain, Status

EXIT_OK = 0
EXIT_FAILED = 1  # the daemon refused, the operation failed, or its answer was malformed
EXIT_USAGE = 2  # argparse's own code for bad usage
EXIT_UNREACHABLE = 3  # no socket, nobody listening, permission denied, no answer in time
EXIT_WAIT_TIMEOUT = 4  # --wait ran out of time
EXIT_INTERRUPTED = 130  # Ctrl-C

_START_HINT = "start it with `systemctl start fleetd` or `fleetd demo`, or pass --socket"


class ClientError(Exception):
    """A failure to report to the user: fleetctl's exit code, a message, the daemon's code."""

    def __init__(self, exit_code: int, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message
        self.code = code  # ErrorBody.error.code when the daemon refused


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP/1.1 connection whose transport is a Unix stream socket at ``socket_path``."""

    def __init__(self, socket_path: str, *, timeout_s: float | None) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self.socket_path = socket_path
        # Kept apart from ``self.sock``, which http.client drops when a response closes the
        # connection: a stream reader in another thread is woken by shutting this one down.
        self.unix_sock: socket.socket | None = None

    def connect(self) -> None:
        """Connect to the Unix socket instead of a TCP host."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = self.unix_sock = sock


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)  # noqa: PTH116 - pathlib: start-up time
    except OSError:
        return True  # cannot tell: say what connect() said


def connect_error(path: str, exc: OSError, *, timeout_s: float) -> ClientError:
    """The message (exit 3) for a socket that cannot be reached, saying what to do."""
    if isinstance(exc, FileNotFoundError):
        msg = f"fleetd is not running (no socket at {path}); {_START_HINT}"
    elif isinstance(exc, ConnectionRefusedError) and not _is_socket(path):
        msg = f"{path} is not a socket: is --socket (or $FLEETD_SOCKET) right?"
    elif isinstance(exc, ConnectionRefusedError):
        msg = f"nobody is listening on {path} (a stale socket: fleetd is not running?); "
        msg += _START_HINT
    elif isinstance(exc, PermissionError):
        msg = (
            f"permission denied on {path}: add yourself to the socket's group "
            f"(ls -l {path} shows it) or use sudo"
        )
    elif isinstance(exc, TimeoutError):
        msg = f"fleetd did not answer on {path} within {timeout_s:g} s (--timeout)"
    else:
        msg = f"cannot reach fleetd at {path}: {exc.strerror or exc}"
    return ClientError(EXIT_UNREACHABLE, msg)


def error_from_body(status: int, reason: str, body: bytes) -> ClientError:
    """The ClientError (exit 1) for a non-2xx answer, from its ErrorBody when it has one."""
    with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
        detail = json.loads(body)["error"]
        message, code = detail["message"], detail["code"]
        if isinstance(message, str) and isinstance(code, str):
            return ClientError(EXIT_FAILED, message, code=code)
    snippet = body[:200].decode("utf-8", "replace").strip()
    return ClientError(
        EXIT_FAILED, f"fleetd answered HTTP {status} {reason} without an error body: {snippet!r}"
    )


def malformed(what: str, detail: str) -> ClientError:
    """The ClientError (exit 1) for an answer that does not follow the API's shapes."""
    return ClientError(EXIT_FAILED, f"malformed response from fleetd ({what}): {detail}")


def _check_object(doc: object, what: str, keys: Mapping[str, type | UnionType]) -> None:
    """Check the top level of an answer; deeper fields are checked where they are used."""
    if not isinstance(doc, dict):
        raise malformed(what, f"expected a JSON object, got {type(doc).__name__}")
    for key, kind in keys.items():
        if not isinstance(doc.get(key), kind):
            raise malformed(what, f"field {key!r} is missing or of the wrong type")


def _json_error(what: str, exc: ValueError) -> ClientError:
    return malformed(what, f"not JSON ({exc})")


class Stream:
    """A streamed answer (NDJSON events, log text) that one thread reads and another may close."""

    def __init__(
        self, conn: UnixHTTPConnection, resp: http.client.HTTPResponse, *, what: str
    ) -> None:
        self._conn = conn
        self._resp = resp
        self.what = what

    def _fail(self, exc: Exception) -> ClientError:
        if isinstance(exc, http.client.IncompleteRead | ValueError):
            return ClientError(EXIT_UNREACHABLE, f"fleetd closed the stream ({self.what})")
        return ClientError(EXIT_UNREACHABLE, f"lost the connection to fleetd ({self.what}): {exc}")

    def chunks(self) -> Iterator[bytes]:
        """The body as it arrives."""
        while True:
            try:
                data = self._resp.read1(65536)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise self._fail(exc) from None
            if not data:
                return
            yield data

    def lines(self) -> Iterator[bytes]:
        """The body line by line (blank lines, e.g. keep-alives, skipped)."""
        while True:
            try:
                line = self._resp.readline()
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise self._fail(exc) from None
            if not line:
                return
            if line.strip():
                yield line

    def events(self) -> Iterator[tuple[EventJson, bytes]]:
        """Each NDJSON line as an event, with its raw line for ``--json``."""
        for line in self.lines():
            try:
                event: EventJson = json.loads(line)
            except ValueError as exc:
                raise _json_error(self.what, exc) from None
            _check_object(event, self.what, {"seq": int, "ts": int | float, "kind": str})
            _check_object(event, self.what, {"message": str})
            yield event, line.strip()

    def close(self) -> None:
        """Stop the stream; safe from another thread while one is blocked reading it."""
        sock = self._conn.unix_sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._resp.close()
        self._conn.close()
        if sock is not None:
            sock.close()


class Client:
    """Requests to fleetd's control API at ``socket_path``; each call is its own connection."""

    def __init__(self, socket_path: str, *, timeout_s: float) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s

    def _open(
        self, method: str, path: str, body: Mapping[str, object] | None
    ) -> tuple[UnixHTTPConnection, http.client.HTTPResponse]:
        conn = UnixHTTPConnection(self.socket_path, timeout_s=self.timeout_s)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise connect_error(self.socket_path, exc, timeout_s=self.timeout_s) from None
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
        except TimeoutError as exc:
            conn.close()
            raise connect_error(self.socket_path, exc, timeout_s=self.timeout_s) from None
        except http.client.RemoteDisconnected:
            conn.close()
            raise ClientError(
                EXIT_UNREACHABLE, f"fleetd closed the connection without answering {method} {path}"
            ) from None
        except OSError as exc:
            conn.close()
            msg = f"lost the connection to fleetd at {self.socket_path}: {exc.strerror or exc}"
            raise ClientError(EXIT_UNREACHABLE, msg) from None
        except http.client.HTTPException as exc:
            conn.close()
            raise malformed(f"{method} {path}", f"not HTTP ({exc!r})") from None
        return conn, resp

    def _call(self, method: str, path: str, body: Mapping[str, object] | None = None) -> bytes:
        conn, resp = self._open(method, path, body)
        try:
            data = resp.read()
        except TimeoutError as exc:
            raise connect_error(self.socket_path, exc, timeout_s=self.timeout_s) from None
        except (OSError, http.client.HTTPException) as exc:
            raise malformed(f"{method} {path}", f"incomplete answer ({exc!r})") from None
        finally:
            conn.close()
        if not 200 <= resp.status < 300:
            raise error_from_body(resp.status, resp.reason, data)
        return data

    def status(self) -> Status:
        """GET /v1/status."""
        what = "GET /v1/status"
        body = self._call("GET", "/v1/status")
        try:
            status: Status = json.loads(body)
        except ValueError as exc:
            raise _json_error(what, exc) from None
        _check_object(status, what, {"gpus": list, "workers": list, "pending": list})
        _check_object(status, what, {"overrides": dict})
        return status

    def explain(self, path: str) -> Explain:
        """GET /v1/models/{model}/explain (``path`` already quoted)."""
        body = self._call("GET", path)
        try:
            explain: Explain = json.loads(body)
        except ValueError as exc:
            raise _json_error(f"GET {path}", exc) from None
        _check_object(explain, f"GET {path}", {"lines": list})
        return explain

    def action(self, path: str, body: Mapping[str, object]) -> ActionResult:
        """POST a mutating call; a refusal (non-2xx or ``ok: false``) raises ClientError."""
        what = f"POST {path}"
        data = self._call("POST", path, body)
        try:
            result: ActionResult = json.loads(data)
        except ValueError as exc:
            raise _json_error(what, exc) from None
        _check_object(result, what, {"ok": bool, "message": str, "event_seq": int})
        if not result["ok"]:
            raise ClientError(EXIT_FAILED, result["message"])
        return result

    def stream(self, path: str, *, follow: bool) -> Stream:
        """GET a streamed answer; with ``follow`` no read timeout applies after the headers."""
        conn, resp = self._open("GET", path, None)
        if not 200 <= resp.status < 300:
            try:
                data = resp.read()
            except (OSError, http.client.HTTPException):
                data = b""
            finally:
                conn.close()
            raise error_from_body(resp.status, resp.reason, data)
        if follow and conn.unix_sock is not None:
            conn.unix_sock.settimeout(None)
        return Stream(conn, resp, what=f"GET {path}")
