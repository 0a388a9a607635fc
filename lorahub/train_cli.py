"""``lorahub train --method mixlora [lora]``: thin argparse wiring over :mod:`lorahub.mixlora_train`.

``lorahub/cli.py`` calls :func:`register`; ``python -m lorahub.train_cli train ...`` runs the same command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from .hub import REPO_ROOT

DEFAULT_TASKS_DIR = REPO_ROOT.parent / "shared" / "bigbench"


def _rank(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        rank = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora-rank takes 'auto' or a positive integer, got {value!r}") from None
    if rank < 1:
        raise argparse.ArgumentTypeError(f"--lora-rank takes 'auto' or a positive integer, got {value!r}")
    return rank


def config_from_args(args: argparse.Namespace) -> Any:
    from .mixlora_train import MixTrainConfig

    return MixTrainConfig(
        methods=args.method, num_experts=args.experts, top_k=args.top_k, rank=args.rank, alpha=args.alpha,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, dropout=args.dropout,
        router_aux_loss_coef=args.aux_coef, attn_targets=args.attn_targets, steps=args.steps, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, impl=args.impl,
    )


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .hub_cli import _names
    from .mixlora_train import (
        evaluate_models, load_tasks, model_configs, quality_table, train_mixlora, trainable_params, usage_summary,
    )
    from .models import load_base

    config = config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.tasks.startswith("@") and Path(args.tasks).is_dir():  # a folder: every task in it
        data = load_tasks(args.tasks, None, heldout=args.heldout, seed=config.seed)
    else:
        data = load_tasks(args.tasks_dir, _names(args.tasks), heldout=args.heldout, seed=config.seed)
    print(f"{len(data)} tasks: " + ", ".join(f"{t} ({len(tr)} train / {len(ho)} held out)" for t, (tr, ho) in data.items()))
    # fp32 base: the adapter layers are fp32 (lorahub.train.MultiLoraLinear does not cast a bf16 input)
    model, tokenizer = load_base(args.base_model, device=args.device, dtype=torch.float32)
    configs = model_configs(config, model)
    params = {m: trainable_params(c, model) for m, c in configs.items()}
    for m, c in configs.items():
        shape = f"N={c.num_experts}, k={c.top_k}, r={c.r}" if m == "mixlora" else f"r={c.r}, alpha={c.alpha:g}"
        print(f"{m}: {params[m]:,} trainable parameters ({shape}, attention LoRA on {','.join(c.attn_targets) or 'none'})")
    result = train_mixlora(model, tokenizer, {t: tr for t, (tr, _) in data.items()}, config, args.out,
                           save_every=args.save_every, progress=not args.quiet)
    if result.steps_run == 0:
        print(f"{args.out}: already trained ({config.steps} steps); not retrained")
    elif result.resumed_from:
        print(f"resumed from the checkpoint at step {result.resumed_from}")
    for m in config.methods:
        tail = result.losses[m][-max(1, len(result.losses[m]) // 10):]
        print(f"{m}: final train loss {sum(tail) / len(tail):.4f}  saved to {result.folder(m)}")
    summary = usage_summary(result.usage)
    if summary:
        print(summary)
    quality = Path(args.out) / "quality.json"
    if args.eval and result.steps_run == 0 and quality.is_file():  # finished and scored: show, don't redo
        record = json.loads(quality.read_text(encoding="utf-8"))
        same = (record.get("eval_examples"), record.get("columns"), list(record.get("tasks", {})))
        if same == (args.eval_examples, ["base", *config.methods], list(data)):
            print(quality_table(record))
            print(f"quality (from an earlier call) in {Path(args.out) / 'quality.md'}")
            return 0
    if args.eval:
        command = "lorahub " + " ".join(shlex.quote(a) for a in (getattr(args, "argv", None) or sys.argv[1:]))
        record = evaluate_models(model, tokenizer, {t: ho for t, (_, ho) in data.items()}, args.out, config.methods,
                                 eval_examples=args.eval_examples, command=command, params=params)
        print(quality_table(record))
        print(f"quality written to {Path(args.out) / 'quality.md'}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``train`` to a ``lorahub`` argparse subparsers object."""
    from .mixlora_train import METHODS, MixTrainConfig

    d = MixTrainConfig()
    t = subparsers.add_parser(
        "train", help="train MixLoRA (and a parameter-matched LoRA beside it) on several tasks (resumable)",
        description="Train the models of --method together, on the same task-mixed batches over one frozen base, "
        "into OUT/<method>/ (lorahub.mixlora.load_mixlora reads them); then report the held-out exact match of the "
        "base and of each model per task (OUT/quality.md). Safe to kill: a rerun with the same OUT and settings "
        "resumes from OUT/checkpoint/; a finished run is not retrained.",
    )
    t.add_argument("--method", nargs="+", choices=METHODS, default=list(d.methods),
                   help="models trained together, one row block each (default: mixlora)")
    t.add_argument("--tasks", required=True,
                   help="comma-separated task names of --tasks-dir (or @file, one a line), or a folder whose every "
                        "task is taken (plain <task>.jsonl files with input/output, or a BIG-bench pool)")
    t.add_argument("--tasks-dir", default=str(DEFAULT_TASKS_DIR),
                   help=f"BIG-bench pool the task names refer to (default: {DEFAULT_TASKS_DIR})")
    t.add_argument("--out", required=True, help="output folder (models, checkpoint, log, quality report)")
    t.add_argument("--base-model", default=None, help="base model id or path (default: smollm2-135m-instruct)")
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    t.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    m = t.add_argument_group("models")
    m.add_argument("--experts", type=int, default=d.num_experts, help=f"MixLoRA experts per FFN (default: {d.num_experts})")
    m.add_argument("--top-k", type=int, default=d.top_k, help=f"experts per token (default: {d.top_k})")
    m.add_argument("--rank", type=int, default=d.rank, help=f"MixLoRA LoRA rank (default: {d.rank})")
    m.add_argument("--alpha", type=float, default=d.alpha, help=f"MixLoRA LoRA alpha (default: {d.alpha:g})")
    m.add_argument("--lora-rank", type=_rank, default=None,
                   help="rank of the lora model, or 'auto': the rank closest to MixLoRA in trainable parameters (default: auto)")
    m.add_argument("--lora-alpha", type=float, default=None,
                   help="alpha of the lora model (default: MixLoRA's alpha/rank times the lora rank)")
    m.add_argument("--dropout", type=float, default=d.dropout, help=f"dropout on LoRA inputs (default: {d.dropout})")
    m.add_argument("--aux-coef", type=float, default=d.router_aux_loss_coef,
                   help=f"MixLoRA load-balance loss coefficient (default: {d.router_aux_loss_coef})")
    m.add_argument("--attn-targets", default=",".join(d.attn_targets),
                   help=f"attention projections with a plain LoRA in every model (default: {','.join(d.attn_targets)})")
    m.add_argument("--impl", choices=("shared", "naive"), default=d.impl, help="MixLoRA FFN forward (default: shared)")
    o = t.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    o.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate, warm-up then cosine to lr/10 (default: {d.lr})")
    o.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help=f"linear warm-up steps (default: {d.warmup_steps})")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default: {d.weight_decay})")
    o.add_argument("--grad-clip", type=float, default=d.grad_clip, help=f"per-model gradient norm clip, 0 disables (default: {d.grad_clip})")
    o.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"examples per step, each row from a task drawn uniformly; every model sees the same (default: {d.batch_size})")
    o.add_argument("--max-length", type=int, default=d.max_length, help=f"tokens per example (default: {d.max_length})")
    o.add_argument("--seed", type=int, default=d.seed, help="seed of initialisation, split, data order and dropout (default: 0)")
    o.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps, and at the end; 0: only at the end (default: 20)")
    e = t.add_argument_group("data split and evaluation")
    e.add_argument("--heldout", type=int, default=50, help="examples of each task kept out of training, at least (default: 50; 10%% for larger tasks)")
    e.add_argument("--eval-examples", type=int, default=50, help="held-out examples per task scored at the end (default: 50)")
    e.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="score base and models on the held-out examples at the end (default: on)")
    t.set_defaults(func=cmd_train)


def main(argv: list[str] | None = None) -> int:
    """``python -m lorahub.<this module> ...`` is ``lorahub ...`` (same parser, same error handling)."""
    from .cli import main as lorahub_main

    return lorahub_main(argv)


if __name__ == "__main__":
    sys.exit(main())
