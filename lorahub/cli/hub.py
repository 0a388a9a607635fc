"""``lorahub hub build`` (options: :class:`HubBuildConfig` + :class:`lorahub.train.TrainConfig`), ``hub embed`` and
``hub report``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..train import TrainConfig
from .flags import add_command, parse_names


@dataclass
class HubBuildConfig:
    """The build's own options (how each module trains is :class:`~lorahub.train.TrainConfig`)."""

    tasks: str = field(metadata={"help": "task folder: BIG-bench layout (index.json + tasks/*.jsonl) or plain *.jsonl with input/output"})
    out: str = field(metadata={"help": "output folder of the modules; the manifest is OUT.json beside it"})
    base_model: str | None = field(default=None, metadata={"help": "base model id or path (default: smollm2-135m-instruct)"})
    only: list[str] | None = field(default=None, metadata={
        "help": "task names (or @file, one a line), comma-separated; builds them in this order (default: every task)"})
    max_modules: int | None = field(default=None, metadata={"help": "stop once the manifest holds this many modules"})
    heldout: int = field(default=50, metadata={"help": "examples of each task kept out of training, at least (10% for larger tasks)"})
    eval_examples: int = field(default=50, metadata={"help": "held-out examples scored for the quality report"})
    require_improvement: bool = field(default=True, metadata={
        "help": "reject modules whose held-out exact match does not beat the base model's"})
    name: str | None = field(default=None, metadata={"help": "hub name in the manifest (default: OUT's folder name)"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda if available)"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch (default: torch's choice)"})
    embed: bool = field(default=True, metadata={
        "help": "store each module's task embedding (all-MiniLM-L6-v2) for retrieval, as it is saved"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})


@dataclass
class HubEmbedConfig:
    """Options of ``lorahub hub embed``."""

    manifest: str = field(metadata={"help": "manifest file, or hub name looked up in the hub folder", "positional": True})
    tasks: str | None = field(default=None, metadata={
        "help": "the modules' task data (BIG-bench layout or plain *.jsonl by task name); without it, the examples "
                "each manifest entry records"})
    embedder: str | None = field(default=None, metadata={
        "help": "sentence-transformers model id or folder (default: the hub's embedder, else all-MiniLM-L6-v2)"})
    only_missing: bool = field(default=False, metadata={"help": "keep the vectors already stored; embed the rest"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})


@dataclass
class HubReportConfig:
    """Options of ``lorahub hub report``."""

    manifest: str = field(metadata={"help": "manifest file, or hub name looked up in the hub folder", "positional": True})


def cmd_build(build: HubBuildConfig, config: TrainConfig, *, command: str) -> int:
    from ..export import check_output_dir
    from ..files import output_lock
    from ..hub import BUILD_LOG, build_hub, format_table, hub_report

    with output_lock(build.out):  # one writer per output folder; a second process is refused
        check_output_dir(build.out, marker=BUILD_LOG)  # a rerun into its own folder resumes
        if build.threads:
            import torch

            torch.set_num_threads(build.threads)
        manifest = build_hub(
            build.tasks, build.base_model, build.out, config, only=parse_names(build.only), max_modules=build.max_modules,
            heldout=build.heldout, eval_examples=build.eval_examples, require_improvement=build.require_improvement,
            name=build.name, progress=build.progress, device=build.device, embed=build.embed,
        )
        print(f"manifest: {manifest}")
        print(format_table(hub_report(manifest)))
        return 0


def cmd_embed(cfg: HubEmbedConfig, *, command: str) -> int:
    from ..embed import embed_hub

    path = embed_hub(cfg.manifest, cfg.tasks, embedder=cfg.embedder, only_missing=cfg.only_missing,
                     progress=cfg.progress)
    print(f"embeddings: {path}")
    return 0


def cmd_report(cfg: HubReportConfig, *, command: str) -> int:
    from ..hub import format_table, hub_report

    print(format_table(hub_report(cfg.manifest)))
    return 0


def register(sub: Any) -> None:
    """``hub`` with ``build``, ``embed`` and ``report``."""
    hub = sub.add_parser("hub", help="build a module hub (one LoRA per task) and report its quality")
    hs = hub.add_subparsers(dest="hub_command", required=True)
    add_command(
        hs, "build", cmd_build, HubBuildConfig, TrainConfig,
        titles={HubBuildConfig: "hub build", TrainConfig: "training (one module per task)"},
        overrides={"target_modules": {"flags": ("--targets",)}, "only": {"metavar": "TASK"}},
        help="train one LoRA module per task (resumable)",
        description="Train one LoRA (or MoSLoRA, --mixer) module per task into OUT/<task>/, with a manifest "
        "OUT.json beside OUT (sha256 + quality report per module). Safe to kill: a rerun resumes and never "
        "retrains a finished module. Modules that do not beat the base on their held-out examples are rejected.",
    )
    add_command(hs, "embed", cmd_embed, HubEmbedConfig, overrides={"manifest": {"metavar": "MANIFEST"}},
                help="store each module's task embedding (mean sentence embedding of its training inputs)",
                description="Embed the training inputs of every module of a hub with a sentence-embedding model "
                "(all-MiniLM-L6-v2 by default) and store each module's mean vector beside the manifest "
                "(NAME.embeddings.safetensors, sha256 in the manifest), for retrieving candidates by similarity.")
    add_command(hs, "report", cmd_report, HubReportConfig, overrides={"manifest": {"metavar": "MANIFEST"}},
                help="print the quality table of a hub manifest")
