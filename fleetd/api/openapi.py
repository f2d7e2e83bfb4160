"""The control API described as OpenAPI 3.1, served at /v1/openapi.json and used to fuzz it."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}
_ACTION = {"$ref": "#/components/schemas/ActionResult"}


def _op(summary: str, *, body: dict[str, Any] | None = None, ok: Any = _ACTION) -> dict[str, Any]:  # noqa: ANN401
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "ok", "content": {"application/json": {"schema": ok}}},
            "default": {
                "description": "error",
                "content": {"application/json": {"schema": _ERROR}},
            },
        },
    }
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body}},
        }
    return op


def _param(name: str, where: str = "path", schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema or {"type": "string"},
    }


def spec() -> dict[str, Any]:
    """The OpenAPI document."""
    drain = {
        "type": "object",
        "required": ["target", "name"],
        "properties": {
            "target": {"enum": ["worker", "gpu", "model"]},
            "name": {"type": "string"},
            "timeout_s": {"type": "number", "minimum": 0, "maximum": 86400},
        },
    }
    obj = {"type": "object"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "fleetd control API", "version": "1"},
        "paths": {
            "/v1/status": {"get": _op("Fleet status", ok=obj)},
            "/v1/models/{model}/explain": {
                "parameters": [_param("model")],
                "get": _op("Why a model is where it is", ok=obj),
            },
            "/v1/models/{model}/scale": {
                "parameters": [_param("model")],
                "post": _op(
                    "Override the replica count",
                    body={
                        "type": "object",
                        "required": ["replicas"],
                        "properties": {
                            "replicas": {"type": "integer", "minimum": 0, "maximum": 64}
                        },
                    },
                ),
            },
            "/v1/drain": {"post": _op("Drain a worker, GPU or model", body=drain)},
            "/v1/undrain": {"post": _op("Undo a drain", body=drain)},
            "/v1/gpus/{gpu}/cordon": {
                "parameters": [_param("gpu")],
                "post": _op("Cordon a GPU", body=obj),
            },
            "/v1/gpus/{gpu}/uncordon": {
                "parameters": [_param("gpu")],
                "post": _op("Uncordon a GPU", body=obj),
            },
            "/v1/workers/{worker}/restart": {
                "parameters": [_param("worker")],
                "post": _op("Restart a worker", body=obj),
            },
            "/v1/reload": {"post": _op("Reload the config file", body=obj)},
            "/v1/events": {
                "get": {
                    "summary": "Events as NDJSON",
                    "parameters": [
                        _param("since", "query", {"type": "integer", "minimum": 0}),
                        _param("follow", "query", {"enum": ["0", "1"]}),
                        _param("kind", "query"),
                    ],
                    "responses": {"200": {"description": "NDJSON"}},
                }
            },
            "/v1/workers/{worker}/logs": {
                "get": {
                    "summary": "A worker's engine log",
                    "parameters": [
                        _param("worker"),
                        _param("lines", "query", {"type": "integer", "minimum": 0}),
                        _param("follow", "query", {"enum": ["0", "1"]}),
                    ],
                    "responses": {"200": {"description": "text"}},
                }
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        }
                    },
                },
                "ActionResult": {
                    "type": "object",
                    "required": ["ok", "message", "event_seq"],
                    "properties": {
                        "ok": {"type": "boolean"},
                        "message": {"type": "string"},
                        "event_seq": {"type": "integer"},
                    },
                },
            }
        },
    }
