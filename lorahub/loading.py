"""What ``compose()``-style calls are given, loaded: the ``modules`` argument as a store, the ``base_model``
argument as a (model, tokenizer, name), and the chosen modules stacked on the model's device and dtype.

Its own module so that :mod:`lorahub.api` (``compose``, ``from_weights``) and :mod:`lorahub.routed`
(``load_routed``) read their arguments the same way without importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .models import DEFAULT_BASE_MODEL, load_base
from .store import ModuleStore, StackedModules

DEFAULT_HUB = "smollm2-135m-bigbench"


def resolve_store(modules: Any) -> ModuleStore:
    """None → the default hub; a str → a hub name or manifest; a list → module folders or hub ids."""
    if isinstance(modules, ModuleStore):
        return modules
    if modules is None or isinstance(modules, (str, Path)):
        return ModuleStore.from_manifest(modules or DEFAULT_HUB)
    store = ModuleStore()
    for loc in modules:
        store.add_path(loc)
    return store


def load_base_for(base_model: Any, store: ModuleStore, device: Any) -> tuple[Any, Any, str]:
    """(model, tokenizer, name): a loaded pair is used as is, else the named model (or the hub's base) loads."""
    if isinstance(base_model, tuple):
        model, tokenizer = base_model
        return model, tokenizer, getattr(model, "lorahub_base_name", None) or model.config.name_or_path
    name = base_model or store.base_model or DEFAULT_BASE_MODEL
    model, tokenizer = load_base(name, device=device)
    return model, tokenizer, name


def stack_for(store: ModuleStore, names: Sequence[str], model: Any, base_name: str) -> StackedModules:
    """``store.stack(names)`` checked against ``model`` and put on its device, in its dtype."""
    p = next(model.parameters())
    return store.stack(names, model, base_name=base_name, device=p.device, dtype=p.dtype)
