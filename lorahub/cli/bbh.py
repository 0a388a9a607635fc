"""``lorahub bbh`` (options: :class:`lorahub.bench.runner.BBHConfig` + :class:`BBHCommandOptions`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..bench.methods import DEFAULT_METHODS, METHODS
from ..bench.runner import BBHConfig
from ..errors import LorahubValueError
from .flags import add_command


@dataclass
class BBHCommandOptions:
    """What the command adds to :class:`BBHConfig`."""

    modules: list[str] | None = field(default=None, metadata={"help": "module folders instead of a hub"})
    report_only: bool = field(default=False, metadata={
        "help": "rewrite OUT/summary.md and OUT/per_task.png from the results so far and run nothing "
                "(safe while a run is still writing to OUT); with --methods, about those methods only"})


def cmd_bbh(cfg: BBHConfig, opts: BBHCommandOptions, *, command: str) -> int:
    from ..bench.runner import report_bbh, run_bbh

    if opts.report_only:  # --methods, where given, keeps the summary to those methods
        report_bbh(cfg.out, methods=None if cfg.methods == DEFAULT_METHODS else cfg.methods)
        return 0
    if opts.modules and cfg.hub:
        raise LorahubValueError("give either --hub or --modules, not both")
    if opts.modules:
        cfg = replace(cfg, hub=opts.modules)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    run_bbh(cfg)
    return 0


def register(sub: Any) -> None:
    """``bbh``."""
    add_command(
        sub, "bbh", cmd_bbh, BBHConfig, BBHCommandOptions,
        titles={BBHConfig: "benchmark", BBHCommandOptions: "command"},
        overrides={"adapters": {"flags": ("--adapter",), "metavar": "DIR", "repeatable": True},
                   "modules": {"metavar": "PATH"}, "tasks": {"metavar": "TASK"}, "methods": {"metavar": "METHOD"}},
        help="BIG-Bench Hard with LoraHub's protocol: zero-shot, ICL, best single module, LoraHub",
        description="Run LoraHub's BBH protocol (5 learning examples per task, the rest for testing; exact match) "
        "for each task x method x seed, appending one line per job to OUT/results.jsonl, then write OUT/summary.md "
        "and OUT/per_task.png. A rerun with the same --out skips finished jobs; a different configuration is "
        f"refused. Methods: {', '.join(METHODS)}, and adapter:NAME for each --adapter DIR.",
    )
