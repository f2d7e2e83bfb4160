"""fleetctl: the operators' command line for a running fleetd, over its control socket.

A thin client: the standard library, ``fleetd.api.schemas`` (types only) and the two
``fleetctl_*`` helper modules. It must never import the daemon's internals (aiohttp,
pydantic, rich, fleetd.config ...): ``fleetctl status`` has to answer in well under 150 ms,
Python's own start-up included. ``--json`` prints the API's JSON for scripts. Nothing a
user can cause ends in a traceback (FLEETD_DEBUG=1 shows one for a bug in fleetctl).

Exit codes:
  0    ok
  1    fleetd refused or the operation failed (its message and error code are printed),
       or fleetd's answer was malformed
  2    usage error
  3    fleetd is not reachable: no socket, nobody listening on it (stale socket),
       permission denied, or no answer within --timeout
  4    --wait ran out of time (fleetd carries on with the operation)
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import sys
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, NoReturn

from fleetd import __version__
from fleetd.cli import fleetctl_render as render
from fleetd.cli.fleetctl_client import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    EXIT_WAIT_TIMEOUT,
    Client,
    ClientError,
    Stream,
    malformed,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from fleetd.api.schemas import ActionResult, EventJson

DEFAULT_SOCKET = "/run/fleetd/control.sock"
ENV_SOCKET = "FLEETD_SOCKET"
DEFAULT_HTTP_TIMEOUT_S = 10.0
DEFAULT_WAIT_TIMEOUT_S = 600.0
POLL_INTERVAL_S = 0.5  # --wait reads /v1/status at most this often
_MALFORMED_DATA = (KeyError, TypeError, ValueError, AttributeError, IndexError)
ENV_DEBUG = "FLEETD_DEBUG"  # =1: show the traceback of an unexpected failure


@contextlib.contextmanager
def _reading(what: str) -> Iterator[None]:
    """Report daemon data that does not follow the schema as a malformed response (exit 1)."""
    try:
        yield
    except _MALFORMED_DATA as exc:
        raise malformed(what, f"{type(exc).__name__}: {exc}") from None


# --- --wait -----------------------------------------------------------------------------------


def _pump(stream: Stream, inbox: queue.Queue[EventJson | None]) -> None:
    """Thread body: move events from the followed stream into ``inbox``, None at its end."""
    try:
        for event, _raw in stream.events():
            inbox.put(event)
    # A thread's loop boundary: the stream is best effort (polling status decides), and it
    # ends by being closed under its feet; nothing may surface as a thread traceback.
    except Exception:  # noqa: BLE001, S110
        pass
    finally:
        inbox.put(None)


class _Watch:
    """--wait's loop: relevant events as they arrive, /v1/status at most every 0.5 s."""

    def __init__(self, client: Client, goal: render.Goal, *, quiet: bool) -> None:
        self.client = client
        self.goal = goal
        self.out = sys.stderr if quiet else sys.stdout
        self.inbox: queue.Queue[EventJson | None] = queue.Queue()
        self.stream: Stream | None = None
        self.pump: threading.Thread | None = None

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def follow_events(self, since_seq: int) -> None:
        """Start a thread that feeds the followed event stream into ``inbox``."""
        try:
            self.stream = self.client.stream(f"/v1/events?since={since_seq}&follow=1", follow=True)
        except ClientError as exc:
            if exc.exit_code == EXIT_UNREACHABLE:
                raise
            self.say(f"  (no event stream: {exc.message}; watching status only)")
            return
        self.pump = threading.Thread(
            target=_pump, args=(self.stream, self.inbox), name="events", daemon=True
        )
        self.pump.start()

    def show_events(self, until: float) -> None:
        """Print relevant events until the monotonic time ``until`` (those already in, at least)."""
        while True:
            try:
                event = self.inbox.get(timeout=max(until - time.monotonic(), 0))
            except queue.Empty:
                return
            if event is not None and self.goal.relevant(event):
                self.say("  " + render.render_event(event))

    def verdict(self, started: float) -> render.Verdict:
        status = self.client.status()
        with _reading("GET /v1/status"):
            return self.goal.verdict(status, time.monotonic() - started)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        if self.pump is not None:
            self.pump.join(timeout=2)


def wait_for(
    client: Client,
    goal: render.Goal,
    *,
    since_seq: int,
    started: float,
    timeout_s: float,
    quiet: bool,
) -> int:
    """Show progress until ``goal`` is met: 0; it failed: 1; ``timeout_s`` ran out: 4."""
    watch = _Watch(client, goal, quiet=quiet)
    deadline = started + timeout_s
    shown = ""
    try:
        watch.follow_events(since_seq)
        while True:
            verdict = watch.verdict(started)
            if isinstance(verdict, tuple):
                watch.show_events(0)  # what already arrived
                ok, message = verdict
                if not ok:
                    raise ClientError(EXIT_FAILED, message)
                watch.say(message)
                return EXIT_OK
            if verdict != shown:
                watch.say(f"  waiting: {verdict}")
                shown = verdict
            if time.monotonic() >= deadline:
                msg = f"timed out after {timeout_s:g} s waiting for {goal.label} ({verdict}); "
                msg += "fleetd carries on: see `fleetctl status`"
                raise ClientError(EXIT_WAIT_TIMEOUT, msg, code="timeout")
            watch.show_events(min(time.monotonic() + POLL_INTERVAL_S, deadline))
    finally:
        watch.close()


