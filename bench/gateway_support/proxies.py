"""The other proxies in front of the same backend: nginx and LiteLLM's proxy.

Each ``start_*`` returns a ``Target`` or, when the proxy cannot be had here, an
``Unavailable`` that says why; the benchmark reports it and goes on with the rest.

- nginx (Debian package): generated config in the run's directory, ``daemon off``, loopback,
  one worker process (like-for-like with the single-process Python proxies; on two cores
  more would only compete with the backend), upstream keep-alive, ``proxy_buffering off``
  so SSE chunks pass at once. A second location answers a canned 200 itself: the load
  generator's ceiling.
- LiteLLM's proxy (PyPI ``litellm[proxy]``, its own venv from scripts/bench_deps.sh): one
  worker, the backend as a ``hosted_vllm/`` model, a master key (it refuses to start
  without one), local model-cost map (no network), logging at ERROR.
"""

from __future__ import annotations

import os
import secrets
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gateway_support.procs import Procs, free_port, tree, wait_until

if TYPE_CHECKING:
    from collections.abc import Callable

ROOT = Path(__file__).resolve().parents[2]
LITELLM_VENV = ROOT / ".cache" / "bench-litellm"
API_KEY = f"sk-bench-{secrets.token_hex(16)}"  # LiteLLM's master key; sent to every target
CEILING_PATH = "/__wrk_ceiling"


@dataclass
class Target:
    """One way to reach the backend's /v1/chat/completions."""

    key: str  # direct, nginx, litellm, fleetd
    label: str
    url: str  # base URL: http://127.0.0.1:PORT
    note: str  # what it is, for the header of the report
    pids: Callable[[], list[int]] = field(default=list)  # its own processes (CPU is its cost)

    @property
    def chat_url(self) -> str:
        return f"{self.url}/v1/chat/completions"


@dataclass
class Unavailable:
    """A target that could not be had here, and why."""

    key: str
    label: str
    reason: str
    verdict: str = "not available"


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = {ceiling} {{
            default_type application/json;
            return 200 '{{"ok":true}}';
        }}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def _nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_nginx(procs: Procs, root: Path, backend_port: int) -> Target | Unavailable:
    label = "nginx"
    binary = _nginx_binary()
    if binary is None:
        return Unavailable("nginx", label, "nginx not installed: run scripts/bench_deps.sh")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            root=root,
            port=port,
            backend_port=backend_port,
            ceiling=CEILING_PATH,
            # as root, the workers would otherwise switch to nobody, who cannot write here
            user="user root;" if os.geteuid() == 0 else "",
        )
    )
    log = root / "nginx.out"
    proc = procs.start("nginx", [binary, "-p", str(root), "-c", str(conf)], log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until("nginx", lambda: proc.poll() is not None or _answers(url + CEILING_PATH),
                   timeout_s=10)  # fmt: skip
    except TimeoutError:
        procs.stop(proc)
        return Unavailable("nginx", label, "did not answer within 10 s")
    if proc.poll() is not None:
        return Unavailable("nginx", label, f"exited with {proc.returncode}: {_tail(log)}")
    return Target(
        "nginx", label, url, "nginx, 1 worker, upstream keepalive, proxy_buffering off",
        lambda: tree(proc.pid),
    )  # fmt: skip


LITELLM_CONF = """\
model_list:
  - model_name: {model}
    litellm_params:
      model: hosted_vllm/{model}
      api_base: http://127.0.0.1:{backend_port}/v1
      api_key: none
litellm_settings:
  telemetry: false
general_settings:
  master_key: {key}
"""


def _tail(path: Path) -> str:
    """The line of a log that best says why a process failed: the last error, else the last."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no output)"
    errors = [ln for ln in lines if any(w in ln for w in ("Error", "error", "refused", "denied"))]
    line = (errors or lines or ["(no output)"])[-1]
    return line if len(line) <= 240 else line[:237] + "..."


def litellm_version() -> str | None:
    site = list((LITELLM_VENV / "lib").glob("python3*/site-packages/litellm-*.dist-info"))
    return site[0].name.removeprefix("litellm-").removesuffix(".dist-info") if site else None


def start_litellm(
    procs: Procs, root: Path, backend_port: int, model: str
) -> Callable[[], Target | Unavailable] | Unavailable:
    """Start LiteLLM (slow to import): returns a function that waits for it to answer."""
    label = "litellm"
    exe = LITELLM_VENV / "bin" / "litellm"
    version = litellm_version()
    if not exe.exists() or version is None:
        return Unavailable("litellm", label, f"not installed in {LITELLM_VENV}: "
                           "run scripts/bench_deps.sh")  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "litellm.yaml"
    conf.write_text(LITELLM_CONF.format(model=model, backend_port=backend_port, key=API_KEY))
    port = free_port()
    log = root / "litellm.out"
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no network fetch at start
        "LITELLM_LOG": "ERROR",
        "NO_DOCS": "True",
    }
    env.pop("DATABASE_URL", None)
    proc = procs.start(
        "litellm",
        [str(exe), "--config", str(conf), "--host", "127.0.0.1", "--port", str(port),
         "--num_workers", "1"],
        log=log, env=env, grace_s=10.0,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def ready() -> Target | Unavailable:
        try:
            wait_until(
                "litellm",
                lambda: proc.poll() is not None or _answers(url + "/health/liveliness"),
                timeout_s=90,
                interval_s=0.2,
            )
        except TimeoutError:
            procs.stop(proc)
            return Unavailable("litellm", label, f"did not answer within 90 s: {_tail(log)}")
        if proc.poll() is not None:
            return Unavailable("litellm", label, f"exited with {proc.returncode}: {_tail(log)}")
        return Target(
            "litellm", label, url, f"LiteLLM proxy {version}, 1 worker, master key",
            lambda: tree(proc.pid),
        )  # fmt: skip

    return ready
