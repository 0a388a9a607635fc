"""``lorahub hub build`` and ``lorahub hub report``: thin argparse wiring over :mod:`lorahub.hub`.

``lorahub/cli.py`` calls :func:`register`; ``python -m lorahub.hub_cli hub build ...`` runs the same
commands without it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

from .train import TrainConfig

_DEFAULTS = {f.name: f for f in fields(TrainConfig)}


def _help(name: str) -> str:
    f = _DEFAULTS[name]
    default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
    if isinstance(default, list):
        default = ",".join(default)
    return f"{f.metadata['help']} (default: {default})"


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """The trainer's flags, one per :class:`TrainConfig` field, help taken from the field metadata."""
    g = p.add_argument_group("training (one module per task)")
    g.add_argument("--rank", type=int, default=16, help=_help("rank"))
    g.add_argument("--alpha", type=float, default=32.0, help=_help("alpha"))
    g.add_argument("--dropout", type=float, default=0.1, help=_help("dropout"))
    g.add_argument("--targets", default="q_proj,v_proj", help=_help("target_modules") + "; comma-separated")
    g.add_argument("--steps", type=int, default=TrainConfig.steps, help=_help("steps"))
    g.add_argument("--lr", type=float, default=TrainConfig.lr, help=_help("lr"))
    g.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps, help=_help("warmup_steps"))
    g.add_argument("--weight-decay", type=float, default=0.0, help=_help("weight_decay"))
    g.add_argument("--grad-clip", type=float, default=1.0, help=_help("grad_clip"))
    g.add_argument("--batch-size", type=int, default=8, help=_help("batch_size"))
    g.add_argument("--modules-per-step", type=int, default=1, help=_help("modules_per_step"))
    g.add_argument("--max-length", type=int, default=256, help=_help("max_length"))
    g.add_argument("--mixer", action=argparse.BooleanOptionalAction, default=False, help=_help("mixer"))
    g.add_argument("--seed", type=int, default=0, help=_help("seed"))


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=args.targets, steps=args.steps,
        lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        batch_size=args.batch_size, modules_per_step=args.modules_per_step, max_length=args.max_length,
        mixer=args.mixer, seed=args.seed,
    )


def _names(value: str | None) -> list[str] | None:
    if not value:
        return None
    out: list[str] = []
    for part in value.split(","):
        part = part.strip()
        if part.startswith("@"):  # @file: one name a line
            with open(part[1:], encoding="utf-8") as f:
                out += [line.strip() for line in f if line.strip() and not line.startswith("#")]
        elif part:
            out.append(part)
    return out


def cmd_build(args: argparse.Namespace) -> int:
    from .hub import build_hub, format_table, hub_report

    config = train_config_from_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    manifest = build_hub(
        args.tasks, args.base_model, args.out, config, only=_names(args.only), max_modules=args.max_modules,
        heldout=args.heldout, eval_examples=args.eval_examples, require_improvement=args.require_improvement,
        name=args.name, progress=not args.quiet, device=args.device,
    )
    print(f"manifest: {manifest}")
    print(format_table(hub_report(manifest)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .hub import format_table, hub_report

    print(format_table(hub_report(args.manifest)))
    return 0


def register(subparsers: Any) -> None:
    """Add ``hub build`` and ``hub report`` to a ``lorahub`` argparse subparsers object."""
    hub = subparsers.add_parser("hub", help="build a module hub (one LoRA per task) and report its quality")
    sub = hub.add_subparsers(dest="hub_command", required=True)

    b = sub.add_parser(
        "build", help="train one LoRA module per task (resumable)",
        description="Train one LoRA (or MoSLoRA, --mixer) module per task into OUT/<task>/, with a manifest "
        "OUT.json beside OUT (sha256 + quality report per module). Safe to kill: a rerun resumes and never "
        "retrains a finished module. Modules that do not beat the base on their held-out examples are rejected.",
    )
    b.add_argument("--tasks", required=True, help="task folder: BIG-bench layout (index.json + tasks/*.jsonl) or plain *.jsonl with input/output")
    b.add_argument("--base-model", default=None, help="base model id or path (default: smollm2-135m-instruct)")
    b.add_argument("--out", required=True, help="output folder of the modules; the manifest is OUT.json beside it")
    b.add_argument("--only", default=None, help="comma-separated task names (or @file, one a line); builds them in this order")
    b.add_argument("--max-modules", type=int, default=None, help="stop once the manifest holds this many modules")
    b.add_argument("--heldout", type=int, default=50, help="examples of each task kept out of training, at least (default: 50; 10%% for larger tasks)")
    b.add_argument("--eval-examples", type=int, default=50, help="held-out examples scored for the quality report (default: 50)")
    b.add_argument("--require-improvement", action=argparse.BooleanOptionalAction, default=True,
                   help="reject modules whose held-out exact match does not beat the base model's (default: on)")
    b.add_argument("--name", default=None, help="hub name in the manifest (default: OUT's folder name)")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    add_train_flags(b)
    b.set_defaults(func=cmd_build)

    r = sub.add_parser("report", help="print the quality table of a hub manifest")
    r.add_argument("manifest", help="manifest file, or hub name looked up in hub_index/")
    r.set_defaults(func=cmd_report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorahub")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
