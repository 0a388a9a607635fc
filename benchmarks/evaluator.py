"""Candidate evaluations per second: reference procedure vs lorahub's batched evaluator vs a plain forward.

(a) reference (sail-sg/lorahub): per candidate, build the weighted state dict, ``set_peft_model_state_dict``,
    forward the Q examples with labels;
(b) lorahub's batched evaluator, every example run whole (``min_prefix=0``: the path before the shared prefix);
(c) lorahub's batched evaluator with the shared prompt prefix run once per candidate (the default);
(d) floor: a plain forward of the base model's transformer over the same P·Q whole sequences (for a causal LM
    without the LM head, whose logits the loss needs at the few answer positions only);
(e) floor over the tokens (c) needs: the prefix once per candidate (P rows), then the P·Q suffixes on its cache.
All run in this one process on the same model, modules and examples; each is timed ``--repeats`` times and the
best time is kept. ``--prefix-tokens N`` puts an N-token instruction in front of every example (as the pool's
Natural Instructions tasks and users' system prompts do); 0 keeps BBH's short task description.

    python benchmarks/evaluator.py                                   # default SmolLM2 base, P=12, Q=5
    python benchmarks/evaluator.py --prefix-tokens 800 --population 8
    python benchmarks/evaluator.py --random-init flan-t5-large --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_model, random_modules  # noqa: E402

from lorahub.api import resolve_store  # noqa: E402
from lorahub.compose import composed_layers, peft_state_dict  # noqa: E402
from lorahub.data import as_examples, encode, qa_prompt  # noqa: E402
from lorahub.bench.bbh import DEFAULT_DATA_DIR  # noqa: E402
from lorahub.evaluate import MIN_SHARED_PREFIX, PopulationEvaluator  # noqa: E402

INSTRUCTION = (
    "Definition: In this task you read a short passage and a question about it. Answer the question with the "
    "exact words the answer calls for, and nothing else. Things to avoid: do not explain your answer, do not "
    "repeat the question, and do not add words that are not needed. Emphasis and caution: some questions are "
    "about the order of events, some about how long they last, and some about how often they happen; read the "
    "passage with care before you answer. "
)


def instruction(tokenizer, n_tokens: int) -> str:
    """An instruction of about ``n_tokens`` tokens (a paragraph repeated, cut on a token boundary)."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tokenizer(INSTRUCTION, add_special_tokens=False).input_ids
    return tokenizer.decode(ids[:n_tokens]).rstrip() + "\n\n"
from lorahub.models import default_device, is_seq2seq  # noqa: E402


