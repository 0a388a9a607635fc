"""Candidate evaluations per second: reference procedure vs lorahub's batched evaluator vs a plain forward.

(a) reference (sail-sg/lorahub): per candidate, build the weighted state dict, ``set_peft_model_state_dict``,
    forward the Q examples with labels;
(b) lorahub: ``PopulationEvaluator.score`` on all P candidates at once;
(c) floor: a plain base-model forward over the same P·Q sequences.
All three run in this one process on the same model, modules and examples; each is timed ``--repeats``
times and the best time is kept.

    python benchmarks/evaluator.py                                   # default SmolLM2 base, P=12, Q=5
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
from lorahub.evaluate import PopulationEvaluator  # noqa: E402
from lorahub.models import is_seq2seq  # noqa: E402


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
    ap.add_argument("--bbh-task", default="date_understanding", help="BBH task whose examples are scored (../shared/bbh)")
    ap.add_argument("--bbh-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "bbh"))
    ap.add_argument("--num-examples", type=int, default=5, help="examples Q")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
    examples = as_examples([(qa_prompt(r["input"], desc), r["target"]) for r in rows])
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

    # (b) lorahub's batched evaluator
    with PopulationEvaluator(model, tok, stacked, examples, max_rows=max(256, P * Q)) as ev:
        ours = ev.score(W).tolist()
        t_ours = best_time(lambda: ev.score(W), args.repeats, sync)

    # (c) the floor: a plain base forward over the same P·Q sequences
    big = batch.repeat(P)
    fkw = {"decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=big.labels)} if seq2seq else {}

    def floor():
        with torch.inference_mode():
            model(input_ids=big.input_ids, attention_mask=big.attention_mask, use_cache=False, **fkw)

    floor()
    t_floor = best_time(floor, args.repeats, sync)

    max_rel = max(abs(a - b) / abs(b) for a, b in zip(ours, ref_losses))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    res = {
        "model": args.random_init or "smollm2-135m-instruct", "device": device_name, "dtype": str(dtype),
        "N": N, "P": P, "Q": Q, "tokens_per_example": round(batch.attention_mask.sum().item() / Q, 1),
        "reference_evals_per_s": P / t_ref, "batched_evals_per_s": P / t_ours, "floor_evals_per_s": P / t_floor,
        "speedup_batched_over_reference": t_ref / t_ours, "batched_time_over_floor": t_ours / t_floor,
        "max_rel_loss_diff": max_rel,
    }
    print(f"model {res['model']} on {device_name}, {dtype}; N={N} modules, P={P} candidates, Q={Q} examples "
          f"(~{res['tokens_per_example']} tokens each)")
    print(f"  (a) reference, one candidate at a time : {res['reference_evals_per_s']:8.2f} evals/s  ({t_ref:.3f} s)")
    print(f"  (b) lorahub batched evaluator          : {res['batched_evals_per_s']:8.2f} evals/s  ({t_ours:.3f} s)")
    print(f"  (c) plain base forward over P*Q (floor): {res['floor_evals_per_s']:8.2f} evals/s  ({t_floor:.3f} s)")
    print(f"  b/a speed-up: {res['speedup_batched_over_reference']:.2f}x   b time / c time: {res['batched_time_over_floor']:.2f}x"
          f"   losses agree to {max_rel:.1e} relative")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
