"""Search start, zero (LoraHub) vs the best single module, on the example task: few-shot loss and held-out EM.

    python benchmarks/search_start.py
"""
import json, time, torch
torch.set_num_threads(2)
from lorahub.api import compose
from lorahub.models import load_base
from lorahub.data import read_jsonl
from lorahub.metrics import exact_match
m, tok = load_base()
train = [(e.input, e.output) for e in read_jsonl("examples/past_tense/train.jsonl")]
test = read_jsonl("examples/past_tense/test.jsonl")
for start in ("zero", "best-probe"):
    t = time.time()
    c = compose(train, None, (m, tok), start=start, progress=False)
    em = exact_match(c.predict([e.input for e in test]), [e.output for e in test])
    print(json.dumps({"start": start, "loss": c.loss, "em": em, "n_modules": len(c.weights), "top": sorted(c.weights.items(), key=lambda kv: -abs(kv[1]))[:3], "s": round(time.time() - t)}), flush=True)
