"""OpenAI-protocol request checking and response shapes of vLLM 0.33's chat and completions.

Requests are validated the way vLLM validates them, with vLLM's error texts (reference A.4,
vllm-on-cpu.md §3.5): unknown model -> 404 ``NotFoundError``; ``max_tokens`` above
``max_model_len`` -> 400; too many images for ``--limit-mm-per-prompt`` -> 400. The reply is
fake text (``common.fake_tokens``), deterministic per prompt, in vLLM's exact JSON shapes.

Output length: ``max_tokens`` (or ``max_completion_tokens``) tokens ending with
``finish_reason: "length"``; completions default to 16 tokens as in vLLM; a chat request
without a limit ends by itself ("EOS") after 8-24 tokens with ``finish_reason: "stop"``
(vLLM's chat default is "until EOS or the context is full"). ``stop`` strings cut the text
with ``finish_reason: "stop"`` and ``stop_reason`` set to the string.

Pure: no I/O; the HTTP layer turns ApiError into a response.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fleetd.sim.common import fake_tokens
from fleetd.sim.vllm_args import VERSION, ServeArgs

IMAGE_PROMPT_TOKENS = 256  # a vision encoder's tokens for one image, roughly
COMPLETION_DEFAULT_MAX_TOKENS = 16
_FINGERPRINT = f"vllm-{VERSION}-{hashlib.sha256(VERSION.encode()).hexdigest()[:8]}"
_MM_PARTS = {
    "image_url": "image",
    "image_embeds": "image",
    "image_pil": "image",
    "input_audio": "audio",
    "audio_url": "audio",
    "video_url": "video",
}


class ApiError(Exception):
    """An error response in vLLM's shape ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, kind: str, message: str, param: str | None = None) -> None:
        self.status = status
        self.kind = kind
        self.message = message
        self.param = param
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status,
            }
        }


def bad_request(message: str, param: str | None = None) -> ApiError:
    """A 400 BadRequestError."""
    return ApiError(400, "BadRequestError", message, param)


@dataclass(frozen=True, slots=True)
class GenRequest:
    """A validated generation request and its precomputed reply."""

    chat: bool
    stream: bool
    include_usage: bool
    prompt_tokens: int
    tokens: list[str]
    finish_reason: str
    stop_reason: str | None


def _text_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def _check_model(body: dict[str, Any], args: ServeArgs) -> None:
    model = body.get("model")
    if model is None:
        return  # vLLM serves the default model when none is named
    if not isinstance(model, str) or model not in args.served_model_names:
        raise ApiError(
            404,
            "NotFoundError",
            f"The model `{model}` does not exist. "
            f"Valid aliases: {', '.join(args.served_model_names)}.",
            "model",
        )


def _parts(content: list[Any], texts: list[str], counts: dict[str, int]) -> None:
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in _MM_PARTS:
            modality = _MM_PARTS[kind]
            counts[modality] = counts.get(modality, 0) + 1
        else:
            raise bad_request(f"Unknown part type: {kind}", "messages")


