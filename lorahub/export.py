"""Export: a PEFT adapter folder (loads with ``PeftModel.from_pretrained``), its record and card, or a merged model.

Folder layout written by :func:`save_adapter` (atomically: a temp folder renamed into place)::

    adapter_config.json          PEFT LoraConfig of the composed adapter (same r, alpha, targets as the modules)
    adapter_model.safetensors    composed lora_A / lora_B per layer (A = Σ wᵢAᵢ, B = Σ wᵢBᵢ)
    lorahub.json                 modules, weights, loss history, optimizer, seed, budget, base model, versions
    README.md                    model card: front matter, method, modules and weights, the invocation
"""

from __future__ import annotations

import copy
import json
import os
import platform
from pathlib import Path
from typing import Any, Mapping

import torch

from ._io import atomic_dir, atomic_write_json
from .compose import delta_weights, peft_state_dict
from .errors import LorahubValueError

LORAHUB_RECORD = "lorahub.json"
BEST_WEIGHTS = "best_weights.json"


def versions() -> dict[str, str]:
    import nevergrad
    import peft
    import transformers

    from . import __version__

    return {
        "lorahub": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "nevergrad": nevergrad.__version__, "python": platform.python_version(),
    }


def adapter_config(config: Mapping[str, Any], base_model: str, seq2seq: bool) -> dict[str, Any]:
    """The composed adapter's PEFT config: the modules' own, with base model and task type set."""
    cfg = dict(config)
    cfg.update(
        peft_type="LORA", base_model_name_or_path=base_model,
        task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM", inference_mode=True,
    )
    from peft import LoraConfig  # validate through PEFT itself, keep only fields it knows

    known = set(LoraConfig.__dataclass_fields__)
    cfg = {k: v for k, v in cfg.items() if k in known}
    if isinstance(cfg.get("target_modules"), (set, tuple, list)):  # PEFT writes a set in hash order
        cfg["target_modules"] = sorted(cfg["target_modules"])
    LoraConfig(**cfg)
    return cfg


def write_adapter_files(
    folder: Path, layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]], config: Mapping[str, Any]
) -> None:
    from safetensors.torch import save_file

    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.float().cpu() for k, v in peft_state_dict(layers).items()}, str(folder / "adapter_model.safetensors"))


def model_card(record: Mapping[str, Any]) -> str:
    weights = record["weights"]
    rows = "\n".join(f"| {n} | {w:+.4f} |" for n, w in sorted(weights.items(), key=lambda kv: -abs(kv[1])))
    cmd = record.get("command") or "(Python API: lorahub.compose)"
    return f"""---
base_model: {record['base_model']}
library_name: peft
tags:
- lora
- lorahub
---
# LoraHub composition

A LoRA adapter composed by [lorahub](https://arxiv.org/abs/2307.13269)'s method: A = Σ wᵢAᵢ and
B = Σ wᵢBᵢ over {len(weights)} modules, weights found by `{record['optimizer']}` in {record['evaluations']}
evaluations (seed {record['seed']}) on {record['num_examples']} examples. Few-shot loss {record['loss']:.4f}
(objective with L1 {record['objective']:.4f}).

| module | weight |
| --- | --- |
{rows}

Made with:

```
{cmd}
```

Load it with `PeftModel.from_pretrained(base, this_folder)` or merge it (`merge_and_unload()`).
"""


def save_adapter(
    out_dir: str | os.PathLike,
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    config: Mapping[str, Any],
    record: Mapping[str, Any],
    *,
    merged_model: Any | None = None,
    tokenizer: Any | None = None,
) -> Path:
    """Write the adapter folder (and, with ``merged_model``, a ``merged/`` full model) atomically."""
    out = Path(out_dir)
    if out.exists() and not (out / LORAHUB_RECORD).is_file():
        foreign = sorted(p.name for p in out.iterdir() if p.name != BEST_WEIGHTS)
        if foreign:
            raise LorahubValueError(
                f"output folder {out} exists and holds files lorahub did not write ({', '.join(foreign[:5])}); "
                "choose an empty or new folder"
            )
    with atomic_dir(out) as tmp:
        write_adapter_files(tmp, layers, config)
        (tmp / LORAHUB_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(record), encoding="utf-8")
        best = out / BEST_WEIGHTS
        if best.is_file():  # keep the search's running record beside the result
            (tmp / BEST_WEIGHTS).write_bytes(best.read_bytes())
        if merged_model is not None:
            merged_model.save_pretrained(tmp / "merged")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "merged")
    return out


def merge_copy(model: Any, layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> Any:
    """A copy of ``model`` with ΔW = B·A·s added to the targeted weights (the base stays untouched)."""
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for layer, delta in delta_weights(layers, scaling).items():
            w = modules[layer].weight
            w.add_(delta.to(w.device, w.dtype))
    return merged


def write_best_weights(out_dir: str | os.PathLike, weights: Mapping[str, float], objective: float, evaluation: int) -> None:
    """Record the best weighting seen so far (called at each new best; survives an interrupted run)."""
    atomic_write_json(Path(out_dir) / BEST_WEIGHTS, {"evaluation": evaluation, "objective": objective, "weights": dict(weights)})
