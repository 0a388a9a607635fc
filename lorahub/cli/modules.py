"""``lorahub modules list | verify | add``: look at a hub's modules, check them, describe new ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .flags import add_command


@dataclass
class HubChoice:
    """The hub a ``modules`` command looks at."""

    hub: str | None = field(default=None, metadata={"help": "hub name or manifest path (default: the default hub)"})


@dataclass
class ModuleAddConfig:
    """Options of ``lorahub modules add``."""

    manifest: str = field(metadata={"help": "manifest JSON file (created if missing)", "positional": True})
    path: str = field(metadata={"help": "PEFT LoRA folder or hf://owner/repo", "positional": True})
    name: str | None = field(default=None, metadata={"help": "module name (default: folder name)"})
    task: str | None = field(default=None, metadata={"help": "task the module was trained on"})


def cmd_list(cfg: HubChoice, *, command: str) -> int:
    from ..api import resolve_store

    store = resolve_store(cfg.hub)
    print(f"hub {store.name}  base {store.base_model}  {len(store)} modules")
    for spec in store.specs.values():
        extra = "  ".join(f"{k}={v}" for k, v in spec.extra.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        print(f"  {spec.name:40s} task={spec.task or '-':30s} r={spec.rank}  sha256={(spec.sha256 or '-')[:12]}  {extra}")
    return 0


def cmd_verify(cfg: HubChoice, *, command: str) -> int:
    from ..api import resolve_store

    store = resolve_store(cfg.hub)
    bad = 0
    for name, err in store.verify():
        print(f"  {'ok ' if err is None else 'BAD'}  {name}" + ("" if err is None else f"  {err}"))
        bad += err is not None
    print(f"{len(store) - bad}/{len(store)} modules verified")
    return 1 if bad else 0


def cmd_add(cfg: ModuleAddConfig, *, command: str) -> int:
    from ..store import add_to_manifest

    entry = add_to_manifest(cfg.manifest, cfg.path, name=cfg.name, task=cfg.task)
    print(f"added {entry['name']} to {cfg.manifest} (sha256 {entry['sha256'][:12]})")
    return 0


def register(sub: Any) -> None:
    """``modules`` with ``list``, ``verify`` and ``add``."""
    m = sub.add_parser("modules", help="list, add or verify modules of a hub").add_subparsers(dest="action", required=True)
    add_command(m, "list", cmd_list, HubChoice, help="list a hub's modules")
    add_command(m, "verify", cmd_verify, HubChoice, help="load every module, checking sha256 and shapes")
    add_command(m, "add", cmd_add, ModuleAddConfig, overrides={"manifest": {"metavar": "MANIFEST"}, "path": {"metavar": "PATH"}},
                help="add a PEFT LoRA folder (or hub id) to a manifest, recording its sha256")
