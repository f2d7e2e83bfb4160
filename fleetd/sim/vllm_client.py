"""The API server's handle on its emulated engine-core child (vLLM's ``MPClient``, reduced).

Spawns ``python -m fleetd.sim.vllm engine-core VLLM::EngineCore --fd N`` in the API server's
own process group (as vLLM's children are), talks JSON lines over a socket pair, and notices
when the child dies. It never kills the child on its own initiative except on a crash or
when a normal shutdown does not finish: an API server that is SIGKILLed leaves the child
running, like real vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import fleetd
from fleetd.sim import vllm_spec

_PACKAGE_ROOT = str(Path(fleetd.__file__).resolve().parent.parent)  # for the child's sys.path


class EngineGone(Exception):  # noqa: N818 - mirrors vLLM's EngineDeadError, named for the fact
    """The engine-core process is gone (died, or never became ready)."""


class EngineCoreClient:
    """Owns the child process and the socket to it; its reader task ends with the child."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.exited = asyncio.Event()
        self.shutdown_requested = asyncio.Event()  # the engine core got SIGTERM/SIGINT itself
        self.shutdown_mode = "abort"

    @property
    def pid(self) -> int | None:
        """The engine core's pid (the one holding GPU memory)."""
        return self.proc.pid if self.proc else None

    async def start(self, spec: vllm_spec.EngineSpec) -> None:
        """Spawn the engine core and hand it its spec."""
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "fleetd.sim.vllm",
                "engine-core",
                vllm_spec.TITLE,
                "--fd",
                str(child_sock.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(child_sock.fileno(),),
                env=env,
            )
        finally:
            child_sock.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=parent_sock)
        self._writer.write(spec.to_line())
        await self._writer.drain()

    async def wait_ready(self) -> dict[str, Any] | None:
        """The ready message (memory plan), or None if the child exited first."""
        assert self._reader is not None
        while True:
            line = await self._reader.readline()
            if not line:
                await self.wait_exit()
                return None
            message = json.loads(line)
            if message.get("event") == "ready":
                return dict(message)

    async def run(self) -> None:
        """Route replies until the child closes the socket, then wait for it to exit."""
        assert self._reader is not None
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if message.get("event") == "shutdown_requested":
                    self.shutdown_mode = str(message.get("mode", "abort"))
                    self.shutdown_requested.set()
                    continue
                future = self._pending.pop(message.get("reply", -1), None)
                if future is not None and not future.done():
                    future.set_result(message)
        except ConnectionError:
            pass
        for future in self._pending.values():
            if not future.done():
                future.set_exception(EngineGone("engine core exited"))
        self._pending.clear()
        await self.wait_exit()

    async def wait_exit(self) -> int:
        """Wait for the child to exit; its exit code."""
        assert self.proc is not None
        code = await self.proc.wait()
        self.exited.set()
        return code

    async def call(self, op: str, **params: Any) -> dict[str, Any]:  # noqa: ANN401 - JSON
        """Send one request and await its reply; EngineGone if the child is gone."""
        if self._writer is None or self.exited.is_set():
            raise EngineGone("engine core exited")
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._writer.write((json.dumps({"op": op, "id": request_id, **params}) + "\n").encode())
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            self._pending.pop(request_id, None)
            raise EngineGone(str(exc)) from None
        return await future

    async def shutdown(self, timeout_s: float = 3.0) -> None:
        """Ask the child to release its memory and exit; kill it if it does not."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(EngineGone):
            async with asyncio.timeout(timeout_s):
                await self.call("shutdown")
        try:
            async with asyncio.timeout(timeout_s):
                await self.proc.wait()
        except TimeoutError:
            await self.kill()
        self.close()

    async def terminate(self) -> None:
        """SIGTERM the child and wait (start-up interrupted)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            await self.proc.wait()
        self.close()

    async def kill(self) -> None:
        """SIGKILL the child and wait (a crash of the whole engine)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        self.close()

    def close(self) -> None:
        """Close our end of the socket."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
