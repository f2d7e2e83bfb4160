"""Alert hooks: events leave the host through exec hooks and webhooks, without slowing fleetd.

``AlertDispatcher`` reads its own bounded bus subscription (the bus drops the oldest events
when it is full) and never waits for a hook on that path: each delivery is a task the
dispatcher owns, at most ``MAX_IN_FLIGHT`` per hook, so a hook that hangs or fails costs a
slot and a log line, never a supervision step. Before a delivery starts, the hook's filter,
the dedup window and the per-minute rate limit may drop the event; every final outcome
(``Outcome``) goes to ``on_delivery`` for the metrics.

The dispatcher must not report through the bus: a failing hook would then raise a problem
event about itself, which fires the hook again. It reports through structlog and
``on_delivery`` only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import enum
import json
import os
import re
import signal
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog

from fleetd.obs.events import _is_problem

if TYPE_CHECKING:
    from collections.abc import Callable

    from fleetd.config import AlertHook, AlertsSpec
    from fleetd.obs.events import Event, EventBus, Subscription

_log = structlog.get_logger("fleetd.alerts")

MAX_IN_FLIGHT = 16  # deliveries per hook; more than this means the hook is stuck, not busy
_QUEUE_SIZE = 1024  # events waiting in the subscription; dispatching one takes microseconds
_RATE_WINDOW_S = 60.0
_BACKOFF_MAX_S = 300.0  # a cap on one retry delay; the config bounds initial delay, not growth
_DEDUP_PRUNE_AT = 4096  # dedup entries per hook before expired ones are swept
_OUTPUT_TAIL = 2048  # bytes of a failed exec hook's output kept for the log
_ENV_VALUE_MAX = 4096  # characters of a message put in the environment (the JSON has it all)
_SUBJECT_KEYS = ("worker", "gpu", "gpu_uuid", "model")
_ENV_FACTS = {
    "worker": "FLEETD_WORKER",
    "gpu": "FLEETD_GPU",
    "gpu_uuid": "FLEETD_GPU_UUID",
    "model": "FLEETD_MODEL",
}
_CRITICAL_WORDS = ("failed", "lost")  # worker.failed, gpu.lost: someone has to act now


class Outcome(enum.StrEnum):
    """How one event ended for one hook (the ``result`` given to ``on_delivery``)."""

    OK = "ok"
    FAILED = "failed"  # every attempt failed, or fleetd stopped before it got through
    DROPPED_RATE = "dropped_rate"  # over max_per_minute
    DROPPED_DEDUP = "dropped_dedup"  # same kind and subject within dedup_window_s
    DROPPED_BUSY = "dropped_busy"  # MAX_IN_FLIGHT deliveries of this hook still running


def matches(patterns: tuple[str, ...], kind: str) -> bool:
    """Whether a hook's ``events`` select ``kind``: exact, prefix ending in '.', or '*'."""
    for pattern in patterns:
        if pattern == "*":
            if _is_problem(kind):
                return True
        elif pattern.endswith("."):
            if kind.startswith(pattern):
                return True
        elif pattern == kind:
            return True
    return False


def subject(event: Event) -> str:
    """What the event is about, for deduplication: its worker, GPU or model ('' if none)."""
    for key in _SUBJECT_KEYS:
        value = event.fields.get(key)
        if value is not None:
            return f"{key}={value}"
    return ""


def severity(kind: str) -> str:
    """The alert severity: critical (act now), warning (other problems) or info (no problem)."""
    if not _is_problem(kind):
        return "info"
    return "critical" if any(word in kind for word in _CRITICAL_WORDS) else "warning"


def alert_name(kind: str) -> str:
    """``gpu.lost`` -> ``FleetdGpuLost`` (a valid Prometheus label value and readable)."""
    return "Fleetd" + "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", kind))


