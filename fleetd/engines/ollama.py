"""Ollama adapter: one ``ollama serve`` per GPU, and how models are loaded into it and out.

Facts from shared/reference/engines-nvml-systemd.md §B: OLLAMA_HOST sets the address;
CUDA_VISIBLE_DEVICES pins the GPU (UUIDs are more reliable than indices); ``GET /`` answers
"Ollama is running"; an empty-prompt /api/generate with ``keep_alive: -1`` loads a model for
good (``done_reason: "load"``) and ``keep_alive: 0`` unloads it; /api/ps lists what is loaded
with ``size_vram``. OLLAMA_KEEP_ALIVE=-1 keeps models pinned even when a client request omits
keep_alive (Ollama's default of 5 minutes would otherwise unload them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleetd.engines.vllm import Launch, engine_env

if TYPE_CHECKING:
    from collections.abc import Mapping

MIB = 1024 * 1024


def launch(
    *,
    command: tuple[str, ...],
    port: int,
    gpu_uuid: str,
    base_env: Mapping[str, str],
    engine_extra_env: Mapping[str, str],
    max_loaded_models: int,
) -> Launch:
    """Argv and env for the ``ollama serve`` of one GPU."""
    env = engine_env(base_env, engine_extra_env)
    env.update(
        {
            "OLLAMA_HOST": f"127.0.0.1:{port}",
            "CUDA_VISIBLE_DEVICES": gpu_uuid,
            "OLLAMA_KEEP_ALIVE": "-1",
            "OLLAMA_MAX_LOADED_MODELS": str(max_loaded_models),
        }
    )
    return Launch((*command, "serve"), env, port, f"http://127.0.0.1:{port}")


def health_url(base_url: str) -> str:
    """GET here: 200 "Ollama is running" as soon as the server listens."""
    return f"{base_url}/"


def load_request(model: str, *, num_gpu: int | None = None) -> dict[str, Any]:
    """Body for POST /api/generate that loads ``model`` and pins it (keep_alive -1)."""
    body: dict[str, Any] = {"model": model, "keep_alive": -1, "stream": False}
    if num_gpu is not None:
        body["options"] = {"num_gpu": num_gpu}
    return body


def unload_request(model: str) -> dict[str, Any]:
    """Body for POST /api/generate that unloads ``model`` now (keep_alive 0)."""
    return {"model": model, "keep_alive": 0, "stream": False}


def normalise(tag: str) -> str:
    """Ollama names without a tag mean ``:latest``."""
    return tag if ":" in tag else f"{tag}:latest"


def loaded(ps_body: Any) -> dict[str, tuple[int, int]]:  # noqa: ANN401 - parsed JSON
    """/api/ps as {name: (size_mib, size_vram_mib)}."""
    out: dict[str, tuple[int, int]] = {}
    if not isinstance(ps_body, dict) or not isinstance(ps_body.get("models"), list):
        return out
    for item in ps_body["models"]:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            size = int(item.get("size") or 0) // MIB
            vram = int(item.get("size_vram") or 0) // MIB
            out[normalise(item["name"])] = (size, vram)
    return out


def gpu_layers(budget_mib: int, size_mib: int, block_count: int) -> int | None:
    """Layers to put on the GPU so a partially offloaded model stays inside its budget.

    None when the whole model fits (let Ollama load it fully).
    """
    if size_mib <= budget_mib or block_count <= 0:
        return None
    return max(0, (budget_mib * block_count) // size_mib)


def tag_size_mib(tags_body: Any, tag: str) -> int | None:  # noqa: ANN401 - parsed JSON
    """Size on disk of ``tag`` from an /api/tags answer, in MiB."""
    if not isinstance(tags_body, dict) or not isinstance(tags_body.get("models"), list):
        return None
    for item in tags_body["models"]:
        if isinstance(item, dict) and normalise(str(item.get("name", ""))) == tag:
            size = item.get("size")
            return int(size) // MIB if isinstance(size, int) else None
    return None


def block_count(show_body: Any) -> int | None:  # noqa: ANN401 - parsed JSON
    """Number of transformer blocks from an /api/show answer (``<arch>.block_count``)."""
    info = show_body.get("model_info") if isinstance(show_body, dict) else None
    if not isinstance(info, dict):
        return None
    for key, value in info.items():
        if key.endswith(".block_count") and isinstance(value, int) and value > 0:
            return value
    return None
