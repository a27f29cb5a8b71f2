"""Options: a sampler, a guidance method, a process, an objective, a metric is one class that owns its settings, their
rules and its name.

An option's fields (or its constructor's keyword arguments) are its config keys, with their defaults; making one
checks them, raising a one-line ``ConfigError`` that names the key and the allowed values; ``name`` is the option's
name in ``conf/<group>/``. ``Registry`` collects the options of one axis as their classes are defined (each module of
a package such as ``ddpm/core/samplers`` is imported by the package), so a new option is its module and its YAML file;
validation builds the configured options and so runs their checks.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from ddpm.core.errors import ConfigError


def number(value) -> bool:
    """A finite real number (not a bool, not NaN or infinite): the one test of "is this a number" everywhere."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """ConfigError ``key=value: must be allowed`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: must be {allowed}")


def one_of(key: str, value: Any, allowed) -> None:
    require(value in allowed, key, value, f"one of {list(allowed)}")


def settings_of(option: Any) -> dict:
    """An option's settings as plain data: a dataclass's fields, else its constructor's keyword arguments read back
    from the attributes of the same name (what the protocols record and the messages show)."""
    if is_dataclass(option):
        return {f.name: getattr(option, f.name) for f in fields(option) if f.repr}
    parameters = inspect.signature(type(option).__init__).parameters
    return {name: getattr(option, name) for name in parameters if name != "self" and hasattr(option, name)}


def defaults_of(cls: type) -> dict:
    """The default of each setting of an option class."""
    if is_dataclass(cls):
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if p.default is not p.empty}


def differing(option: Any) -> dict:
    """The settings of ``option`` that differ from its class's defaults (a message names those)."""
    defaults = defaults_of(type(option))
    return {k: v for k, v in settings_of(option).items() if not (k in defaults and defaults[k] == v)}


class Registry(dict):
    """``{name: option class}`` of one axis, in the order they were defined (``order`` first, where a class sets one);
    ``load(package)`` imports every module of a package, so its options register themselves."""

    def __init__(self, axis: str):
        super().__init__()
        self.axis = axis

    def add(self, cls: type) -> type:
        self[cls.name] = cls
        ordered = sorted(self.items(), key=lambda item: getattr(item[1], "order", 100))
        self.clear()
        self.update(ordered)
        return cls

    def load(self, package: str) -> "Registry":
        module = importlib.import_module(package)
        for info in pkgutil.iter_modules(module.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package}.{info.name}")
        return self

    def get_option(self, name: str) -> type:
        """The class named ``name``; ConfigError naming the axis's key and its options otherwise."""
        if name not in self:
            raise ConfigError(f"{self.axis}={name!r}: must be one of {list(self)}")
        return self[name]
