"""Routing as a table: request + ready replicas -> where it goes (or why it cannot)."""

from __future__ import annotations

import itertools
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetd import config
from fleetd.config import Engine
from fleetd.gateway.routing import (
    Api,
    Kind,
    NoRoute,
    Replica,
    Request,
    Route,
    RouteTable,
    inspect,
    route,
)

FLEET = """
[gpus]
expected_count = 2

[gateway]
default_model = "mimo-vl"

[[models]]
name = "mimo-vl"
engine = "vllm"
model = "XiaomiMiMo/MiMo-VL-7B-RL"
served_name = "mimo"
aliases = ["mimo-latest"]
vram_gib = 14
overhead_gib = 2
replicas = 2
priority = 100
capabilities = ["vision", "chat", "reasoning"]
fallbacks = ["qwen2.5vl:3b"]

[[models]]
name = "deepcoder:14b"
engine = "ollama"
model = "deepcoder:14b"
vram_gib = 9
priority = 50
capabilities = ["code", "chat"]
fallbacks = ["mixtral:8x22b"]

[[models]]
name = "qwen2.5vl:3b"
engine = "ollama"
model = "qwen2.5vl:3b"
vram_gib = 3.2
priority = 40
capabilities = ["vision", "chat"]
fallbacks = ["mixtral:8x22b"]

[[models]]
name = "deepseek-r1:32b"
engine = "ollama"
model = "deepseek-r1:32b"
vram_gib = 5
priority = 30
capabilities = ["reasoning", "chat"]

[[models]]
name = "mixtral:8x22b"
engine = "ollama"
model = "mixtral:8x22b"
vram_gib = 1.4
priority = 10
capabilities = ["chat"]

[[models]]
name = "embed"
engine = "ollama"
model = "nomic-embed-text"
vram_gib = 0.5
priority = 5
capabilities = ["embeddings"]
"""


def _table(extra: str = "") -> RouteTable:
    cfg = config.FleetConfig.model_validate(tomllib.loads(FLEET + extra))
    return RouteTable(cfg)


TABLE = _table()


def _r(model: str, worker: str | None = None, *, out: int = 0) -> Replica:
    engine = Engine.VLLM if model == "mimo-vl" else Engine.OLLAMA
    name = worker or model
    return Replica(
        target=f"{name}@GPU-x",
        worker=name,
        model=model,
        engine=engine,
        base_url="http://127.0.0.1:1",
        upstream_model="mimo" if model == "mimo-vl" else model,
        outstanding=out,
    )


ALL_READY = [
    _r("mimo-vl", "mimo-vl#0"),
    _r("mimo-vl", "mimo-vl#1"),
    _r("deepcoder:14b"),
    _r("qwen2.5vl:3b"),
    _r("deepseek-r1:32b"),
    _r("mixtral:8x22b"),
    _r("embed"),
]
IMG = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "x"}}]

