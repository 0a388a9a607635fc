"""Writing hub manifests (``hub_index/NAME.json``); reading them is :meth:`ModuleStore.from_manifest`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ._io import atomic_write_json, sha256_file
from .errors import LorahubValueError
from .store import HUB_PREFIX, SAFETENSORS_WEIGHTS, LEGACY_WEIGHTS, read_module


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        return {"name": path.stem, "modules": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LorahubValueError(f"manifest {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    data.setdefault("modules", [])
    return data


def upsert_entry(path: str | os.PathLike, entry: dict[str, Any], **header: Any) -> None:
    """Add or replace the module entry of the same name; header keys fill the manifest's top level if unset."""
    data = load_manifest(path)
    for k, v in header.items():
        data.setdefault(k, v)
    data["modules"] = [m for m in data["modules"] if m.get("name") != entry["name"]] + [entry]
    atomic_write_json(path, data)


def add_to_manifest(manifest: str | os.PathLike, location: str, *, name: str | None = None, task: str | None = None) -> dict[str, Any]:
    """Describe a local PEFT LoRA folder (rank, alpha, targets, base, sha256) in ``manifest``."""
    manifest = Path(manifest)
    if location.startswith(HUB_PREFIX):
        entry = {"name": name or location.rsplit("/", 1)[-1], "location": location, "task": task}
    else:
        folder = Path(location).resolve()
        module = read_module(folder, name)
        weights = folder / SAFETENSORS_WEIGHTS if (folder / SAFETENSORS_WEIGHTS).is_file() else folder / LEGACY_WEIGHTS
        rel = os.path.relpath(folder, manifest.resolve().parent)
        entry = {
            "name": name or folder.name, "location": rel, "task": task, "base_model": module.base_model,
            "rank": module.rank, "alpha": module.alpha,
            "target_modules": sorted({l.rsplit(".", 1)[-1] for l in module.layers}), "sha256": sha256_file(weights),
        }
    upsert_entry(manifest, {k: v for k, v in entry.items() if v is not None})
    return entry
