"""Model families that capabilities add to the `Estimator`: a builder (``from_<family>``) and
a loader of their own saved format.

The engine imports no capability: imports point down. A capability registers its family when
its package is imported (`register_family`, in ``deepspark/keras/__init__.py``). The estimator
asks for a family by name (`model_family`) or by a saved path (`family_of_path`); when the
capability has not been imported yet, the registry imports the package `PROVIDERS` names for
it, which registers the family.

Examples
--------
>>> from deepspark.training.model_families import model_family
>>> model_family("keras").name
'keras'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["PROVIDERS", "ModelFamily", "family_of_path", "model_family", "register_family"]

# family -> the package that registers it when imported
PROVIDERS = {"keras": "deepspark.keras"}


@dataclass(frozen=True)
class ModelFamily:
    """What a capability adds to the `Estimator` for its models.

    Attributes
    ----------
    name : str
        ``"keras"`` for ``Estimator.from_keras``.
    build : callable
        ``build(model, *args, **kwargs) -> Estimator``: the ``from_<name>`` builder.
    load : callable
        ``load(path, *, metrics=None) -> Estimator`` for the family's saved format.
    holds_saved_model : callable
        ``holds_saved_model(path) -> bool``: whether `path` is in the family's saved format.
    """

    name: str
    build: Callable[..., Any]
    load: Callable[..., Any]
    holds_saved_model: Callable[[str], bool]


_registered: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> None:
    """Make `family` known to the `Estimator` (a capability calls it once, when imported)."""
    _registered[family.name] = family


def model_family(name: str) -> ModelFamily:
    """The family `name`, its capability imported first if need be."""
    if name not in _registered:
        if name not in PROVIDERS:
            raise ValueError(f"no model family {name!r}; known: {', '.join(sorted(PROVIDERS))}")
        importlib.import_module(PROVIDERS[name])
    return _registered[name]


def family_of_path(path: str) -> ModelFamily | None:
    """The family whose saved format `path` holds, or None (a torch estimator's or a file's)."""
    for name in PROVIDERS:
        family = model_family(name)
        if family.holds_saved_model(path):
            return family
    return None
