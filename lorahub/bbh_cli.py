"""``lorahub bbh``: thin argparse wiring over :func:`lorahub.bench.runner.run_bbh`.

``lorahub/cli.py`` calls :func:`register`; ``python -m lorahub.bbh_cli bbh ...`` runs the same command.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

_HELP: dict[str, str] = {}


def _help(name: str) -> str:
    if not _HELP:
        from .bench.runner import BBHConfig

        _HELP.update({f.name: f.metadata.get("help", "") for f in fields(BBHConfig)})
    return _HELP[name]


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _seeds(value: str) -> list[int]:
    try:
        return [int(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {value!r}") from None


def cmd_bbh(args: argparse.Namespace) -> int:
    from .bench.runner import BBHConfig, report_bbh, run_bbh

    if args.report_only:
        report_bbh(args.out)
        return 0

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    hub: Any = args.modules or args.hub
    kwargs: dict[str, Any] = dict(
        out=args.out, tasks=args.tasks, seeds=args.seeds, limit=args.limit, base_model=args.base_model, hub=hub,
        budget=args.budget, device=args.device, data_dir=args.data_dir, adapters=args.adapter or [], shots=args.shots,
        split_seed=args.split_seed, batch_size=args.batch_size, threads=args.threads, ray=args.ray,
        ray_address=args.ray_address, ray_actors=args.ray_actors, progress=args.progress,
    )
    if args.methods is not None:  # "--methods ''" with --adapter: only the adapters
        kwargs["methods"] = args.methods
    cfg = BBHConfig(**kwargs)
    run_bbh(cfg)
    return 0


def register(subparsers: Any) -> None:
    """Add ``bbh`` to a ``lorahub`` argparse subparsers object."""
    from .bench.methods import DEFAULT_METHODS, METHODS
    from .bench.runner import DEFAULT_SEEDS

    p = subparsers.add_parser(
        "bbh", help="BIG-Bench Hard with LoraHub's protocol: zero-shot, ICL, best single module, LoraHub",
        description="Run LoraHub's BBH protocol (5 learning examples per task, the rest for testing; exact match) "
        "for each task x method x seed, appending one line per job to OUT/results.jsonl, then write OUT/summary.md "
        "and OUT/per_task.png. A rerun with the same --out skips finished jobs; a different configuration is "
        f"refused. Methods: {', '.join(METHODS)}, and adapter:NAME for each --adapter DIR.",
    )
    p.add_argument("--out", required=True, help=_help("out"))
    p.add_argument("--tasks", type=_csv, default=None, help=_help("tasks"))
    p.add_argument("--methods", type=_csv, default=None, help=f"{_help('methods')} (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--seeds", type=_seeds, default=list(DEFAULT_SEEDS),
                   help=f"{_help('seeds')} (default: {','.join(map(str, DEFAULT_SEEDS))})")
    p.add_argument("--limit", type=int, default=None, help=_help("limit"))
    p.add_argument("--base-model", default=None, help=_help("base_model"))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--hub", default=None, help=_help("hub"))
    g.add_argument("--modules", nargs="+", default=None, metavar="PATH", help="module folders instead of a hub")
    p.add_argument("--budget", type=int, default=40, help=f"{_help('budget')} (default: 40)")
    p.add_argument("--adapter", action="append", default=None, metavar="DIR",
                   help=_help("adapters") + "; repeatable; the row is adapter:<folder name>")
    p.add_argument("--device", default=None, help=_help("device"))
    p.add_argument("--data-dir", default=None, help=_help("data_dir"))
    p.add_argument("--shots", type=int, default=5, help=f"{_help('shots')} (default: 5, LoraHub's)")
    p.add_argument("--split-seed", type=int, default=42, help=f"{_help('split_seed')} (default: 42)")
    p.add_argument("--batch-size", type=int, default=16, help=f"{_help('batch_size')} (default: 16)")
    p.add_argument("--threads", type=int, default=None, help=_help("threads"))
    p.add_argument("--ray", action="store_true", help=_help("ray") + " (needs the ray extra: pip install 'lorahub[ray]')")
    p.add_argument("--ray-address", default=None, help=_help("ray_address") + "; implies --ray")
    p.add_argument("--ray-actors", type=int, default=None, help=_help("ray_actors"))
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help=_help("progress"))
    p.add_argument("--report-only", action="store_true",
                   help="rewrite OUT/summary.md and OUT/per_task.png from the results so far and run nothing "
                   "(safe while a run is still writing to OUT)")
    p.set_defaults(func=cmd_bbh)


def main(argv: list[str] | None = None) -> int:
    """``python -m lorahub.<this module> ...`` is ``lorahub ...`` (same parser, same error handling)."""
    from .cli import main as lorahub_main

    return lorahub_main(argv)


if __name__ == "__main__":
    sys.exit(main())