def best_time(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-init", default=None, help="config-only model: 'flan-t5-large' or a JSON config file")
    ap.add_argument("--hub", default=None, help="module hub to draw from (default: random modules made here)")
    ap.add_argument("--modules", type=int, default=20, help="number of modules N")
    ap.add_argument("--population", type=int, default=12, help="candidates P")
    ap.add_argument("--bbh-task", default="date_understanding", help="BBH task whose examples are scored")
    ap.add_argument("--bbh-dir", default=str(DEFAULT_DATA_DIR), help="BBH data folder (default: the vendored copy)")
    ap.add_argument("--prefix-tokens", type=int, default=0, help="tokens of a shared instruction before every example")
    ap.add_argument("--min-prefix", type=int, default=MIN_SHARED_PREFIX,
                    help="(c)'s threshold: shared tokens below which it runs whole sequences (1: always share)")
    ap.add_argument("--num-examples", type=int, default=5, help="examples Q")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=str(default_device()))
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    model, tok = base_model(args.random_init, args.device)
    store = resolve_store(args.hub) if args.hub else random_modules(model, args.modules)
    names = store.names[: args.modules]
    dtype = next(model.parameters()).dtype
    stacked = store.stack(names, model, device=args.device, dtype=dtype)
    bbh = Path(args.bbh_dir)
    desc = json.loads((bbh / "task_prefixes.json").read_text())[args.bbh_task]
    rows = json.loads((bbh / f"{args.bbh_task}.json").read_text())["examples"][: args.num_examples]
    head = instruction(tok, args.prefix_tokens) if args.prefix_tokens else ""
    examples = as_examples([(head + qa_prompt(r["input"], desc), r["target"]) for r in rows])
    P, Q, N = args.population, len(examples), len(names)
    W = torch.rand(P, N, generator=torch.Generator().manual_seed(0)) * 3 - 1.5
    seq2seq = is_seq2seq(model)
    batch = encode(tok, examples, seq2seq=seq2seq).to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    # (a) the reference procedure, on a PEFT model made once (as sail-sg/lorahub does)
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    cfg = {k: v for k, v in stacked.config.items() if k in LoraConfig.__dataclass_fields__ and k != "base_model_name_or_path"}
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**{**cfg, "inference_mode": True}))
    kw = {"decoder_attention_mask": batch.decoder_attention_mask} if seq2seq else {}

    def reference():
        losses = []
        with torch.inference_mode():
            for p in range(P):
                set_peft_model_state_dict(peft_model, peft_state_dict(composed_layers(stacked, W[p])))
                out = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels, **kw)
                losses.append(float(out.loss))
        return losses

    ref_losses = reference()
    t_ref = best_time(reference, args.repeats, sync)
    del peft_model

    # (b) the batched evaluator, whole sequences; (c) with the shared prefix run once per candidate
    rows_cap = max(256, P * Q)
    with PopulationEvaluator(model, tok, stacked, examples, max_rows=rows_cap, min_prefix=0) as ev:
        whole = ev.score(W).tolist()
        t_whole = best_time(lambda: ev.score(W), args.repeats, sync)
    with PopulationEvaluator(model, tok, stacked, examples, max_rows=rows_cap, min_prefix=args.min_prefix) as ev:
        ours, prefix_len = ev.score(W).tolist(), ev.prefix_len
        t_ours = best_time(lambda: ev.score(W), args.repeats, sync)

    # (d) the floor: a plain base forward over the same P·Q sequences
    big = batch.repeat(P)
    fkw = {"decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=big.labels)} if seq2seq else {}

    body = model if seq2seq else model.base_model  # causal: the transformer alone (the loss needs few logits)

    def floor():
        with torch.inference_mode():
            body(input_ids=big.input_ids, attention_mask=big.attention_mask, use_cache=False, **fkw)

    floor()
    t_floor = best_time(floor, args.repeats, sync)

    # (e) the floor over the tokens the shared-prefix path needs: P prefix rows, then P·Q suffixes on their cache
    k = prefix_len

    def needed():
        with torch.inference_mode():
            if not k:
                return floor()
            ids = big.input_ids[:P, :k]
            cache = body(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).cache
            cache.batch_repeat_interleave(Q)
            body(input_ids=big.input_ids[:, k:], attention_mask=big.attention_mask, cache=cache,
                 use_cache=True)

    needed()
    t_needed = best_time(needed, args.repeats, sync)

    max_rel = max(abs(a - b) / abs(b) for a, b in zip(ours + whole, ref_losses + ref_losses))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    res = {
        "model": args.random_init or "smollm2-135m-instruct", "device": device_name, "dtype": str(dtype),
        "N": N, "P": P, "Q": Q, "tokens_per_example": round(batch.attention_mask.sum().item() / Q, 1),
        "shared_prefix_tokens": k,
        "reference_evals_per_s": P / t_ref, "whole_evals_per_s": P / t_whole, "shared_evals_per_s": P / t_ours,
        "floor_evals_per_s": P / t_floor, "needed_floor_evals_per_s": P / t_needed,
        "speedup_shared_over_whole": t_whole / t_ours, "speedup_whole_over_reference": t_ref / t_whole,
        "shared_time_over_needed_floor": t_ours / t_needed, "whole_time_over_floor": t_whole / t_floor,
        "max_rel_loss_diff": max_rel,
    }
    print(f"model {res['model']} on {device_name}, {dtype}; N={N} modules, P={P} candidates, Q={Q} examples "
          f"(~{res['tokens_per_example']} tokens each, {k} shared by all)")
    print(f"  (a) reference, one candidate at a time      : {P / t_ref:8.2f} evals/s  ({t_ref:.3f} s)")
    print(f"  (b) batched, whole sequences                : {P / t_whole:8.2f} evals/s  ({t_whole:.3f} s)")
    print(f"  (c) batched, shared prefix once a candidate : {P / t_ours:8.2f} evals/s  ({t_ours:.3f} s)")
    print(f"  (d) plain forward over P*Q sequences (floor): {P / t_floor:8.2f} evals/s  ({t_floor:.3f} s)")
    print(f"  (e) plain forward over the needed tokens    : {P / t_needed:8.2f} evals/s  ({t_needed:.3f} s)")
    print(f"  b/a {t_ref / t_whole:.2f}x   c/b {t_whole / t_ours:.2f}x   c time / e time {t_ours / t_needed:.2f}x   "
          f"b time / d time {t_whole / t_floor:.2f}x   losses agree to {max_rel:.1e} relative")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