def alertmanager_alerts(event: Event, *, instance: str) -> list[dict[str, Any]]:
    """The event as an Alertmanager v2 ``postableAlerts`` body (POST /api/v2/alerts).

    Label and annotation values must be strings. No ``endsAt``: Alertmanager then resolves
    the alert after its ``resolve_timeout``, which suits a point-in-time event.
    """
    labels = {
        "alertname": alert_name(event.kind),
        "severity": severity(event.kind),
        "kind": event.kind,
        "instance": instance,
    }
    labels.update({key: str(event.fields[key]) for key in _ENV_FACTS if key in event.fields})
    facts = " ".join(f"{key}={value}" for key, value in event.fields.items())
    ts = event.ts or time.time()
    starts_at = dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")
    return [
        {
            "labels": labels,
            "annotations": {
                "summary": event.message,
                "description": f"{event.message} ({event.kind} #{event.seq} on {instance}"
                + (f"; {facts})" if facts else ")"),
            },
            "startsAt": starts_at.replace("+00:00", "Z"),
            "generatorURL": "",
        }
    ]


def exec_env(event: Event) -> dict[str, str]:
    """An exec hook's whole environment: PATH, LANG and HOME from fleetd, then the facts."""
    env = {"PATH": os.environ.get("PATH", os.defpath)}
    for name in ("LANG", "HOME"):
        if name in os.environ:
            env[name] = os.environ[name]
    env["FLEETD_EVENT_KIND"] = event.kind
    env["FLEETD_EVENT_MESSAGE"] = event.message[:_ENV_VALUE_MAX]
    env["FLEETD_EVENT_SEQ"] = str(event.seq)
    env["FLEETD_EVENT_SEVERITY"] = severity(event.kind)
    for key, name in _ENV_FACTS.items():
        if event.fields.get(key) is not None:
            env[name] = str(event.fields[key])[:_ENV_VALUE_MAX]
    return {k: v.replace("\0", "") for k, v in env.items()}  # execve refuses NUL bytes


def labels_for(hooks: tuple[AlertHook, ...]) -> tuple[str, ...]:
    """Short, stable names for hooks (log and metric labels); webhook secrets stay out."""
    labels: list[str] = []
    for hook in hooks:
        if hook.kind == "exec":
            base = f"exec:{hook.target}"
        else:  # only scheme and host: Slack-style URLs carry their token in the path
            url = urllib.parse.urlsplit(hook.target)
            base = f"webhook:{url.scheme}://{url.hostname}" + (f":{url.port}" if url.port else "")
        label, n = base, 1
        while label in labels:
            n += 1
            label = f"{base}#{n}"
        labels.append(label)
    return tuple(labels)


@dataclass
class _DropLog:
    """Counts drops and logs one warning per minute about them, not one per event."""

    event: str
    pending: int = 0
    logged_at: float | None = None

    def drop(self, now: float, count: int = 1, **context: Any) -> None:  # noqa: ANN401 - log context
        self.pending += count
        if self.logged_at is None or now - self.logged_at >= _RATE_WINDOW_S:
            self.flush(now, **context)

    def flush(self, now: float, **context: Any) -> None:  # noqa: ANN401 - log context
        if self.pending:
            _log.warning(self.event, dropped=self.pending, **context)
            self.pending = 0
            self.logged_at = now


@dataclass(eq=False)
class _Hook:
    """One hook and what the dispatcher remembers about it."""

    spec: AlertHook
    label: str
    accepted_at: collections.deque[float] = field(default_factory=collections.deque)
    fired_at: dict[tuple[str, str], float] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    rate_drops: _DropLog = field(default_factory=lambda: _DropLog("alerts.rate_limited"))
    busy_drops: _DropLog = field(default_factory=lambda: _DropLog("alerts.hook_busy"))


