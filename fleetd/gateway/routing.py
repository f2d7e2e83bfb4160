"""Where a request goes: a pure function from (request, config, ready replicas) to a route.

No I/O and no clock: the proxy asks, this answers with an ordered list of replicas to try
(the first is the choice, the rest are for a retry before the first byte) and a reason, or
with a refusal that names what was wrong. Tested as a table (tests/unit/test_routing.py).

The order of candidates: the requested model's ready replicas, least outstanding requests
first (ties rotate with ``tiebreak`` so idle replicas share the load), then its fallbacks'
(config ``fallbacks``, in order, followed recursively), skipping any that cannot take this
request (an image to a model without vision, an Ollama-native call to a vLLM model, an
embedding to a chat model). Workers that are not ready, or are draining, never appear here:
the caller passes ready replicas only.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fleetd.config import Capability, Engine

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from fleetd.config import FleetConfig, ModelSpec


class Api(enum.StrEnum):
    """Which API the client speaks (it decides the error shape and the upstream path)."""

    OPENAI = "openai"
    OLLAMA = "ollama"


class Kind(enum.StrEnum):
    """What the request asks for."""

    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    INFO = "info"  # Ollama's /api/show: any replica of the model will do


@dataclass(frozen=True, slots=True)
class Replica:
    """One ready place a model is served: a vLLM worker or a model inside an Ollama server."""

    target: str  # unique per engine instance: "<worker>@<gpu uuid>"
    worker: str  # display name, as in `fleetctl status`
    model: str  # the config's model name
    engine: Engine
    base_url: str
    upstream_model: str  # the name the engine knows it by (served name, Ollama tag)
    outstanding: int = 0  # requests the gateway has in flight there


@dataclass(frozen=True, slots=True)
class Request:
    """What routing needs to know about a request (see ``inspect``)."""

    model: str
    api: Api = Api.OPENAI
    kind: Kind = Kind.CHAT
    has_images: bool = False
    task: str | None = None
    prompt: str = ""


@dataclass(frozen=True, slots=True)
class Route:
    """Where to send a request: try ``candidates`` in order."""

    requested: str
    model: str  # the model chosen (after alias and auto resolution)
    candidates: tuple[Replica, ...]
    why: str

    def fallback(self, replica: Replica) -> str | None:
        """``"mimo-vl->qwen2.5vl:3b"`` when ``replica`` serves another model than chosen."""
        return None if replica.model == self.model else f"{self.model}->{replica.model}"


@dataclass(frozen=True, slots=True)
class NoRoute:
    """A refusal: HTTP status, a stable code and a message that says what to do."""

    status: int
    code: str
    message: str


class RouteTable:
    """The config's names, aliases, capabilities, fallbacks and rules, indexed for lookups."""

    def __init__(self, cfg: FleetConfig) -> None:
        self.auto = cfg.gateway.auto_model
        self.models: dict[str, ModelSpec] = {m.name: m for m in cfg.models}
        self.names: dict[str, ModelSpec] = {}
        for m in cfg.models:
            for name in (m.name, m.served, *m.aliases):
                self.names.setdefault(name, m)
        # config order breaks priority ties, so the table is deterministic
        ranked = sorted(cfg.models, key=lambda m: -m.priority)
        self.by_capability: dict[Capability, tuple[ModelSpec, ...]] = {
            cap: tuple(m for m in ranked if cap in m.capabilities) for cap in Capability
        }
        default = cfg.gateway.default_model
        chat = self.by_capability[Capability.CHAT]
        self.default: ModelSpec | None = (
            self.models.get(default) if default else (chat[0] if chat else None)
        )
        self.rules = tuple(
            (
                rule.capability,
                rule.task.casefold() if rule.task else None,
                re.compile(rule.prompt) if rule.prompt else None,
            )
            for rule in cfg.gateway.rules
        )

    def known(self) -> str:
        """The names a client may send, for error messages."""
        return ", ".join([self.auto, *sorted(self.models)])


def route(
    req: Request, table: RouteTable, ready: Iterable[Replica], *, tiebreak: int = 0
) -> Route | NoRoute:
    """Choose where ``req`` goes among the ``ready`` replicas."""
    chosen = _resolve(req, table)
    if isinstance(chosen, NoRoute):
        return chosen
    first, others, why = chosen
    refusal = _refuse(req, first)
    if refusal is not None:
        return refusal
    by_model: dict[str, list[Replica]] = {}
    for replica in ready:
        by_model.setdefault(replica.model, []).append(replica)
    chain = [m for m in _chain([first, *others], table) if _refuse(req, m) is None]
    candidates: list[Replica] = []
    for spec in chain:
        candidates.extend(_least_outstanding(by_model.get(spec.name, ()), tiebreak))
    if not candidates:
        tried = ", ".join(m.name for m in chain)
        return NoRoute(
            503,
            "model_not_ready",
            f"no ready replica of {first.name!r} ({why}); tried in order: {tried}. "
            "`fleetctl status` shows why; retry when a worker is ready.",
        )
    return Route(req.model, first.name, tuple(candidates), why)


