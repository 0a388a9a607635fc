"""Export: a PEFT adapter folder (loads with ``PeftModel.from_pretrained``), its record and card, or a merged model.

Also the one place for what every lorahub output folder shares: the PEFT LoRA config dict
(:func:`lora_config`), the model card (:func:`card_text`) and the refusal of a folder lorahub did not
make (:func:`check_output_dir`, callable before any work starts).

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
from typing import Any, Mapping, Sequence

import torch

from .compose import Layers, delta_weights, peft_state_dict
from .errors import LorahubValueError
from .files import atomic_dir, atomic_write_json
from .store import ADAPTER_CONFIG, SAFETENSORS_WEIGHTS
from .tables import markdown_table

LORAHUB_RECORD = "lorahub.json"
BEST_WEIGHTS = "best_weights.json"


def versions() -> dict[str, str]:
    import nevergrad
    import peft
    import transformers

    from .version import __version__

    return {
        "lorahub": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "nevergrad": nevergrad.__version__, "python": platform.python_version(),
    }


def lora_config(fields: Mapping[str, Any], *, complete: bool = False, **overrides: Any) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` as a JSON-ready dict, validated by PEFT itself, ``target_modules`` sorted.

    ``fields`` updated with ``overrides``, less the keys LoraConfig does not know. ``complete``: every
    LoraConfig field (PEFT's own ``to_dict``, as ``LoraConfig.save_pretrained`` writes), else only those given.
    """
    from peft import LoraConfig

    known = set(LoraConfig.__dataclass_fields__)
    cfg = {k: v for k, v in {**fields, **overrides}.items() if k in known}
    if isinstance(cfg.get("target_modules"), (set, tuple, list)):  # PEFT writes a set in hash order
        cfg["target_modules"] = sorted(cfg["target_modules"])
    checked = LoraConfig(**cfg)
    if not complete:
        return cfg
    full = checked.to_dict()
    full["target_modules"] = sorted(full["target_modules"])
    return json.loads(json.dumps(full, default=lambda o: o.value if hasattr(o, "value") else str(o)))


def task_type(seq2seq: bool) -> str:
    return "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"


def adapter_config(config: Mapping[str, Any], base_model: str, seq2seq: bool) -> dict[str, Any]:
    """The composed adapter's PEFT config: the modules' own, with base model and task type set."""
    return lora_config(config, peft_type="LORA", base_model_name_or_path=base_model, task_type=task_type(seq2seq),
                       inference_mode=True)


def write_adapter_files(folder: Path, layers: Layers, config: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(peft_state_dict(layers, dtype=torch.float32, device="cpu"), str(folder / SAFETENSORS_WEIGHTS))


def card_text(*, base_model: Any, tags: Sequence[str], title: str, description: str, table: str, command: str,
              footer: str = "", library_name: str | None = None) -> str:
    """A model card: Hugging Face front matter, a title, a paragraph, a table, the command, a closing line."""
    front = [f"base_model: {base_model}", *([f"library_name: {library_name}"] if library_name else []),
             "tags:", *(f"- {t}" for t in tags)]
    end = f"\n{footer}\n" if footer else ""
    return "\n".join(["---", *front, "---", f"# {title}", "", description, "", table, "", "Made with:", "", "```",
                      command, "```", ""]) + end


def model_card(record: Mapping[str, Any]) -> str:
    """The card of a composed (static) adapter."""
    weights = record["weights"]
    return card_text(
        base_model=record["base_model"], library_name="peft", tags=["lora", "lorahub"], title="LoraHub composition",
        description=f"""A LoRA adapter composed by [lorahub](https://arxiv.org/abs/2307.13269)'s method: A = Σ wᵢAᵢ and
B = Σ wᵢBᵢ over {len(weights)} modules, weights found by `{record['optimizer']}` in {record['evaluations']}
evaluations (seed {record['seed']}) on {record['num_examples']} examples. Few-shot loss {record['loss']:.4f}
(objective with L1 {record['objective']:.4f}).""",
        table=markdown_table(["module", "weight"],
                             [(n, f"{w:+.4f}") for n, w in sorted(weights.items(), key=lambda kv: -abs(kv[1]))]),
        command=record.get("command") or "(Python API: lorahub.compose)",
        footer="Load it with `PeftModel.from_pretrained(base, this_folder)` or merge it (`merge_and_unload()`).",
    )


def check_output_dir(out_dir: str | os.PathLike, *, marker: str = LORAHUB_RECORD) -> Path:
    """Refuse a folder that lorahub did not make, before anything is written into it.

    A folder may be (over)written if it does not exist, is empty (but for the search's running
    ``best_weights.json``), or holds ``marker``, the record a lorahub output of that kind always has.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LorahubValueError(f"output folder {out} is a file; choose a new or empty folder")
    if out.is_dir() and not (out / marker).is_file():
        foreign = sorted(p.name for p in out.iterdir() if p.name != BEST_WEIGHTS)
        if foreign:
            raise LorahubValueError(
                f"output folder {out} exists and holds files lorahub did not write ({', '.join(foreign[:5])}); "
                "choose an empty or new folder"
            )
    return out


def save_adapter(
    out_dir: str | os.PathLike,
    layers: Layers,
    config: Mapping[str, Any],
    record: Mapping[str, Any],
    *,
    merged_model: Any | None = None,
    tokenizer: Any | None = None,
) -> Path:
    """Write the adapter folder (and, with ``merged_model``, a ``merged/`` full model) atomically."""
    out = check_output_dir(out_dir)
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


def merge_copy(model: Any, layers: Layers, scaling: float) -> Any:
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