def _messages(body: dict[str, Any], args: ServeArgs) -> tuple[str, int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request(
            "[{'type': 'missing', 'loc': ('body', 'messages'), 'msg': 'Field required'}]",
            "messages",
        )
    texts: list[str] = []
    counts: dict[str, int] = {}
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request("each message needs a string 'role'", "messages")
        content = message.get("content")
        if content is None or isinstance(content, str):
            texts.append(content or "")
            continue
        if not isinstance(content, list):
            raise bad_request("message content must be a string or a list of parts", "messages")
        _parts(content, texts, counts)
    for modality, count in counts.items():
        limit = args.mm_limit(modality)
        if count > limit:
            raise bad_request(
                f"At most {limit} {modality}(s) may be provided in one prompt. "
                "Set `--limit-mm-per-prompt` to increase this limit.",
                modality,
            )
    text = "\n".join(texts)
    tokens = sum(_text_tokens(t) + 4 for t in texts) + 2
    tokens += IMAGE_PROMPT_TOKENS * sum(counts.values())
    return text, tokens


def _prompt(body: dict[str, Any]) -> tuple[str, int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt, _text_tokens(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return " ".join(map(str, prompt)), len(prompt)
    raise bad_request(
        "prompt must be a string or a list of token ids (the emulator takes one prompt)",
        "prompt",
    )


def _int_field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, got {value!r}", name)
    if value < 1:
        raise bad_request(f"{name} must be at least 1, got {value}.", name)
    return value


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise bad_request("stop must be a string or a list of strings", "stop")


def _cut_at_stop(tokens: list[str], stops: list[str]) -> tuple[list[str], str | None]:
    text = "".join(tokens)
    hits = [(text.find(s), s) for s in stops if s in text]
    if not hits:
        return tokens, None
    cut, stop = min(hits)
    out: list[str] = []
    length = 0
    for token in tokens:
        if length + len(token) >= cut:
            if cut > length:
                out.append(token[: cut - length])
            break
        out.append(token)
        length += len(token)
    return out, stop


def parse(body: object, args: ServeArgs, *, chat: bool, max_model_len: int) -> GenRequest:
    """Validate a chat or completion request body and plan its reply."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    _check_model(body, args)
    text, prompt_tokens = _messages(body, args) if chat else _prompt(body)
    stream = bool(body.get("stream", False))
    options = body.get("stream_options")
    if options is not None and not stream:
        raise bad_request(
            "Stream options can only be defined when `stream=True`.", "stream_options"
        )
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    if body.get("n", 1) not in (1, None):
        raise bad_request("the vLLM emulator serves n=1 only", "n")
    limit = _int_field(body, "max_completion_tokens") if chat else None
    limit = limit or _int_field(body, "max_tokens")
    if limit is None and not chat:
        limit = COMPLETION_DEFAULT_MAX_TOKENS
    if limit is not None and limit > max_model_len:
        raise bad_request(
            f"max_tokens={limit} cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens.",
            "max_tokens",
        )
    if prompt_tokens >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {prompt_tokens} input tokens. Please reduce the length of the "
            "input messages.",
            "input_tokens",
        )
    if limit is not None and prompt_tokens + limit > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {limit} output tokens and your prompt contains at least "
            f"{prompt_tokens} input tokens, for a total of at least {prompt_tokens + limit} "
            "tokens. Please reduce the length of the input prompt or the number of "
            "requested output tokens.",
            "input_tokens",
        )
    if limit is None:  # a chat reply that ends by itself: EOS after 8..24 tokens
        natural = 8 + hashlib.sha256(text.encode()).digest()[0] % 17
        count = min(natural, max_model_len - prompt_tokens)
        finish = "stop" if count == natural else "length"
    else:
        count, finish = limit, "length"
    tokens, stop = _cut_at_stop(fake_tokens(text, count), _stops(body))
    return GenRequest(
        chat=chat,
        stream=stream,
        include_usage=include_usage,
        prompt_tokens=prompt_tokens,
        tokens=tokens,
        finish_reason="stop" if stop is not None else finish,
        stop_reason=stop,
    )


# -- response shapes -----------------------------------------------------------------------
def new_id(chat: bool) -> str:  # noqa: FBT001 - mirrors GenRequest.chat
    """``chatcmpl-<hex>`` or ``cmpl-<hex>``."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The usage object of a vLLM response."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def full_response(
    req: GenRequest, *, rid: str, model: str, text: str, finish: str, stop: str | None, n: int
) -> dict[str, Any]:
    """A non-streaming chat.completion or text_completion."""
    choice: dict[str, Any]
    if req.chat:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "tool_calls": [],
            "reasoning": None,
        }
        choice = {"index": 0, "message": message, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "logprobs": None}
    choice |= {"finish_reason": finish, "stop_reason": stop, "token_ids": None}
    return {
        "id": rid,
        "object": "chat.completion" if req.chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": _FINGERPRINT,
        "usage": usage(req.prompt_tokens, n),
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "kv_transfer_params": None,
    }


def chunk(
    req: GenRequest,
    *,
    rid: str,
    created: int,
    model: str,
    content: str | None,
    role: bool = False,
    finish: str | None = None,
    stop: str | None = None,
) -> dict[str, Any]:
    """One SSE chunk (serialized by vLLM with exclude_unset: absent fields stay absent)."""
    choice: dict[str, Any]
    if req.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if content is not None and not role:
            delta["content"] = content
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish}
    if finish is not None or not req.chat:
        choice["stop_reason"] = stop
    return {
        "id": rid,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(req: GenRequest, *, rid: str, created: int, model: str, n: int) -> dict[str, Any]:
    """The ``include_usage`` chunk: no choices, just usage."""
    return {
        "id": rid,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(req.prompt_tokens, n),
        "system_fingerprint": _FINGERPRINT,
    }