# --- commands ---------------------------------------------------------------------------------


def _q(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _colour() -> bool:
    return (
        sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    )


def _print_json(doc: object) -> None:
    print(json.dumps(doc, indent=2), flush=True)


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    """GPUs, workers, pending replicas and overrides."""
    status = client.status()
    if args.json:
        _print_json(status)
        return EXIT_OK
    width = shutil.get_terminal_size().columns
    with _reading("GET /v1/status"):
        lines = render.render_status(status, width=width, colour=_colour())
    print("\n".join(lines), flush=True)
    return EXIT_OK


def cmd_explain(client: Client, args: argparse.Namespace) -> int:
    """Why a model is where it is, or why it is pending."""
    explain = client.explain(f"/v1/models/{_q(args.model)}/explain")
    if args.json:
        _print_json(explain)
        return EXIT_OK
    width = shutil.get_terminal_size().columns
    with _reading("GET /v1/models/{model}/explain"):
        lines = render.render_explain(explain, width=width)
    print("\n".join(lines), flush=True)
    return EXIT_OK


def _stream_ended(what: str) -> ClientError:
    return ClientError(EXIT_UNREACHABLE, f"fleetd ended the {what} stream (did it stop?)")


def cmd_events(client: Client, args: argparse.Namespace) -> int:
    """Events as NDJSON (--json) or ``HH:MM:SS seq kind message``."""
    query = {"follow": "1" if args.follow else "0"}
    if args.since is not None:
        query["since"] = str(args.since)
    if args.kind:
        query["kind"] = args.kind
    stream = client.stream("/v1/events?" + urllib.parse.urlencode(query), follow=args.follow)
    try:
        for event, raw in stream.events():
            line = raw.decode() if args.json else render.render_event(event)
            print(line, flush=True)
    finally:
        stream.close()
    if args.follow:
        raise _stream_ended("event")
    return EXIT_OK


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    """A worker's log as raw text."""
    query = {"follow": "1" if args.follow else "0"}
    if args.lines is not None:
        query["lines"] = str(args.lines)
    path = f"/v1/workers/{_q(args.worker)}/logs?" + urllib.parse.urlencode(query)
    stream = client.stream(path, follow=args.follow)
    try:
        for chunk in stream.chunks():
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    finally:
        stream.close()
    if args.follow:
        raise _stream_ended("log")
    return EXIT_OK


def _act(
    client: Client, args: argparse.Namespace, path: str, body: dict[str, object]
) -> ActionResult:
    result = client.action(path, body)
    if args.json:
        _print_json(result)
    else:
        print(result["message"], flush=True)
    return result


def _then_wait(
    client: Client,
    args: argparse.Namespace,
    goal: render.Goal | None,
    result: ActionResult,
    started: float,
) -> int:
    if not args.wait or goal is None:
        return EXIT_OK
    return wait_for(
        client,
        goal,
        since_seq=result["event_seq"],
        started=started,
        timeout_s=args.wait_timeout,
        quiet=args.json,
    )


def cmd_scale(client: Client, args: argparse.Namespace) -> int:
    """Set a model's replica count."""
    started = time.monotonic()
    path = f"/v1/models/{_q(args.model)}/scale"
    result = _act(client, args, path, {"replicas": args.replicas})
    return _then_wait(client, args, render.Scaled(args.model, args.replicas), result, started)


def cmd_drain(client: Client, args: argparse.Namespace) -> int:
    """Stop routing to a worker, GPU or model, let in-flight requests finish, then stop it."""
    body: dict[str, object] = {"target": args.target, "name": args.name}
    if args.grace is not None:
        body["timeout_s"] = args.grace
    goal = None
    if args.wait:  # read before the request: which GPU the worker leaves
        before = client.status() if args.target == "worker" else None
        with _reading("GET /v1/status"):
            goal = render.drain_goal(args.target, args.name, before)
    started = time.monotonic()
    result = _act(client, args, "/v1/drain", body)
    return _then_wait(client, args, goal, result, started)


def cmd_undrain(client: Client, args: argparse.Namespace) -> int:
    """Lift a drain."""
    _act(client, args, "/v1/undrain", {"target": args.target, "name": args.name})
    return EXIT_OK


def cmd_cordon(client: Client, args: argparse.Namespace) -> int:
    """Place nothing new on a GPU (cordon) or allow it again (uncordon)."""
    _act(client, args, f"/v1/gpus/{_q(args.gpu)}/{args.command}", {})
    return EXIT_OK


def cmd_restart(client: Client, args: argparse.Namespace) -> int:
    """Restart one worker."""
    old_pid = None
    if args.wait:  # to tell the new process from the old one
        workers = client.status()["workers"]
        with _reading("GET /v1/status"):
            old_pid = next((w["pid"] for w in workers if w["name"] == args.worker), None)
    started = time.monotonic()
    result = _act(client, args, f"/v1/workers/{_q(args.worker)}/restart", {})
    return _then_wait(client, args, render.Restarted(args.worker, old_pid), result, started)


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    """Re-read the config (fleetd validates it first and keeps the running one on error)."""
    _act(client, args, "/v1/reload", {})
    return EXIT_OK


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "status": cmd_status,
    "explain": cmd_explain,
    "events": cmd_events,
    "logs": cmd_logs,
    "scale": cmd_scale,
    "drain": cmd_drain,
    "undrain": cmd_undrain,
    "cordon": cmd_cordon,
    "uncordon": cmd_cordon,
    "restart": cmd_restart,
    "reload": cmd_reload,
}