# (case, request, ready replicas, expected first worker, expected model, why contains)
CASES: list[tuple[str, Request, list[Replica], str, str, str]] = [
    ("by name", Request("mimo-vl"), ALL_READY, "mimo-vl#0", "mimo-vl", "by name"),
    ("served name", Request("mimo"), ALL_READY, "mimo-vl#0", "mimo-vl", "alias"),
    ("alias", Request("mimo-latest"), ALL_READY, "mimo-vl#0", "mimo-vl", "alias"),
    ("ollama by name", Request("deepcoder:14b"), ALL_READY, "deepcoder:14b", "deepcoder:14b", ""),
    (
        "auto + image -> vision",
        Request("auto", has_images=True, prompt="what is this?"),
        ALL_READY,
        "mimo-vl#0",
        "mimo-vl",
        "image parts need vision",
    ),
    (
        "auto + task header code",
        Request("auto", task="Code", prompt="hello"),
        ALL_READY,
        "deepcoder:14b",
        "deepcoder:14b",
        "task 'Code' -> code",
    ),
    (
        "auto + code prompt",
        Request("auto", prompt="Why does this Python function raise KeyError?"),
        ALL_READY,
        "deepcoder:14b",
        "deepcoder:14b",
        "prompt matches the code rule",
    ),
    (
        "auto + code fence",
        Request("auto", prompt="```\nx = 1\n```"),
        ALL_READY,
        "deepcoder:14b",
        "deepcoder:14b",
        "code rule",
    ),
    (
        "auto + reasoning prompt: highest-priority reasoning model",
        Request("auto", prompt="Prove that there are infinitely many primes, step by step."),
        ALL_READY,
        "mimo-vl#0",
        "mimo-vl",
        "reasoning rule",
    ),
    (
        "auto + nothing matches -> default",
        Request("auto", prompt="Tell me about the weather in Lisbon."),
        ALL_READY,
        "mimo-vl#0",
        "mimo-vl",
        "default model",
    ),
    (
        "auto embedding -> embedding model",
        Request("auto", kind=Kind.EMBEDDING, prompt="embed me"),
        ALL_READY,
        "embed",
        "embed",
        "embedding",
    ),
    (
        "least outstanding among replicas",
        Request("mimo-vl"),
        [_r("mimo-vl", "mimo-vl#0", out=3), _r("mimo-vl", "mimo-vl#1", out=1)],
        "mimo-vl#1",
        "mimo-vl",
        "",
    ),
    (
        "no ready mimo -> its fallback",
        Request("mimo-vl"),
        [_r("qwen2.5vl:3b"), _r("mixtral:8x22b")],
        "qwen2.5vl:3b",
        "mimo-vl",
        "",
    ),
    (
        "fallback of the fallback",
        Request("mimo-vl"),
        [_r("mixtral:8x22b")],
        "mixtral:8x22b",
        "mimo-vl",
        "",
    ),
    (
        "images never fall back to a model without vision",
        Request("mimo-vl", has_images=True),
        [_r("qwen2.5vl:3b"), _r("mixtral:8x22b")],
        "qwen2.5vl:3b",
        "mimo-vl",
        "",
    ),
    (
        "auto reasoning: next reasoning model when mimo is away",
        Request("auto", prompt="prove it"),
        [_r("deepseek-r1:32b"), _r("qwen2.5vl:3b")],
        "qwen2.5vl:3b",  # mimo's own fallback comes before the next reasoning model
        "mimo-vl",
        "reasoning",
    ),
    (
        "ollama api + auto code",
        Request("auto", api=Api.OLLAMA, task="code"),
        ALL_READY,
        "deepcoder:14b",
        "deepcoder:14b",
        "code",
    ),
    (
        "ollama api + auto vision skips the vLLM model",
        Request("auto", api=Api.OLLAMA, has_images=True),
        ALL_READY,
        "qwen2.5vl:3b",
        "qwen2.5vl:3b",
        "vision",
    ),
]


