"""Device backends, one module each, found by name.

A backend module registers its class with `@register_backend("name")` and imports its heavy
dependencies (torch, tensorrt) lazily, so discovering backends costs nothing. Adding a backend is
adding one module to this package.
"""
from __future__ import annotations

import importlib
import pkgutil

from deploykit.errors import DeployKitError

from .base import Backend, LayerProfile, LayerTiming

_REGISTRY: dict[str, type[Backend]] = {}
_discovered = False


def register_backend(name: str):
    def deco(cls: type[Backend]) -> type[Backend]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"backend {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def _discover() -> None:
    global _discovered
    if not _discovered:
        for mod in pkgutil.iter_modules(__path__):
            if mod.name != "base":
                importlib.import_module(f"{__name__}.{mod.name}")
        _discovered = True


def list_backends() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def backend_class(name: str) -> type[Backend]:
    _discover()
    if name not in _REGISTRY:
        raise DeployKitError(f"unknown backend {name!r}: choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_backend(name: str, **options) -> Backend:
    """Instantiate a backend; raises DeployKitError naming what to install when it cannot run here."""
    cls = backend_class(name)
    cls.check_available()
    return cls(**options)


__all__ = ["Backend", "LayerProfile", "LayerTiming", "register_backend", "list_backends", "backend_class", "get_backend"]
