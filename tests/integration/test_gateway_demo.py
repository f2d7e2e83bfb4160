"""The gateway on the demo fleet itself (`fleetd demo`, etc/fleetd.toml): routing, fallback
and a zero-drop drain, with the official clients, against a real daemon process."""

from __future__ import annotations

import asyncio
import base64
import json
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai
import pytest
from demo_proc import DemoDaemon, call, demo_daemon

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()


def gateway_url(d: DemoDaemon) -> str:
    gateway = d.status()["gateway"]
    assert gateway is not None
    url: str = gateway["url"]
    return url.removesuffix("/v1")


async def test_demo_fleet_routes_and_falls_back_and_drains_without_a_drop(tmp_path: Path) -> None:
    with demo_daemon(tmp_path / "demo") as d:
        base = gateway_url(d)
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        try:
            ids = {m.id for m in (await client.models.list()).data}
            assert {"auto", "mimo-vl", "deepcoder:14b", "qwen2.5vl:3b"} <= ids

            async def routed(content: Any) -> str:
                messages: Any = [{"role": "user", "content": content}]
                raw = await client.chat.completions.with_raw_response.create(
                    model="auto", messages=messages, max_tokens=3
                )
                return str(raw.headers["x-fleetd-model"])

            image = [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": PNG}},
            ]
            assert await routed(image) == "mimo-vl"
            assert await routed("why does my python code raise KeyError?") == "deepcoder:14b"
            assert await routed("hello there") == "mimo-vl"  # gateway.default_model
            async with ollama.AsyncClient(host=base) as oll:
                tags = await oll.list()
            assert "deepcoder:14b" in {m.model for m in tags.models}

            # 40 clients stream from mimo-vl without pause while an operator drains it: the
            # running streams finish on MiMo, the next ones go to its fallback; none fails
            failures: list[str] = []
            served: Counter[str] = Counter()
            stop = asyncio.Event()

            async def stream_forever(http: aiohttp.ClientSession) -> None:
                body = {
                    "model": "mimo-vl",
                    "messages": [{"role": "user", "content": "tell me a story"}],
                    "max_tokens": 24,
                    "stream": True,
                }
                while not stop.is_set():
                    try:
                        async with http.post(base + "/v1/chat/completions", json=body) as resp:
                            text = await resp.text()
                            if resp.status != 200 or not text.rstrip().endswith("data: [DONE]"):
                                failures.append(f"{resp.status}: {text[-200:]}")
                                continue
                            if '"error"' in text:
                                failures.append(text[-200:])
                                continue
                            served[resp.headers.get("X-Fleetd-Fallback", "mimo-vl")] += 1
                    except aiohttp.ClientError as exc:
                        failures.append(repr(exc))

            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                tasks = [asyncio.create_task(stream_forever(http)) for _ in range(40)]
                await asyncio.sleep(1.5)
                code, doc = await asyncio.to_thread(
                    call,
                    d.socket,
                    "POST",
                    "/v1/drain",
                    json.dumps({"target": "model", "name": "mimo-vl"}).encode(),
                )
                assert code == 200, doc
                await asyncio.to_thread(
                    d.wait,
                    "mimo-vl stopped",
                    lambda x: x.workers().get("mimo-vl", {}).get("state") in (None, "stopped"),
                )
                await asyncio.sleep(1.5)  # the fallback carries the load alone
                stop.set()
                await asyncio.gather(*tasks)
            assert failures == [], f"{len(failures)} failures, first: {failures[:3]}"
            assert served["mimo-vl"] > 0
            assert served["mimo-vl->qwen2.5vl:3b"] > 0
        finally:
            await client.close()