# --- arguments ----------------------------------------------------------------------------------


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _common(*, http_timeout: bool) -> _Parser:
    """Options every command also takes after its name (they then override the global ones)."""
    common = _Parser(add_help=False)
    sup = argparse.SUPPRESS
    common.add_argument("--socket", default=sup, help=sup)
    common.add_argument("--json", action="store_true", default=sup, help="print JSON")
    if http_timeout:
        common.add_argument("--timeout", dest="http_timeout", type=_seconds, default=sup, help=sup)
    return common


def _waiting(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--wait", action="store_true", help=f"show progress until {what}")
    parser.add_argument(
        "--timeout",
        dest="wait_timeout",
        type=_seconds,
        default=DEFAULT_WAIT_TIMEOUT_S,
        metavar="S",
        help="give up waiting after S seconds: exit 4 (default 600)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    doc = __doc__ or ""
    parser = _Parser(
        prog="fleetctl",
        description=doc.split("\n\n", 1)[0],
        epilog=doc[doc.find("Exit codes:") :] if "Exit codes:" in doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fleetctl {__version__}")
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help=f"fleetd's control socket (default: ${ENV_SOCKET}, else {DEFAULT_SOCKET})",
    )
    parser.add_argument(
        "--timeout",
        dest="http_timeout",
        type=_seconds,
        default=DEFAULT_HTTP_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for fleetd to answer (default 10)",
    )
    parser.add_argument("--json", action="store_true", help="print the API's JSON")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    plain = [_common(http_timeout=True)]
    waits = [_common(http_timeout=False)]

    sub.add_parser("status", parents=plain, help="GPUs, workers, pending models, overrides")
    explain = sub.add_parser("explain", parents=plain, help="why a model runs where it does")
    explain.add_argument("model")
    events = sub.add_parser("events", parents=plain, help="the event log (NDJSON with --json)")
    events.add_argument("--since", type=_count, metavar="SEQ", help="events after this seq")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    events.add_argument("--kind", metavar="PREFIX", help="only kinds starting with PREFIX")
    logs = sub.add_parser("logs", parents=plain, help="a worker's output")
    logs.add_argument("worker")
    logs.add_argument("--lines", "-n", type=_count, metavar="N", help="the last N lines")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new output")

    scale = sub.add_parser("scale", parents=waits, help="set a model's replica count")
    scale.add_argument("model")
    scale.add_argument("replicas", type=_count, metavar="N")
    _waiting(scale, "N replicas are ready (exit 1 if one stays pending)")
    targets = ("worker", "gpu", "model")
    drain = sub.add_parser("drain", parents=waits, help="finish in-flight requests, then stop")
    drain.add_argument("target", choices=targets)
    drain.add_argument("name", help="worker name, GPU index or UUID, or model name")
    drain.add_argument(
        "--grace", type=_seconds, metavar="S", help="bound on in-flight requests (fleetd's default)"
    )
    _waiting(drain, "nothing of the target runs")
    undrain = sub.add_parser("undrain", parents=plain, help="lift a drain")
    undrain.add_argument("target", choices=targets)
    undrain.add_argument("name")
    for verb, text in (("cordon", "place nothing new on a GPU"), ("uncordon", "lift a cordon")):
        cordon = sub.add_parser(verb, parents=plain, help=text)
        cordon.add_argument("gpu", help="GPU index or UUID")
    restart = sub.add_parser("restart", parents=waits, help="restart a worker")
    restart.add_argument("worker")
    _waiting(restart, "the worker is ready again (exit 1 if it fails)")
    sub.add_parser("reload", parents=plain, help="re-read the config (validated first)")
    return parser


def _quiet_broken_pipe() -> None:
    """Stop writing: stdout's reader went away (``| head``); no traceback at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Run fleetctl; returns the exit code (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    path = args.socket or os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET
    client = Client(path, timeout_s=args.http_timeout)
    try:
        return COMMANDS[args.command](client, args)
    except ClientError as exc:
        code = f" ({exc.code})" if exc.code else ""
        print(f"fleetctl: {exc.message}{code}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_broken_pipe()
        return EXIT_OK
    except Exception as exc:  # a bug: one line for the user, the traceback on request
        if os.environ.get(ENV_DEBUG) == "1":
            raise
        print(
            f"fleetctl: internal error: {type(exc).__name__}: {exc} "
            f"(a bug; {ENV_DEBUG}=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