def _resolve(req: Request, table: RouteTable) -> tuple[ModelSpec, list[ModelSpec], str] | NoRoute:
    """The chosen model, same-capability alternatives (auto only), and why."""
    if req.model != table.auto:
        spec = table.names.get(req.model)
        if spec is None:
            return NoRoute(
                404,
                "model_not_found",
                f"model {req.model!r} is not served by this fleet; known: {table.known()}",
            )
        how = "by name" if req.model == spec.name else f"alias {req.model!r}"
        return spec, [], how
    capability, why = _auto_capability(req, table)
    if capability is None:
        if table.default is None:
            return NoRoute(
                400,
                "no_default_model",
                f'model "{table.auto}" matched no rule and no model has the chat capability; '
                "set gateway.default_model or name a model",
            )
        return table.default, [], "auto: no rule matched, default model"
    able = list(table.by_capability[capability])
    if req.api is Api.OLLAMA:
        able = [m for m in able if m.engine is Engine.OLLAMA]
    if not able:
        return NoRoute(
            400,
            "no_capable_model",
            f"auto: {why}, but no model in the fleet has the {capability.value!r} capability"
            + (" and runs on Ollama" if req.api is Api.OLLAMA else ""),
        )
    return able[0], able[1:], f"auto: {why}"


def _auto_capability(req: Request, table: RouteTable) -> tuple[Capability | None, str]:
    if req.kind is Kind.EMBEDDING:
        return Capability.EMBEDDINGS, "an embedding request"
    if req.has_images:
        return Capability.VISION, "image parts need vision"
    task = req.task.casefold() if req.task else None
    for capability, want_task, pattern in table.rules:
        if want_task is not None and want_task != task:
            continue
        if pattern is not None and not pattern.search(req.prompt):
            continue
        if want_task is not None:
            return capability, f"task {req.task!r} -> {capability.value}"
        return capability, f"prompt matches the {capability.value} rule"
    return None, ""


def _refuse(req: Request, spec: ModelSpec) -> NoRoute | None:
    """Why ``spec`` cannot take this request at all (not a matter of readiness)."""
    if req.api is Api.OLLAMA and spec.engine is not Engine.OLLAMA:
        return NoRoute(
            400,
            "wrong_api",
            f"model {spec.name!r} runs on vLLM, which has no Ollama API; "
            "use the OpenAI API (/v1/chat/completions) for it",
        )
    if req.kind is Kind.EMBEDDING and Capability.EMBEDDINGS not in spec.capabilities:
        return NoRoute(
            400,
            "not_an_embedding_model",
            f"model {spec.name!r} does not serve embeddings (capabilities: "
            f"{', '.join(spec.capabilities)}); add 'embeddings' to its capabilities if it does",
        )
    if req.has_images and Capability.VISION not in spec.capabilities:
        return NoRoute(
            400,
            "no_vision",
            f"model {spec.name!r} cannot take images (capabilities: "
            f"{', '.join(spec.capabilities)}); use a vision model or model "
            f'"auto"',
        )
    return None


def _chain(first: Sequence[ModelSpec], table: RouteTable) -> list[ModelSpec]:
    """The models in order, each followed by its fallbacks (recursively, once each)."""
    out: list[ModelSpec] = []
    seen: set[str] = set()

    def visit(spec: ModelSpec) -> None:
        if spec.name in seen:
            return
        seen.add(spec.name)
        out.append(spec)
        for name in spec.fallbacks:
            nxt = table.models.get(name)
            if nxt is not None:
                visit(nxt)

    for spec in first:
        visit(spec)
    return out


def _least_outstanding(replicas: Sequence[Replica], tiebreak: int) -> list[Replica]:
    """Fewest in flight first; equal ones rotate by ``tiebreak`` (then by target: stable)."""
    ordered = sorted(replicas, key=lambda r: r.target)
    if not ordered:
        return []
    shift = tiebreak % len(ordered)
    rotated = ordered[shift:] + ordered[:shift]
    return sorted(rotated, key=lambda r: r.outstanding)  # sorted() is stable


# -- reading requests -----------------------------------------------------------------------


def inspect(
    body: Mapping[str, object], *, api: Api, kind: Kind, task: str | None = None
) -> Request:
    """A ``Request`` from a parsed JSON body (the caller checked that ``model`` is a string)."""
    model = body.get("model")
    prompt, images = _openai_text(body) if api is Api.OPENAI else _ollama_text(body)
    return Request(
        model=model if isinstance(model, str) else "",
        api=api,
        kind=kind,
        has_images=images,
        task=task,
        prompt=prompt,
    )


def _openai_text(body: Mapping[str, object]) -> tuple[str, bool]:
    """The last user message's text, and whether any message carries an image part."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        prompt = body.get("prompt", body.get("input"))
        if isinstance(prompt, list):
            prompt = " ".join(p for p in prompt if isinstance(p, str))
        return (prompt if isinstance(prompt, str) else ""), False
    text = ""
    images = False
    for message in messages:
        if not isinstance(message, dict):
            continue
        parts, has_image = _content(message.get("content"))
        images = images or has_image
        if message.get("role") == "user":
            text = " ".join(parts)
    return text, images


def _content(content: object) -> tuple[list[str], bool]:
    """An OpenAI message's text parts, and whether it has an image part."""
    if isinstance(content, str):
        return [content], False
    texts: list[str] = []
    images = False
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        if part.get("type") in ("image_url", "input_image", "image"):
            images = True
        elif isinstance(part.get("text"), str):
            texts.append(part["text"])
    return texts, images


def _ollama_text(body: Mapping[str, object]) -> tuple[str, bool]:
    """Ollama's chat (messages with ``images``) or generate (``prompt`` + ``images``)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        text = ""
        images = False
        for message in messages:
            if not isinstance(message, dict):
                continue
            images = images or bool(message.get("images"))
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                text = message["content"]
        return text, images
    prompt = body.get("prompt", body.get("input"))
    return (prompt if isinstance(prompt, str) else ""), bool(body.get("images"))