@pytest.mark.parametrize(
    ("request_", "ready", "worker", "model", "why"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_routes(request_: Request, ready: list[Replica], worker: str, model: str, why: str) -> None:
    got = route(request_, TABLE, ready)
    assert isinstance(got, Route), got
    assert got.candidates[0].worker == worker
    assert got.model == model
    assert why in got.why


def test_fallback_is_marked_and_candidates_are_ordered() -> None:
    got = route(Request("mimo-vl"), TABLE, [*ALL_READY[2:], ALL_READY[1]])
    assert isinstance(got, Route)
    assert [c.worker for c in got.candidates] == ["mimo-vl#1", "qwen2.5vl:3b", "mixtral:8x22b"]
    assert got.fallback(got.candidates[0]) is None
    assert got.fallback(got.candidates[1]) == "mimo-vl->qwen2.5vl:3b"


# (case, request, ready, status, code, message contains)
REFUSALS: list[tuple[str, Request, list[Replica], int, str, str]] = [
    ("unknown model", Request("gpt-4o"), ALL_READY, 404, "model_not_found", "known: auto"),
    (
        "nothing ready in the whole chain",
        Request("mimo-vl"),
        [_r("deepcoder:14b")],
        503,
        "model_not_ready",
        "tried in order: mimo-vl, qwen2.5vl:3b, mixtral:8x22b",
    ),
    (
        "image to a text model",
        Request("deepcoder:14b", has_images=True),
        ALL_READY,
        400,
        "no_vision",
        "cannot take images",
    ),
    (
        "embedding from a chat model",
        Request("mimo-vl", kind=Kind.EMBEDDING),
        ALL_READY,
        400,
        "not_an_embedding_model",
        "does not serve embeddings",
    ),
    (
        "ollama api to a vLLM model",
        Request("mimo-vl", api=Api.OLLAMA),
        ALL_READY,
        400,
        "wrong_api",
        "/v1/chat/completions",
    ),
    ("draining/not-ready replicas are not passed in", Request("embed"), [], 503, "", "embed"),
]


@pytest.mark.parametrize(
    ("request_", "ready", "status", "code", "text"),
    [c[1:] for c in REFUSALS],
    ids=[c[0] for c in REFUSALS],
)
def test_refusals(
    request_: Request, ready: list[Replica], status: int, code: str, text: str
) -> None:
    got = route(request_, TABLE, ready)
    assert isinstance(got, NoRoute), got
    assert got.status == status
    assert code in got.code
    assert text in got.message


def test_custom_rules_and_default() -> None:
    table = _table(
        """
[[gateway.rules]]
capability = "reasoning"
task = "math"
prompt = "(?i)integral"
"""
    )
    # both conditions must match
    hit = route(Request("auto", task="math", prompt="the integral of x"), table, ALL_READY)
    miss = route(Request("auto", task="math", prompt="add 2 and 2"), table, ALL_READY)
    assert isinstance(hit, Route)
    assert "reasoning" in hit.why
    assert isinstance(miss, Route)
    assert "default" in miss.why
    # the default rules are replaced, not added to
    code = route(Request("auto", prompt="fix this python bug"), table, ALL_READY)
    assert isinstance(code, Route)
    assert "default" in code.why


def test_ties_rotate_so_idle_replicas_share_load() -> None:
    ready = [_r("mimo-vl", "mimo-vl#0"), _r("mimo-vl", "mimo-vl#1")]
    firsts = set()
    for turn in range(4):
        got = route(Request("mimo-vl"), TABLE, ready, tiebreak=turn)
        assert isinstance(got, Route)
        firsts.add(got.candidates[0].worker)
    assert firsts == {"mimo-vl#0", "mimo-vl#1"}


@given(
    counts=st.lists(st.integers(0, 50), min_size=1, max_size=6),
    tiebreak=st.integers(0, 1000),
)
def test_first_choice_has_the_fewest_outstanding(counts: list[int], tiebreak: int) -> None:
    ready = [_r("mimo-vl", f"mimo-vl#{i}", out=n) for i, n in enumerate(counts)]
    got = route(Request("mimo-vl"), TABLE, ready, tiebreak=tiebreak)
    assert isinstance(got, Route)
    assert got.candidates[0].outstanding == min(counts)
    assert sorted(c.worker for c in got.candidates) == sorted(r.worker for r in ready)


@given(order=st.permutations(ALL_READY))
def test_input_order_does_not_matter(order: list[Replica]) -> None:
    want = route(Request("auto", prompt="prove it"), TABLE, ALL_READY)
    assert route(Request("auto", prompt="prove it"), TABLE, order) == want


# -- inspect: what routing sees of a request body --------------------------------------------


@pytest.mark.parametrize(
    ("body", "api", "kind", "prompt", "images"),
    [
        (
            {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            Api.OPENAI,
            Kind.CHAT,
            "hi",
            False,
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": IMG}]},
            Api.OPENAI,
            Kind.CHAT,
            "what is this?",
            True,
        ),
        (
            {
                "model": "m",
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ],
            },
            Api.OPENAI,
            Kind.CHAT,
            "c",
            False,
        ),
        ({"model": "m", "prompt": ["x", "y"]}, Api.OPENAI, Kind.COMPLETION, "x y", False),
        ({"model": "m", "input": "embed"}, Api.OPENAI, Kind.EMBEDDING, "embed", False),
        (
            {"model": "m", "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]},
            Api.OLLAMA,
            Kind.CHAT,
            "hi",
            True,
        ),
        ({"model": "m", "prompt": "p", "images": ["aGk="]}, Api.OLLAMA, Kind.COMPLETION, "p", True),
        ({"model": "m", "messages": "not a list"}, Api.OPENAI, Kind.CHAT, "", False),
        (
            {"model": "m", "messages": [None, 3, {"content": [None, {"type": "text"}]}]},
            Api.OPENAI,
            Kind.CHAT,
            "",
            False,
        ),
    ],
)
def test_inspect(body: dict[str, object], api: Api, kind: Kind, prompt: str, images: bool) -> None:
    req = inspect(body, api=api, kind=kind, task="t")
    assert (req.model, req.prompt, req.has_images, req.task) == ("m", prompt, images, "t")


def test_example_config_routes_every_capability() -> None:
    cfg = config.load_config(Path(__file__).parents[2] / "etc" / "fleetd.toml")
    table = RouteTable(cfg)
    ready = [
        Replica(f"{m.name}@g", m.name, m.name, m.engine, "http://x", m.served) for m in cfg.models
    ]
    for prompt, model in itertools.product(
        ["fix my python code", "prove this theorem", "hello"], [table.auto]
    ):
        got = route(Request(model, prompt=prompt), table, ready)
        assert isinstance(got, Route), (prompt, got)
    coder = route(Request("auto", prompt="fix my python code"), table, ready)
    assert isinstance(coder, Route)
    assert coder.model == "deepcoder:14b"