class AlertDispatcher:
    """Turns bus events into hook deliveries; owns the delivery tasks and the HTTP session."""

    def __init__(
        self,
        spec: AlertsSpec,
        bus: EventBus,
        *,
        clock: Callable[[], float] | None = None,
        on_delivery: Callable[[str, str], None] | None = None,
    ) -> None:
        self._spec = spec
        self._clock = clock or time.monotonic
        self._on_delivery = on_delivery
        self._hooks = [
            _Hook(hook, label)
            for hook, label in zip(spec.hooks, labels_for(spec.hooks), strict=True)
        ]
        # Subscribed now, not in run(): nothing emitted between construction and run is lost.
        self._sub: Subscription = bus.subscribe(maxsize=_QUEUE_SIZE)
        self._bus_drops = _DropLog("alerts.events_dropped")
        self._bus_dropped_seen = 0
        self._instance = socket.gethostname()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def hook_labels(self) -> tuple[str, ...]:
        """The label of every hook, in config order (for pre-creating metric series)."""
        return tuple(h.label for h in self._hooks)

    async def run(self) -> None:
        """Dispatch events from the subscription until cancelled."""
        while True:
            event = await self._sub.get()
            try:
                self._offer(event)
            except Exception:  # noqa: BLE001 - loop boundary: one bad event must not end alerting
                _log.exception("alerts.dispatch_error", kind=event.kind, seq=event.seq)

    async def aclose(self, *, grace_s: float = 0.0) -> None:
        """Stop delivering; in-flight deliveries are cancelled, exec hooks' groups killed.

        With ``grace_s``, events still queued are dispatched first and deliveries get up to
        that long to finish before the rest are cancelled.
        """
        if self._closed:
            return
        if grace_s > 0:
            while (event := self._sub.get_nowait()) is not None:
                self._offer(event)
        self._closed = True
        self._sub.close()
        tasks = [task for hook in self._hooks for task in hook.tasks]
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        now = self._clock()
        for hook in self._hooks:
            hook.rate_drops.flush(now, hook=hook.label)
            hook.busy_drops.flush(now, hook=hook.label)
        if self._session is not None:
            await self._session.close()

    # -- the bus path: synchronous, never waits ---------------------------------------------
    def _offer(self, event: Event) -> None:
        if self._closed:
            return
        now = self._clock()
        if self._sub.dropped > self._bus_dropped_seen:
            self._bus_drops.drop(now, self._sub.dropped - self._bus_dropped_seen)
            self._bus_dropped_seen = self._sub.dropped
        for hook in self._hooks:
            if matches(hook.spec.events, event.kind):
                outcome = self._admit(hook, event, now)
                if outcome is None:
                    self._start(hook, event)
                else:
                    self._report(hook.label, outcome)

    def _admit(self, hook: _Hook, event: Event, now: float) -> Outcome | None:
        """None when the event may go out now (and it is then counted as sent), else why not."""
        window = self._spec.dedup_window_s
        key = (event.kind, subject(event))
        last = hook.fired_at.get(key)
        if window > 0 and last is not None and now - last < window:
            return Outcome.DROPPED_DEDUP
        while hook.accepted_at and now - hook.accepted_at[0] >= _RATE_WINDOW_S:
            hook.accepted_at.popleft()
        if len(hook.accepted_at) >= self._spec.max_per_minute:
            hook.rate_drops.drop(now, hook=hook.label, max_per_minute=self._spec.max_per_minute)
            return Outcome.DROPPED_RATE
        if len(hook.tasks) >= MAX_IN_FLIGHT:
            hook.busy_drops.drop(now, hook=hook.label, in_flight=len(hook.tasks))
            return Outcome.DROPPED_BUSY
        hook.accepted_at.append(now)
        if window > 0:
            if len(hook.fired_at) >= _DEDUP_PRUNE_AT:
                hook.fired_at = {k: t for k, t in hook.fired_at.items() if now - t < window}
            hook.fired_at[key] = now
        return None

    def _start(self, hook: _Hook, event: Event) -> None:
        # Owned here and awaited in aclose(); the set keeps a reference until it is done.
        task = asyncio.get_running_loop().create_task(
            self._deliver(hook, event), name=f"alert:{hook.label}:{event.seq}"
        )
        hook.tasks.add(task)
        task.add_done_callback(hook.tasks.discard)

    def _report(self, label: str, outcome: Outcome) -> None:
        if self._on_delivery is None:
            return
        try:
            self._on_delivery(label, outcome.value)
        except Exception:  # noqa: BLE001 - boundary: a metrics bug must not stop alerts
            _log.exception("alerts.on_delivery_error", hook=label, outcome=outcome.value)

    # -- deliveries: one task each ------------------------------------------------------------
    async def _deliver(self, hook: _Hook, event: Event) -> None:
        outcome = Outcome.FAILED
        context = {"hook": hook.label, "kind": event.kind, "seq": event.seq}
        try:
            reason = await self._attempts(hook, event)
            if reason is None:
                outcome = Outcome.OK
                _log.debug("alerts.delivered", **context)
            else:
                attempts = hook.spec.retries + 1
                _log.warning("alerts.delivery_failed", reason=reason, attempts=attempts, **context)
        except asyncio.CancelledError:
            _log.warning(
                "alerts.delivery_failed", reason="cancelled: fleetd is stopping", **context
            )
            raise
        except Exception:  # noqa: BLE001 - loop boundary: one broken delivery must not end alerts
            _log.exception("alerts.delivery_error", **context)
        finally:
            self._report(hook.label, outcome)

    async def _attempts(self, hook: _Hook, event: Event) -> str | None:
        """Try, retrying with doubling delays; None on success, else the last reason."""
        body: Any = event.to_json()
        if hook.spec.kind == "webhook" and hook.spec.format == "alertmanager":
            body = alertmanager_alerts(event, instance=self._instance)
        payload = json.dumps(body, default=str).encode()
        reason: str | None = None
        for attempt in range(hook.spec.retries + 1):
            if attempt:
                delay_s = min(hook.spec.backoff_initial_s * 2 ** (attempt - 1), _BACKOFF_MAX_S)
                _log.info(
                    "alerts.retrying", hook=hook.label, reason=reason, attempt=attempt, in_s=delay_s
                )
                await asyncio.sleep(delay_s)
            if hook.spec.kind == "exec":
                reason = await _run_exec(hook.spec, payload, exec_env(event))
            else:
                reason = await self._post(hook.spec, payload)
            if reason is None:
                return None
        return reason

    async def _post(self, hook: AlertHook, payload: bytes) -> str | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        try:
            async with (
                asyncio.timeout(hook.timeout_s),
                self._session.post(
                    hook.target,
                    data=payload,
                    headers={"Content-Type": "application/json"},
                    allow_redirects=False,  # a redirected POST turns into a GET
                ) as resp,
            ):
                if 200 <= resp.status < 300:
                    return None
                text = (await resp.content.read(200)).decode(errors="replace")
                return f"HTTP {resp.status}" + (f": {text.strip()}" if text.strip() else "")
        except TimeoutError:
            return f"no answer within {hook.timeout_s:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"


