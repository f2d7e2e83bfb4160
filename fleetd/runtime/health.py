"""HTTP health probes against engine workers (one shared aiohttp session, short timeouts).

A probe answers a question with a ``ProbeResult``; it never raises for network trouble:
"connection refused" while an engine loads is an expected answer, not an error.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The answer to one probe."""

    ok: bool
    detail: str  # e.g. "200", "connection refused", "timeout after 2.0 s", "model not listed"
    body: Any = None  # parsed JSON when asked for


class HttpProbe:
    """Owns one client session for every probe fleetd makes."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True),
                auto_decompress=True,
            )
        return self._session

    async def get(self, url: str, *, timeout_s: float, want_json: bool = False) -> ProbeResult:
        """GET ``url``; ok when the status is 200 (and the body parses, with ``want_json``)."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self._client().get(url, allow_redirects=False) as resp:
                    raw = await resp.read()
                    if resp.status != 200:
                        return ProbeResult(ok=False, detail=f"HTTP {resp.status}")
                    if not want_json:
                        return ProbeResult(ok=True, detail="200")
                    return ProbeResult(ok=True, detail="200", body=json.loads(raw))
        except TimeoutError:
            return ProbeResult(ok=False, detail=f"no answer within {timeout_s:g} s")
        except aiohttp.ClientConnectorError as exc:
            reason = (
                "connection refused"
                if isinstance(exc.os_error, ConnectionRefusedError)
                else str(exc.os_error)
            )
            return ProbeResult(ok=False, detail=reason)
        except (aiohttp.ClientError, ValueError, OSError) as exc:
            return ProbeResult(ok=False, detail=f"{type(exc).__name__}: {exc}")

    async def get_text(self, url: str, *, timeout_s: float) -> str | None:
        """GET ``url`` and return the body as text when the status is 200, else None."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self._client().get(url, allow_redirects=False) as resp:
                    if resp.status != 200:
                        return None
                    return await resp.text(errors="replace")
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None

    async def post_json(
        self, url: str, payload: dict[str, Any], *, timeout_s: float
    ) -> ProbeResult:
        """POST JSON and parse a JSON answer (Ollama load/unload calls)."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self._client().post(url, json=payload) as resp:
                    raw = await resp.read()
                    try:
                        body = json.loads(raw) if raw else None
                    except ValueError:
                        body = raw.decode(errors="replace")
                    return ProbeResult(
                        ok=resp.status == 200, detail=f"HTTP {resp.status}", body=body
                    )
        except TimeoutError:
            return ProbeResult(ok=False, detail=f"no answer within {timeout_s:g} s")
        except (aiohttp.ClientError, OSError) as exc:
            return ProbeResult(ok=False, detail=f"{type(exc).__name__}: {exc}")

    async def aclose(self) -> None:
        """Close the session."""
        if self._session is not None:
            await self._session.close()
