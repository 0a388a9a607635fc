"""Tokens/s of MixLoRA's shared vs naive FFN forward, for training (fwd+bwd) and inference, in one run.

    python benchmarks/mixlora_speed.py                               # SmolLM2-135M, N=8, k=2, 4x128 tokens
    python benchmarks/mixlora_speed.py --steps 2 --batch-size 2 --seq-len 64
    python benchmarks/mixlora_speed.py --random-init cfg.json         # random base from a LlamaConfig JSON

Both implementations run on the same model, adapter weights and batches (random token ids), after one
untimed warm-up step each; timings alternate shared/naive per repeat. Training = forward + LM loss +
load-balance loss + backward (by default the loss and the LM head only on the last 8 tokens of each row,
as ``lorahub train`` computes them on answer tokens; ``--answer-tokens 0``: every position); inference = forward under no_grad. tokens/s = batch·seq_len / seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lorahub.mixlora import MixLoraConfig, attach_mixlora, mixlora_aux_loss, set_impl


def load_model(args):
    if args.random_init:
        from transformers import AutoConfig, AutoModelForCausalLM

        with open(args.random_init, encoding="utf-8") as f:
            cfg = AutoConfig.for_model(**json.load(f))
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg).eval(), f"random {cfg.model_type} from {args.random_init}"
    from lorahub.models import load_base

    model, _ = load_base(args.base_model, device="cpu", dtype=torch.float32)
    return model, model.config.name_or_path


def step(model, ids, train: bool, answer_tokens: int = 0) -> float:
    t0 = time.perf_counter()
    if train and answer_tokens:  # as lorahub's trainer: the LM head only where an answer token is predicted
        hidden = getattr(model, model.base_model_prefix)(input_ids=ids).last_hidden_state  # (B, T, H)
        logits = model.get_output_embeddings()(hidden[:, -answer_tokens - 1:-1])  # (B, a, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, -answer_tokens:].flatten()) + mixlora_aux_loss(model)
        loss.backward()
        model.zero_grad(set_to_none=True)
    elif train:
        logits = model(input_ids=ids).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()) + mixlora_aux_loss(model)
        loss.backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(input_ids=ids)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", default=None, help="base model (default: smollm2-135m-instruct)")
    p.add_argument("--random-init", default=None, metavar="CONFIG_JSON", help="random base from a HF config JSON")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed repeats per setting (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--answer-tokens", type=int, default=8,
                   help="training loss on the last N tokens of each row, LM head only there, as `lorahub train` "
                        "does (answer-only loss); 0: LM loss and full-vocabulary head on every position")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, what = load_model(args)
    cfg = MixLoraConfig(num_experts=args.num_experts, top_k=args.top_k, r=args.r, dropout=0.0)
    torch.manual_seed(0)
    params = attach_mixlora(model, cfg)
    with torch.no_grad():  # non-zero experts and a non-trivial router, as after some training
        for p_ in params:
            p_.normal_(std=0.02)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=g)
    ntok = ids.numel()
    times: dict[tuple[str, str], list[float]] = {}
    for mode in ("train", "infer"):
        for impl in ("shared", "naive"):  # warm-up
            set_impl(model, impl)
            step(model, ids, mode == "train", args.answer_tokens)
        for _ in range(args.steps):
            for impl in ("shared", "naive"):
                set_impl(model, impl)
                times.setdefault((mode, impl), []).append(step(model, ids, mode == "train", args.answer_tokens))
    print(f"model={what} N={cfg.num_experts} k={cfg.top_k} r={cfg.r} batch={args.batch_size}x{args.seq_len} "
          f"threads={torch.get_num_threads()} steps={args.steps} (median) train loss on "
          + (f"the last {args.answer_tokens} tokens per row" if args.answer_tokens else "every token, full LM head"))
    for mode in ("train", "infer"):
        tps = {impl: ntok / statistics.median(times[(mode, impl)]) for impl in ("shared", "naive")}
        print(f"{mode:5s}  shared {tps['shared']:8.1f} tok/s   naive {tps['naive']:8.1f} tok/s   "
              f"shared/naive {tps['shared'] / tps['naive']:.2f}x")


if __name__ == "__main__":
    main()
