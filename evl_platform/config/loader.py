"""Load an experiment YAML file into a validated :class:`ExperimentConfig`.

Resolution order, later wins:

1. the ``base:`` files (each relative to the file naming it), recursively, in order;
2. the file itself;
3. the selected profile's overlay from the merged ``profiles:`` mapping;
4. ``--set a.b.c=value`` overrides.

Mappings merge key by key; lists and scalars replace. Path-valued keys are made absolute
against the directory of the file that wrote them (the working directory for overrides), so a
resolved config can be saved anywhere and loaded again unchanged. :func:`apply_overrides` sets
dotted keys of an already resolved config (a search sample's values) without any file.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import ValidationError

from evl_platform.config.errors import (
    OVERRIDE_LABEL,
    ConfigError,
    Key,
    dotted,
    format_validation_error,
    unknown_key_message,
)
from evl_platform.config.schema import ExperimentConfig, Profile, is_weights_path

PROFILES: tuple[str, ...] = get_args(Profile)
DEFAULT_PROFILE = "local"
PATH_KEYS: tuple[Key, ...] = (
    ("data", "root"),
    ("data", "train_annotations"),
    ("data", "val_annotations"),
    ("data", "label_map"),
    ("features", "cache_dir"),
)
PRETRAINED_KEY: Key = ("model", "backbone", "pretrained")
_NOT_IN_OVERLAY = ("base", "profile", "profiles")


def load_config(
    path: str | Path, *, overrides: Sequence[str] = (), profile: str | None = None
) -> ExperimentConfig:
    """Load, merge, overlay and validate one experiment file.

    Args:
        path: the experiment YAML file; messages name it exactly as given.
        overrides: ``a.b.c=value`` strings, values parsed as YAML. ``profile=<name>`` selects
            the profile (unless ``profile`` is given).
        profile: profile to select; defaults to the file's ``profile`` key, else ``local``.

    Returns:
        The validated config; ``name`` defaults to the file's stem, ``profiles`` is empty.

    Raises:
        ConfigError: on any problem, with a one-line message naming the file and the key.
    """
    source = str(path)
    try:
        parsed = [(text, *parse_override(text)) for text in overrides]
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    data, origins = _load_tree(Path(path), source, chain=())
    if not any(key[0] == "name" and label == source for key, label in origins.items()):
        data["name"] = Path(path).stem  # a name inherited from a base does not leak into children
        origins[("name",)] = source
    selected = profile or _profile_override(parsed) or data.get("profile") or DEFAULT_PROFILE
    _apply_profile(data, origins, selected, source)
    for text, key, value in parsed:
        if key != "profile":
            _apply_override(data, origins, text, key, value, source)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, data, origins, source)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b.c=value`` into the dotted key and the value parsed as YAML.

    Raises:
        ConfigError: when there is no ``=``, the key is empty or has an empty part, or the
            value is not valid YAML.
    """
    key, sep, raw = text.partition("=")
    parts = [part.strip() for part in key.split(".")]
    key = ".".join(parts)
    if not sep or not all(parts):
        raise ConfigError(f"--set {text}: expected key=value with a dotted key, e.g. train.lr=1e-4")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text}: value is not valid YAML: {_yaml_problem(err)}") from None


def apply_overrides(
    cfg: ExperimentConfig,
    values: Mapping[str, Any],
    *,
    source: str = "overrides",
    base_dir: str | Path | None = None,
) -> ExperimentConfig:
    """Set dotted keys of a resolved config, checked like ``--set`` and validated; no file is read.

    Args:
        cfg: the resolved config.
        values: dotted key -> value (a value, not YAML text), e.g. ``{"train.lr": 1e-3}``.
        source: what the values came from; every message starts with it.
        base_dir: directory that relative path values are made absolute against (default: the
            working directory, as for ``--set``).

    Returns:
        A new validated config; ``cfg`` is unchanged.

    Raises:
        ConfigError: one line naming ``source``, the override and the key: an unknown key, a
            profile key, or a value the schema rejects.
    """
    data = cfg.model_dump(mode="json")
    origins: Origins = {}
    directory = Path(base_dir) if base_dir is not None else Path.cwd()
    for key, value in values.items():
        text = f"{key}={json.dumps(value, default=str)}"
        parts = tuple(part.strip() for part in key.split("."))
        problem = _resolved_key_problem(parts)
        if problem:
            raise ConfigError(f"{source}: {text}: {problem}")
        tree = _nested(parts, copy.deepcopy(value))
        _resolve_paths(tree, directory)
        _merge(data, origins, tree, _labelled(tree, text))
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, data, origins, source)) from None


