"""One-line, user-facing configuration errors, worded from the typed schema itself.

A pydantic :class:`~pydantic.ValidationError` is turned into a single line such as
``experiments/x.yaml: model.decoder.num_layers: expected int >= 1, got 'four'``: the dotted key,
what the schema field allows (its type and ``Field`` constraints), and the offending value.
"""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from evl_platform.config.schema import ExperimentConfig

Key = tuple[Any, ...]
"""A dotted config key as a tuple of its parts, ``("model", "decoder", "num_layers")``."""

OVERRIDE_LABEL = "--set "
"""Origin labels starting with this name a command-line override rather than a file."""

_CONSTRAINTS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


class ConfigError(ValueError):
    """A configuration problem; ``str(err)`` is one line, ready to print to a user."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*\n\s*", " ", message).strip())


def dotted(key: Sequence[Any]) -> str:
    """Render a key tuple as ``a.b.c``."""
    return ".".join(str(part) for part in key)


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (looking inside ``X | None``), or ``None``."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            found = submodel(arg)
            if found is not None:
                return found
    return None


def walk_schema(key: Sequence[Any]) -> tuple[Key, FieldInfo | None, type[BaseModel] | None]:
    """Follow ``key`` through the schema for as long as its parts name fields.

    Returns:
        The field path walked, the last field reached (``None`` at the top level), and the
        model held by that field (``ExperimentConfig`` at the top level; ``None`` for a value).
    """
    model: type[BaseModel] | None = ExperimentConfig
    field: FieldInfo | None = None
    path: list[Any] = []
    for part in key:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            break
        field = model.model_fields[part]
        path.append(part)
        model = submodel(field.annotation)
    return tuple(path), field, model


def unknown_key_message(key: Key) -> str | None:
    """Why ``key`` names no schema field, or ``None`` when it does."""
    path, field, model = walk_schema(key)
    if len(path) == len(key):
        return None
    bad = key[len(path)]
    if model is None and field is not None:
        return f"unknown key {bad!r} ({dotted(path)} is {describe_field(field)}, not a mapping)"
    allowed = ", ".join(model.model_fields) if model is not None else ""
    return f"unknown key {bad!r} (allowed: {allowed})"


def describe_field(field: FieldInfo) -> str:
    """What a field accepts, e.g. ``int >= 1``, ``one of 'dense', 'uniform'``, ``str or null``."""
    args = get_args(field.annotation)
    is_union = get_origin(field.annotation) in (Union, types.UnionType)
    nullable = is_union and type(None) in args
    core = [a for a in args if a is not type(None)] if is_union else [field.annotation]
    text = " or ".join(describe_type(tp) for tp in core)
    limits = _constraints(field.metadata)
    if limits:
        text = f"{text} {limits}"
    return f"{text} or null" if nullable else text


def describe_type(tp: Any) -> str:
    """A short, user-facing name of a type annotation."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {describe_type(args[0])}"
        if len(set(args)) == 1:
            return f"list of {len(args)} {describe_type(args[0])}"
        return "list of (" + ", ".join(describe_type(arg) for arg in args) + ")"
    if origin in (list, set, frozenset) or tp in (list, tuple):
        return f"list of {describe_type(args[0])}" if args else "list"
    if origin is dict or tp is dict or submodel(tp) is not None:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _constraints(metadata: Sequence[Any]) -> str:
    parts = []
    for item in metadata:
        for attr, symbol in _CONSTRAINTS:
            if getattr(item, attr, None) is not None:
                parts.append(f"{symbol} {getattr(item, attr)}")
        if getattr(item, "pattern", None) is not None:
            parts.append(f"matching {item.pattern}")
    return " and ".join(parts)


@dataclass(frozen=True)
class _Issue:
    key: Key  # full key of the problem, for origin lookup and the "N more" list
    shown: Key  # key printed before the message
    message: str


def format_validation_error(
    error: ValidationError, data: Mapping[Any, Any], origins: Mapping[Key, str], source: str
) -> str:
    """Word a pydantic error as one line naming the file, the dotted key and what is allowed.

    Args:
        error: raised by ``ExperimentConfig.model_validate(data)``.
        data: the merged mapping that was validated (the offending values are read from it).
        origins: label of the file or override that set each leaf key of ``data``.
        source: the config file as the user named it; every message starts with it.
    """
    issues = [_issue(err, data) for err in error.errors()]
    first = issues[0]
    text = _locate(first, origins, source)
    others = list(dict.fromkeys(dotted(i.key) for i in issues[1:] if i.key != first.key))
    if others:
        text += f" (and {len(others)} more: {', '.join(others)})"
    return text


def _issue(err: Mapping[str, Any], data: Mapping[Any, Any]) -> _Issue:
    loc, kind = tuple(err["loc"]), err["type"]
    if kind == "extra_forbidden":
        path, _, model = walk_schema(loc[:-1])
        allowed = ", ".join(model.model_fields) if model is not None else ""
        key = (*path, loc[len(path)])
        return _Issue(key, path, f"unknown key {key[-1]!r} (allowed: {allowed})")
    path, field, _ = walk_schema(loc)
    if kind in ("value_error", "assertion_error"):
        message = re.sub(r"^(Value error|Assertion failed), ", "", err["msg"])
        return _Issue(path, path, message)
    if field is None or len(path) == 0:
        return _Issue(loc, loc, err["msg"])
    expected = describe_field(field)
    if kind == "missing" and len(path) == len(loc):
        return _Issue(path, path, f"missing (expected {expected})")
    got = _lookup(data, path, err.get("input"))
    return _Issue(path, path, f"expected {expected}, got {got!r}")


def _lookup(data: Mapping[Any, Any], key: Key, default: Any) -> Any:
    node: Any = data
    for part in key:
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _locate(issue: _Issue, origins: Mapping[Key, str], source: str) -> str:
    """Prefix an issue with the file, and with the override or base file that caused it."""
    body = f"{dotted(issue.shown)}: {issue.message}" if issue.shown else issue.message
    exact = origins.get(issue.key)
    candidates = (
        [exact] if exact else [o for k, o in origins.items() if k[: len(issue.key)] == issue.key]
    )
    overrides = [label for label in candidates if label.startswith(OVERRIDE_LABEL)]
    if overrides:
        return f"{source}: {overrides[-1]}: {body}"
    if exact and exact != source:
        return f"{source}: {body} (set in {exact})"
    return f"{source}: {body}"
