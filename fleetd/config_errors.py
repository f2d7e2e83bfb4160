"""Turn validation failures into messages that name the key path, the bad value and the rule.

pydantic reports locations as tuples like ``('models', 0, 'vram_gib')``; people read TOML,
so we print ``models[0].vram_gib`` and add the model's name where we know it, plus a
"did you mean" for misspelt keys.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError

_MISSING = object()


@dataclass(frozen=True, slots=True)
class Problem:
    """One configuration mistake."""

    path: str
    value: object
    message: str

    def __str__(self) -> str:
        where = self.path or "(file)"
        if self.value is _MISSING or self.value == "":
            return f"{where}: {self.message}"
        return f"{where} = {_show(self.value)}: {self.message}"


def _show(value: object) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    if isinstance(value, bool):
        text = str(value).lower()
    return text if len(text) <= 60 else text[:57] + "..."


def format_path(loc: tuple[int | str, ...], doc: object) -> str:
    """``('models', 0, 'health', 'x')`` -> ``models[0](mimo-vl).health.x``."""
    out = ""
    node: object = doc
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict) and isinstance(node.get("name"), str):
                out += f"({node['name']})"
        else:
            out += f".{part}" if out else part
            node = node.get(part) if isinstance(node, dict) else None
    return out


def from_pydantic(exc: ValidationError, doc: dict[str, Any]) -> list[Problem]:
    """One Problem per pydantic error, in document order."""
    from fleetd import config  # noqa: PLC0415 - avoid an import cycle at module load

    problems: list[Problem] = []
    errors = [(_user_loc(err["loc"], doc), err) for err in exc.errors(include_url=False)]
    for loc, err in errors:
        kind = err["type"]
        if kind == "too_short" and any(o[: len(loc)] == loc and o != loc for o, _ in errors):
            # a list whose items failed is "too short" only because they failed; noise
            continue
        value = err.get("input", _MISSING)
        message = _reword(err["msg"], kind)
        if kind == "value_error" and isinstance(value, dict):
            value = _MISSING  # a rule about a whole table; the message names its keys
        if kind == "extra_forbidden":
            unknown = str(loc[-1])
            parent = _schema_for(loc[:-1], config.FleetConfig)
            allowed = sorted(parent.model_fields) if parent is not None else []
            close = difflib.get_close_matches(unknown, allowed, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            message = f"unknown key{hint} (allowed here: {', '.join(allowed)})"
            value = _MISSING
        elif kind == "missing":
            message = "required key is missing"
            value = _MISSING
        elif kind == "enum":
            expected = err.get("ctx", {}).get("expected", "")
            message = f"must be one of {expected}"
        problems.append(Problem(format_path(loc, doc), value, message))
    return problems


def _user_loc(loc: tuple[int | str, ...], doc: object) -> tuple[int | str, ...]:
    """``loc`` without the union member tags pydantic adds (('int',), ('str',))."""
    out: list[int | str] = []
    node: object = doc
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]  # a key the user wrote, even one called 'int'
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif _is_union_tag(part):
            continue
        else:
            node = None
        out.append(part)
    return tuple(out)


def _is_union_tag(part: int | str) -> bool:
    # pydantic adds the union member's type to the location ('int', 'str'); users never wrote it
    return part in {"int", "str", "float", "bool"}


def _reword(msg: str, kind: str) -> str:
    if msg.startswith("Value error, "):
        return msg.removeprefix("Value error, ")
    if kind == "int_from_float":
        return "must be a whole number"
    return msg[0].lower() + msg[1:] if msg else msg


def _schema_for(loc: tuple[int | str, ...], root: type[Any]) -> type[Any] | None:
    """The pydantic model class that validates the table at ``loc``, if we can tell."""
    import typing  # noqa: PLC0415

    from pydantic import BaseModel  # noqa: PLC0415

    model: type[Any] = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *typing.get_args(ann)]
        nxt = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if nxt is None:
            return None
        model = nxt
    return model
