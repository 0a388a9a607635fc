"""``lorahub compose`` (options: :class:`lorahub.config.ComposeConfig`) and ``lorahub merge``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ComposeConfig
from ..errors import LorahubError
from .flags import add_command


@dataclass
class MergeConfig:
    """Options of ``lorahub merge``."""

    adapter: str = field(metadata={"help": "PEFT LoRA adapter folder (e.g. written by lorahub compose)", "positional": True})
    out: str = field(metadata={"help": "output folder (adapter copy, lorahub.json, merged/)"})
    base_model: str | None = field(default=None, metadata={"help": "HF id or path (default: the adapter's base_model_name_or_path)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda if available)"})


def cmd_compose(cfg: ComposeConfig, *, command: str) -> int:
    from ..api import compose
    from ..data import read_jsonl
    from ..export import check_output_dir
    from ..files import output_lock
    from ..metrics import exact_match
    from ..routed import CONFIG_FILE as ROUTED_CONFIG

    with output_lock(cfg.out):  # one writer per output folder; a second process is refused
        routed = cfg.method == "routed"
        # before the model loads: a folder lorahub did not write fails now, not after the search
        check_output_dir(cfg.out, **({"marker": ROUTED_CONFIG} if routed else {}))
        examples = read_jsonl(cfg.examples)
        held_out = read_jsonl(cfg.eval_examples) if cfg.eval_examples else None
        search = {} if routed else dict(out_dir=cfg.out)
        result = compose(
            [{"input": e.input, "output": e.output} for e in examples], modules=cfg.modules or cfg.hub,
            base_model=cfg.base_model, num_candidates=cfg.num_candidates, select=cfg.select,
            candidate_order=cfg.candidate_order, loss_scale=cfg.loss_scale, budget=cfg.budget, population=cfg.population,
            optimizer=cfg.optimizer, l1=cfg.l1, bounds=(cfg.lower, cfg.upper), seed=cfg.seed, device=cfg.device,
            probe_singles=cfg.probe_singles, start=cfg.start, step=cfg.step,
            progress=cfg.progress, max_rows=cfg.max_rows, max_length=cfg.max_length, command=command,
            method=cfg.method, routed=cfg.routed_config() if routed else None, **search,
        )
        r = result.record
        if routed:
            print(f"base model {r['base_model']}  routed: {r['num_router_params']} router parameters over "
                  f"{len(r['modules'])} modules{' + the zero expert' if result.config.null_expert else ''}, top-{result.config.top_k}, {r['steps']} steps in {r['seconds']:.1f} s")
            print(f"few-shot loss: base {r['zero_weight_loss']:.4f}  initial routers {r['initial_loss']:.4f} "
                  f"-> routed {result.loss:.4f}")
            print("mean gate per module on the few-shot tokens:")
            for name, g in sorted(r["module_usage"].items(), key=lambda kv: -kv[1]):
                print(f"  {g:.4f}  {name}")
        else:
            print(f"base model {r['base_model']}  optimizer {r['optimizer']}  {r['evaluations']} evaluations in {r['seconds']:.1f} s")
            sel = r["selection"]
            ran = f" ({sel['ran']})" if sel.get("ran") else ""
            print(f"candidates: {len(r['modules'])} by {sel['selector']}{ran} ({sel['evaluations']} evaluations, "
                  f"{sel['seconds']:.1f} s), {r['candidate_order']} order; objective loss scale {r['loss_scale']}")
            print(f"few-shot loss: w=0 {r['zero_weight_loss']:.4f} -> composed {result.loss:.4f}")
            print("weights:")
            nonzero = sorted(((n, w) for n, w in result.weights.items() if w != 0), key=lambda kv: -abs(kv[1]))
            for name, w in nonzero:
                print(f"  {w:+.4f}  {name}")
            if len(nonzero) < len(result.weights):
                print(f"  (the other {len(result.weights) - len(nonzero)} candidates: weight 0; all in lorahub.json)")
        if held_out is not None:
            inputs, refs = [e.input for e in held_out], [e.output for e in held_out]
            before = exact_match(base_predictions(result, inputs), refs)
            after = exact_match(result.predict(inputs, progress=cfg.progress), refs)
            r["held_out"] = {"file": cfg.eval_examples, "n": len(refs), "exact_match_base": before, "exact_match_composed": after}
            print(f"held-out exact match ({len(refs)} examples): base {before:.1f} -> composed {after:.1f}")
        out = result.save(cfg.out, merged=cfg.merged)
        print(f"{'routed composition' if routed else 'adapter'} written to {out}")
        return 0


def base_predictions(result: Any, inputs: list[str]) -> list[str]:
    """The base model's answers (no adapter), for the held-out before/after line."""
    from ..generate import generate

    return generate(result.model, result.tokenizer, inputs, max_new_tokens=result.record["max_new_tokens"])


def cmd_merge(cfg: MergeConfig, *, command: str) -> int:
    from ..api import from_weights
    from ..export import check_output_dir
    from ..files import output_lock
    from ..mixlora import NOT_MERGEABLE, is_mixlora_folder
    from ..routed import CONFIG_FILE as ROUTED_CONFIG

    with output_lock(cfg.out):  # one writer per output folder; a second process is refused
        if is_mixlora_folder(cfg.adapter):
            raise LorahubError(f"{cfg.adapter} {NOT_MERGEABLE}")
        if (Path(cfg.adapter) / ROUTED_CONFIG).is_file():
            raise LorahubError(f"{cfg.adapter} is a routed composition: its routers weight the modules per token, so "
                               "the update depends on the input and cannot be merged; compose with --method static "
                               "for a mergeable adapter")
        check_output_dir(cfg.out)
        comp = from_weights({Path(cfg.adapter).name: 1.0}, [cfg.adapter], cfg.base_model, device=cfg.device)
        out = comp.save(cfg.out, merged=True)
        print(f"merged model written to {out / 'merged'} (adapter copy and record beside it)")
        return 0


def register(sub: Any) -> None:
    """``compose`` and ``merge``."""
    add_command(sub, "compose", cmd_compose, ComposeConfig,
                overrides={"modules": {"metavar": "PATH"}},
                help="compose an adapter for a new task from few-shot examples",
                description="Search module weights on few-shot examples and write a PEFT adapter.")
    add_command(sub, "merge", cmd_merge, MergeConfig, overrides={"adapter": {"metavar": "ADAPTER_DIR"}},
                help="merge a PEFT LoRA adapter folder into its base model (zero inference cost)",
                description="Write OUT/merged/: the base model with the adapter's B·A·scaling added to its weights. "
                            "MixLoRA folders are refused: their routing is input-dependent.")
