"""Names a user picks (models, scorers, commands) and the objects they stand for, built in or from plugins.

A :class:`Registry` holds three sources of names:

- built-ins, given as ``"module:attribute"`` strings (or ``"module"``) and imported only when their name
  is used, so the module that owns a registry never imports what it lists;
- plugins, the entry points of one group that installed distributions declare (``pyproject.toml``:
  ``[project.entry-points."maskray.models"]``, ``name = "package.module:attribute"``). They are read from
  the installed metadata, so every process sees the same names, Ray workers included; the group is read
  once, on the first lookup, and each entry point is imported when its name is first used;
- objects registered at run time with :meth:`Registry.register`.

A name may come from one source only: two objects under one name would make the choice depend on which
package happens to be installed or imported first. This module imports only the standard library.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any


class PluginError(ImportError):
    """A registered ``module:attribute`` could not be imported; the message names the entry point."""


class Registry:
    """Name -> object, from built-in ``module:attribute`` strings, an entry-point group and run-time registration.

    Args:
        kind: What the names stand for, singular ("model", "scorer"): used in error messages.
        group: The entry-point group plugins declare their names under, such as ``maskray.models``.
        builtins: Name -> ``"module:attribute"`` (or ``"module"``) of the objects that ship with maskray.
        plural: ``kind`` in the plural, when it is not ``kind`` + "s".
    """

    def __init__(self, kind: str, group: str, builtins: Mapping[str, str], plural: str | None = None) -> None:
        self.kind, self.group, self.plural = kind, group, plural or f"{kind}s"
        self._entries: dict[str, EntryPoint | Any] = {
            name: EntryPoint(name=name, value=value, group=group) for name, value in builtins.items()}
        self._builtins = frozenset(builtins)
        self._loaded: dict[str, Any] = {}
        self._plugins_read = False
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._read_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._read_plugins()
        return name in self._entries

    def get(self, name: str) -> Any:
        """The object registered as ``name``, imported on first use.

        Raises:
            ValueError: ``name`` is not registered; the message lists the registered names.
            PluginError: the module of ``name``'s entry point fails to import or lacks the attribute.
        """
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(self.names())}")
        if name not in self._loaded:
            entry = self._entries[name]
            self._loaded[name] = self._load(entry) if isinstance(entry, EntryPoint) else entry
        return self._loaded[name]

    def register(self, name: str, obj: Any) -> None:
        """Register ``obj`` as ``name`` in this process (plugins that all processes see use entry points).

        Raises:
            ValueError: ``name`` is already registered.
        """
        self._read_plugins()
        with self._lock:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._origin(name)})")
            self._entries[name] = obj

    def _read_plugins(self) -> None:
        if self._plugins_read:
            return
        with self._lock:
            if self._plugins_read:
                return
            plugins: dict[str, EntryPoint] = {}
            for entry in entry_points(group=self.group):
                if entry.name in self._entries or entry.name in plugins:
                    first = self._origin(entry.name) if entry.name in self._entries else _describe(plugins[entry.name])
                    raise PluginError(f"{_describe(entry)} declares {self.kind} {entry.name!r}, which {first} "
                                      "declares too; uninstall one of the two distributions or rename the entry point")
                plugins[entry.name] = entry
            self._entries.update(plugins)
            self._plugins_read = True

    def _origin(self, name: str) -> str:
        entry = self._entries[name]
        if name in self._builtins:
            return f"maskray's built-in {entry.value}"
        return _describe(entry) if isinstance(entry, EntryPoint) else "a run-time registration"

    def _load(self, entry: EntryPoint) -> Any:
        try:
            return entry.load()
        except Exception as error:  # whatever a plugin's import raises: name the plugin, keep the cause
            raise PluginError(f"{self.kind} {entry.name!r} ({self._origin(entry.name)}) failed to load: "
                              f"{type(error).__name__}: {error}. Reinstall the distribution that declares it "
                              "(pip install -e . in its clone) or uninstall it") from error


def _describe(entry: EntryPoint) -> str:
    """``entry point 'name = module:attr' of distribution maskray 0.1.0 (group maskray.models)``."""
    dist = f" of distribution {entry.dist.name} {entry.dist.version}" if entry.dist is not None else ""
    return f"entry point '{entry.name} = {entry.value}'{dist} (group {entry.group})"
