"""LoRA vs MoSLoRA (``--mixer``) on 6 tasks: same steps, data and seed; held-out exact match on 50 examples.

    python benchmarks/compare_mixer.py [--steps 20]

Trains the 6 tasks together (6 adapters per step over the shared base), once without and once with the
mixer, and prints a table of base / LoRA / MoSLoRA exact match (%) and train losses.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lorahub.bigbench import list_tasks, read_task, split_examples
from lorahub.hub import heldout_em
from lorahub.models import load_base
from lorahub.train import TrainConfig, delta_weights, train_modules

TASKS = ["color__hex", "entailed_polarity", "intent_recognition", "qa_wikidata",
         "linguistic_mappings__past_tense_json", "arithmetic__1_digit_multiplication"]
POOL = Path(__file__).resolve().parents[2] / "shared" / "bigbench"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tasks-dir", default=str(POOL))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_base()
    idx = list_tasks(args.tasks_dir)
    splits = {t: split_examples(read_task(args.tasks_dir, t, idx[t]).examples, seed=0) for t in TASKS}
    res = {t: {"base": heldout_em(model, tok, splits[t][1][:50])} for t in TASKS}
    for mixer in (False, True):
        key = "moslora" if mixer else "lora"
        cfg = TrainConfig(steps=args.steps, lr=2e-3, batch_size=4, max_length=256, mixer=mixer, modules_per_step=len(TASKS))
        t0 = time.time()
        mods = train_modules(model, tok, {t: splits[t][0] for t in TASKS}, cfg, progress=False)
        for t, m in mods.items():
            res[t][key] = heldout_em(model, tok, splits[t][1][:50], delta_weights(m, cfg))
            res[t][key + "_loss"] = round(m.train_loss, 3)
        print(f"{key}: trained in {time.time() - t0:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    print("| task | base EM | LoRA EM | MoSLoRA EM | LoRA loss | MoSLoRA loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for t, r in res.items():
        print(f"| {t} | {100 * r['base']:.0f} | {100 * r['lora']:.0f} | {100 * r['moslora']:.0f} | {r['lora_loss']} | {r['moslora_loss']} |")


if __name__ == "__main__":
    main()