def dump_config(cfg: ExperimentConfig) -> str:
    """YAML text of a resolved config; :func:`load_config` on it yields an equal config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten_config(cfg: ExperimentConfig) -> dict[str, object]:
    """Dotted keys to scalar or list values, e.g. ``{"model.decoder.num_layers": 4, ...}``."""
    leaves = _leaves(cfg.model_dump(mode="json"), ())
    return {dotted(key): value for key, value in leaves if not isinstance(value, Mapping)}


# --- one file and its bases ----------------------------------------------------------------

Tree = dict[Any, Any]
Origins = dict[Key, str]
"""Label of the file (or override) that set each leaf key of a tree."""


def _load_tree(path: Path, shown: str, chain: tuple[tuple[str, str], ...]) -> tuple[Tree, Origins]:
    """Read ``path`` merged over its bases, with paths made absolute per file.

    ``chain`` holds the ``(real path, shown path)`` of the files that led here, for cycles.
    """
    raw = _read_yaml(path, shown, referrer=chain[-1][1] if chain else None)
    directory = Path(os.path.abspath(path)).parent
    _resolve_paths(raw, directory)
    for overlay in _overlays(raw, shown).values():
        _resolve_paths(overlay, directory)
    chain = (*chain, (os.path.realpath(path), shown))
    data: Tree = {}
    origins: Origins = {}
    for entry in _base_entries(raw.pop("base", None), shown):
        base_shown = os.path.normpath(os.path.join(os.path.dirname(shown), entry))
        base_path = path.parent / entry
        seen = [real for real, _ in chain]
        if os.path.realpath(base_path) in seen:
            cycle = [name for _, name in chain[seen.index(os.path.realpath(base_path)) :]]
            raise ConfigError(f"{shown}: base: cycle: {' -> '.join([*cycle, base_shown])}")
        _merge(data, origins, *_load_tree(base_path, base_shown, chain))
    _merge(data, origins, raw, _labelled(raw, shown))
    return data, origins


def _read_yaml(path: Path, shown: str, referrer: str | None) -> dict[Any, Any]:
    """Parse one YAML file whose top level must be a mapping.

    A file with no settings (empty, only comments, or ``null``) is refused rather than read as
    ``{}``: it would silently train the defaults. An explicit ``{}`` is accepted.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        where = (
            f"{referrer}: base: file not found: {shown}" if referrer else f"{shown}: file not found"
        )
        raise ConfigError(where) from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError(f"{shown}: cannot read file: {reason}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{shown}: YAML syntax error {_yaml_problem(err)}") from None
    if raw is None:
        raise ConfigError(f"{shown}: the file holds no settings (empty, only comments or null)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{shown}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def _yaml_problem(err: yaml.YAMLError) -> str:
    """``at line L, column C: <problem>`` (1-based), plus where the broken construct started."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    if mark is None:
        return problem
    text = f"at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    start, context = getattr(err, "context_mark", None), getattr(err, "context", None)
    if start is not None and context and start.line != mark.line:
        text += f" ({context} started at line {start.line + 1}, column {start.column + 1})"
    return text


def _base_entries(value: Any, shown: str) -> list[str]:
    if value is None:
        return []
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        raise ConfigError(f"{shown}: base: expected a path or a list of paths, got {value!r}")
    return entries


def _overlays(raw: dict[Any, Any], shown: str) -> dict[Any, dict[Any, Any]]:
    """Check the shape of a file's ``profiles:`` mapping and return it (``null`` is ``{}``)."""
    if raw.get("profiles") is None:
        raw.pop("profiles", None)
        return {}
    overlays = raw["profiles"]
    if not isinstance(overlays, dict):
        raise ConfigError(f"{shown}: profiles: expected a mapping of profile name -> settings")
    for name in list(overlays):
        if name not in PROFILES:
            raise ConfigError(f"{shown}: profiles: {_unknown_profile(name)}")
        overlays[name] = {} if overlays[name] is None else overlays[name]
        if not isinstance(overlays[name], dict):
            got = overlays[name]
            raise ConfigError(f"{shown}: profiles.{name}: expected a mapping, got {got!r}")
        for key in _NOT_IN_OVERLAY:
            if key in overlays[name]:
                raise ConfigError(f"{shown}: profiles.{name}: {key!r} cannot be set in a profile")
    return overlays


def _unknown_profile(name: Any) -> str:
    return f"unknown profile {name!r} (allowed: {', '.join(PROFILES)})"


# --- paths -----------------------------------------------------------------------------------


def _resolve_paths(tree: dict[Any, Any], directory: Path) -> None:
    """Make the path-valued keys of ``tree`` absolute against ``directory``, in place."""
    for key in (*PATH_KEYS, PRETRAINED_KEY):
        *parents, leaf = key
        node: Any = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(leaf), str) or not node[leaf]:
            continue
        if key == PRETRAINED_KEY and not is_weights_path(node[leaf]):
            continue
        node[leaf] = os.path.normpath(os.path.join(directory, os.path.expanduser(node[leaf])))


