"""A tiny name -> object registry, one per kind of thing (backbones, feature shapes, ...).

Where a config field names a registry entry (``model.decoder.feature_shape``,
``data.format``, ...), the config's ``Literal`` in :mod:`evl_platform.config.schema` lists the
same names, so that a bad YAML value is rejected with the allowed names before anything is
built. The config is the lowest layer (torch-free, imported by models and data), so it cannot
read the registries; instead each registry module calls :meth:`Registry.check_names` once its
entries are registered, and importing it fails, naming the file to edit, when the two lists
differ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, get_args

T = TypeVar("T")

SCHEMA_FILE = "evl_platform/config/schema.py"
"""Where the config's ``Literal`` name lists live (named in :meth:`Registry.check_names`)."""


class Registry(Generic[T]):
    """Maps unique names to entries; registering a name twice is an error.

    Args:
        kind: what the entries are, used in error messages ("backbone").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Registers ``entry`` under ``name`` and returns it."""
        if name in self._entries:
            raise KeyError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str) -> T:
        """Returns the entry for ``name``; unknown names list the registered ones."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r} (registered: {known})") from None

    def items(self) -> Iterator[tuple[str, T]]:
        """``(name, entry)`` pairs in registration order (iterating the registry itself gives
        the names sorted)."""
        return iter(list(self._entries.items()))

    def check_names(self, literal: Any, *, literal_name: str, module: str) -> None:
        """Checks that the registered names are exactly the values of a config ``Literal``.

        Args:
            literal: the ``Literal`` type of :mod:`evl_platform.config.schema`.
            literal_name: its name there (``FeatureShape``), for the message.
            module: ``__name__`` of the module that registers the entries.

        Raises:
            RuntimeError: a name is registered but missing from the ``Literal``, or the other
                way round; the message names each and the file to edit.
        """
        allowed = get_args(literal)
        here = module.replace(".", "/") + ".py"
        problems = [
            f"{self.kind} {name!r} is registered in {here} but not allowed by {literal_name}: "
            f"add it to {literal_name} in {SCHEMA_FILE}"
            for name in self._entries
            if name not in allowed
        ] + [
            f"{literal_name} in {SCHEMA_FILE} allows {name!r} but no {self.kind} is registered "
            f"under it: register one in {here} or remove it from {literal_name}"
            for name in allowed
            if name not in self._entries
        ]
        if problems:
            raise RuntimeError("; ".join(problems))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))