async def _run_exec(hook: AlertHook, payload: bytes, env: dict[str, str]) -> str | None:
    """Run the hook in its own process group, event JSON on stdin; None when it exits 0.

    Its output is read to EOF, so a hook that leaves a background process holding stdout
    runs until the timeout and then loses its whole group, that process included.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            hook.target,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            process_group=0,
        )
    except OSError as exc:
        return f"cannot run {hook.target}: {exc.strerror or exc}"
    finished = False
    try:
        if proc.stdin is None or proc.stdout is None:  # both PIPE above; for the type checker
            raise RuntimeError("subprocess pipes missing")
        async with asyncio.timeout(hook.timeout_s):
            output, code = await asyncio.gather(
                _tail(proc.stdout), _feed(proc, proc.stdin, payload)
            )
        finished = True
    except TimeoutError:
        return f"timed out after {hook.timeout_s:g} s; process group killed"
    finally:
        if not finished:  # timed out or cancelled: the whole group goes, children included
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    if code == 0:
        return None
    tail = output.decode(errors="replace").strip()
    return f"exit {code}" + (f": {tail}" if tail else "")


async def _feed(
    proc: asyncio.subprocess.Process, stdin: asyncio.StreamWriter, payload: bytes
) -> int:
    """Write the event to stdin, close it, and wait for the exit code."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it need not read stdin
        stdin.write(payload)
        await stdin.drain()
    stdin.close()
    return await proc.wait()


async def _tail(stdout: asyncio.StreamReader) -> bytes:
    """The hook's output until EOF, keeping only the last _OUTPUT_TAIL bytes."""
    kept = bytearray()
    while chunk := await stdout.read(65536):
        kept += chunk
        del kept[:-_OUTPUT_TAIL]
    return bytes(kept)