# --- merging, profiles, overrides ------------------------------------------------------------


def _merge(
    dst: Tree, origins: Origins, src: Mapping[Any, Any], src_origins: Origins, at: Key = ()
) -> None:
    """Deep-merge ``src`` into ``dst`` (mappings merge, anything else replaces), with origins."""
    for key, value in src.items():
        path = (*at, key)
        if isinstance(value, Mapping) and isinstance(dst.get(key), dict):
            _merge(dst[key], origins, value, src_origins, path)
            continue
        dst[key] = copy.deepcopy(value)
        for stale in [k for k in origins if k[: len(path)] == path]:
            del origins[stale]
        origins.update({k: v for k, v in src_origins.items() if k[: len(path)] == path})


def _leaves(tree: Mapping[Any, Any], prefix: Key) -> Iterator[tuple[Key, Any]]:
    """Every non-mapping value (and empty mapping) of a nested mapping, with its key."""
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _labelled(tree: Mapping[Any, Any], label: str) -> Origins:
    return {key: label for key, _ in _leaves(tree, ())}


def _apply_profile(data: Tree, origins: Origins, selected: Any, source: str) -> None:
    """Merge the selected profile's overlay on top, then drop all overlays."""
    if not isinstance(selected, str) or selected not in PROFILES:
        raise ConfigError(f"{source}: profile: {_unknown_profile(selected)}")
    overlay = (data.pop("profiles", None) or {}).get(selected, {})
    prefix = ("profiles", selected)
    overlay_origins = {
        key[2:]: f"{label}, profiles.{selected}"
        for key, label in origins.items()
        if key[:2] == prefix
    }
    for key in [key for key in origins if key[0] == "profiles"]:
        del origins[key]
    _merge(data, origins, overlay, overlay_origins)
    data["profile"] = selected
    data["profiles"] = {}


def _profile_override(parsed: Sequence[tuple[str, str, Any]]) -> Any:
    """The value of the last ``profile=<name>`` override, if any."""
    chosen = [value for _, key, value in parsed if key == "profile"]
    return chosen[-1] if chosen else None


def _apply_override(
    data: Tree, origins: Origins, text: str, key: str, value: Any, source: str
) -> None:
    """Set one dotted key, after checking it names a schema field."""
    parts = tuple(key.split("."))
    if parts[0] == "profiles":
        raise ConfigError(
            f"{source}: --set {text}: overlays cannot be overridden; select a profile instead"
        )
    problem = unknown_key_message(parts)
    if problem:
        raise ConfigError(f"{source}: --set {text}: {problem}")
    tree = _nested(parts, value)
    _resolve_paths(tree, Path.cwd())
    _merge(data, origins, tree, _labelled(tree, OVERRIDE_LABEL + text))


def _resolved_key_problem(parts: Key) -> str | None:
    """Why a dotted key cannot be set on a resolved config, or ``None`` when it can."""
    if not all(parts):
        return "expected a dotted key, e.g. train.lr"
    if parts[0] in ("profile", "profiles"):
        return "the profile and its overlays were applied when the config was loaded"
    return unknown_key_message(parts)


def _nested(parts: Key, value: Any) -> Tree:
    """``("a", "b"), 1`` -> ``{"a": {"b": 1}}``."""
    tree: Any = value
    for part in reversed(parts):
        tree = {part: tree}
    return tree
