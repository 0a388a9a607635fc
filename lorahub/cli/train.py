"""``lorahub train --method mixlora [lora]`` (options: :class:`TrainRunConfig` + :class:`lorahub.mixlora_train.MixTrainConfig`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LorahubValueError
from ..mixlora_train import MixTrainConfig
from .flags import add_command, parse_names


@dataclass
class TrainRunConfig:
    """The run's own options: data, output, device (what is trained and how is :class:`MixTrainConfig`)."""

    tasks: str = field(metadata={
        "help": "comma-separated task names of --tasks-dir (or @file, one a line), or a folder whose every task is "
                "taken (plain <task>.jsonl files with input/output, or a BIG-bench pool)"})
    out: str = field(metadata={"help": "output folder (models, checkpoint, log, quality report)"})
    tasks_dir: str | None = field(default=None, metadata={
        "help": "BIG-bench pool (index.json + tasks/*.jsonl) the --tasks names refer to; needed when --tasks gives names"})
    base_model: str | None = field(default=None, metadata={"help": "base model id or path (default: smollm2-135m-instruct)"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda if available)"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch (default: torch's choice)"})
    progress: bool = field(default=True, metadata={"help": "progress bar"})
    save_every: int = field(default=20, metadata={"help": "checkpoint every N steps, and at the end; 0: only at the end"})
    heldout: int = field(default=50, metadata={"help": "examples of each task kept out of training, at least (10% for larger tasks)"})
    eval_examples: int = field(default=50, metadata={"help": "held-out examples per task scored at the end"})
    eval: bool = field(default=True, metadata={"help": "score base and models on the held-out examples at the end"})


def rank_or_auto(value: str) -> int | None:
    """``--lora-rank``: a positive integer, or ``auto`` (None: matched to MixLoRA's parameter count)."""
    if value == "auto":
        return None
    try:
        rank = int(value)
    except ValueError:
        rank = 0
    if rank < 1:
        raise argparse.ArgumentTypeError(f"--lora-rank takes 'auto' or a positive integer, got {value!r}")
    return rank


def load_run_tasks(run: TrainRunConfig, seed: int) -> dict[str, Any]:
    """task -> (train, held out): every task of a ``--tasks`` folder, or the named tasks of ``--tasks-dir``."""
    from ..mixlora_train import load_tasks

    if not run.tasks.startswith("@") and Path(run.tasks).is_dir():  # a folder: every task in it
        return load_tasks(run.tasks, None, heldout=run.heldout, seed=seed)
    if not run.tasks_dir:
        raise LorahubValueError(f"--tasks {run.tasks!r} is not a folder, so it names tasks: give --tasks-dir, the "
                                "BIG-bench pool they are in (or a folder of <task>.jsonl files as --tasks)")
    return load_tasks(run.tasks_dir, parse_names(run.tasks), heldout=run.heldout, seed=seed)


def cmd_train(run: TrainRunConfig, config: MixTrainConfig, *, command: str) -> int:
    import torch

    from ..export import check_output_dir
    from ..files import output_lock, read_json
    from ..mixlora_train import (
        RUN_CONFIG, evaluate_models, model_configs, quality_table, train_mixlora, trainable_params, usage_summary,
    )
    from ..models import load_base

    with output_lock(run.out):  # one writer per output folder; a second process is refused
        check_output_dir(run.out, marker=RUN_CONFIG)  # a rerun into its own folder resumes
        if run.threads:
            torch.set_num_threads(run.threads)
        data = load_run_tasks(run, config.seed)
        print(f"{len(data)} tasks: " + ", ".join(f"{t} ({len(tr)} train / {len(ho)} held out)" for t, (tr, ho) in data.items()))
        # fp32 base: the adapter layers are fp32 (lorahub.train.MultiLoraLinear does not cast a bf16 input)
        model, tokenizer = load_base(run.base_model, device=run.device, dtype=torch.float32)
        configs = model_configs(config, model)
        params = {m: trainable_params(c, model) for m, c in configs.items()}
        for m, c in configs.items():
            shape = f"N={c.num_experts}, k={c.top_k}, r={c.r}" if m == "mixlora" else f"r={c.r}, alpha={c.alpha:g}"
            print(f"{m}: {params[m]:,} trainable parameters ({shape}, attention LoRA on {','.join(c.attn_targets) or 'none'})")
        result = train_mixlora(model, tokenizer, {t: tr for t, (tr, _) in data.items()}, config, run.out,
                               save_every=run.save_every, progress=run.progress)
        if result.steps_run == 0:
            print(f"{run.out}: already trained ({config.steps} steps); not retrained")
        elif result.resumed_from:
            print(f"resumed from the checkpoint at step {result.resumed_from}")
        for m in config.methods:
            tail = result.losses[m][-max(1, len(result.losses[m]) // 10):]
            print(f"{m}: final train loss {sum(tail) / len(tail):.4f}  saved to {result.folder(m)}")
        summary = usage_summary(result.usage)
        if summary:
            print(summary)
        quality = Path(run.out) / "quality.json"
        if run.eval and result.steps_run == 0 and quality.is_file():  # finished and scored: show, don't redo
            record = read_json(quality, "quality record")
            same = (record.get("eval_examples"), record.get("columns"), list(record.get("tasks", {})))
            if same == (run.eval_examples, ["base", *config.methods], list(data)):
                print(quality_table(record))
                print(f"quality (from an earlier call) in {Path(run.out) / 'quality.md'}")
                return 0
        if run.eval:
            record = evaluate_models(model, tokenizer, {t: ho for t, (_, ho) in data.items()}, run.out, config.methods,
                                     eval_examples=run.eval_examples, command=command, params=params)
            print(quality_table(record))
            print(f"quality written to {Path(run.out) / 'quality.md'}")
        return 0


def register(sub: Any) -> None:
    """``train``."""
    add_command(
        sub, "train", cmd_train, TrainRunConfig, MixTrainConfig,
        titles={TrainRunConfig: "data, output and evaluation", MixTrainConfig: "models and optimisation"},
        overrides={"methods": {"flags": ("--method",), "metavar": "METHOD"},
                   "num_experts": {"flags": ("--experts",)}, "router_aux_loss_coef": {"flags": ("--aux-coef",)},
                   "lora_rank": {"type": rank_or_auto, "metavar": "RANK|auto"}, "attn_targets": {"metavar": "NAME"}},
        help="train MixLoRA (and a parameter-matched LoRA beside it) on several tasks (resumable)",
        description="Train the models of --method together, on the same task-mixed batches over one frozen base, "
        "into OUT/<method>/ (lorahub.mixlora.load_mixlora reads them); then report the held-out exact match of the "
        "base and of each model per task (OUT/quality.md). Safe to kill: a rerun with the same OUT and settings "
        "resumes from OUT/checkpoint/; a finished run is not retrained.",
    )
