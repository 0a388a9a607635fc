"""``lorahub`` command line: YAML/flags -> config -> library call. No math here."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any, Sequence

from .config import ComposeConfig
from .errors import LorahubError


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per ComposeConfig field, help from its metadata (mergekit's options style)."""
    for f in fields(ComposeConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if str(f.type).startswith("bool"):
            default = "" if f.default is None else f" (default: {f.default})"
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_ + default)
        elif "list" in str(f.type):
            p.add_argument(flag, nargs="+", default=None, metavar="PATH", help=help_)
        else:
            typ = int if str(f.type).startswith("int") else float if str(f.type).startswith("float") else str
            default = " (required)" if f.default is MISSING else "" if f.default is None else f" (default: {f.default})"
            p.add_argument(flag, type=typ, default=None, help=help_ + default)


def _config_from_args(args: argparse.Namespace) -> ComposeConfig:
    data: dict[str, Any] = {}
    if args.config:
        import yaml

        loaded = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise LorahubError(f"{args.config}: expected a mapping of option: value")
        data.update(loaded)
    for f in fields(ComposeConfig):
        v = getattr(args, f.name)
        if v is not None:
            data[f.name] = v
    return ComposeConfig.from_dict(data, where=args.config or "command line")


def cmd_compose(args: argparse.Namespace) -> int:
    from .api import compose
    from .data import read_jsonl
    from .metrics import exact_match

    cfg = _config_from_args(args)
    examples = read_jsonl(cfg.examples)
    held_out = read_jsonl(cfg.eval_examples) if cfg.eval_examples else None
    command = "lorahub " + " ".join(shlex.quote(a) for a in (args.argv or []))

    def on_step(done: int, best: Any) -> None:
        line = f"  {done:4d}/{cfg.budget} evaluations  best loss {best.loss:.4f}  objective {best.objective:.4f}"
        if cfg.progress:
            from tqdm.auto import tqdm

            tqdm.write(line)
        else:
            print(line)

    routed = cfg.method == "routed"
    search = {} if routed else dict(out_dir=cfg.out, on_step=on_step)
    result = compose(
        [{"input": e.input, "output": e.output} for e in examples], modules=cfg.modules or cfg.hub,
        base_model=cfg.base_model, num_candidates=cfg.num_candidates, budget=cfg.budget, population=cfg.population,
        optimizer=cfg.optimizer, l1=cfg.l1, bounds=(cfg.lower, cfg.upper), seed=cfg.seed, device=cfg.device,
        probe_singles=cfg.probe_singles, start=cfg.start, step=cfg.step,
        progress=cfg.progress, max_rows=cfg.max_rows, command=command,
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
        print(f"few-shot loss: w=0 {r['zero_weight_loss']:.4f} -> composed {result.loss:.4f}")
        print("weights:")
        for name, w in sorted(result.weights.items(), key=lambda kv: -abs(kv[1])):
            print(f"  {w:+.4f}  {name}")
    if held_out is not None:
        inputs, refs = [e.input for e in held_out], [e.output for e in held_out]
        before = exact_match(_base_predictions(result, inputs), refs)
        after = exact_match(result.predict(inputs, progress=cfg.progress), refs)
        r["held_out"] = {"file": cfg.eval_examples, "n": len(refs), "exact_match_base": before, "exact_match_composed": after}
        print(f"held-out exact match ({len(refs)} examples): base {before:.1f} -> composed {after:.1f}")
    out = result.save(cfg.out, merged=cfg.merged)
    print(f"{'routed composition' if routed else 'adapter'} written to {out}")
    return 0


def _base_predictions(result: Any, inputs: list[str]) -> list[str]:
    from .generate import generate

    return generate(result.model, result.tokenizer, inputs, max_new_tokens=result.record["max_new_tokens"])


def cmd_modules_list(args: argparse.Namespace) -> int:
    from .api import resolve_store

    store = resolve_store(args.hub)
    print(f"hub {store.name}  base {store.base_model}  {len(store)} modules")
    for spec in store.specs.values():
        extra = "  ".join(f"{k}={v}" for k, v in spec.extra.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        print(f"  {spec.name:40s} task={spec.task or '-':30s} r={spec.rank}  sha256={(spec.sha256 or '-')[:12]}  {extra}")
    return 0


def cmd_modules_verify(args: argparse.Namespace) -> int:
    from .api import resolve_store

    store = resolve_store(args.hub)
    bad = 0
    for name, err in store.verify():
        print(f"  {'ok ' if err is None else 'BAD'}  {name}" + ("" if err is None else f"  {err}"))
        bad += err is not None
    print(f"{len(store) - bad}/{len(store)} modules verified")
    return 1 if bad else 0


def cmd_modules_add(args: argparse.Namespace) -> int:
    from .manifest import add_to_manifest

    entry = add_to_manifest(args.manifest, args.path, name=args.name, task=args.task)
    print(f"added {entry['name']} to {args.manifest} (sha256 {entry['sha256'][:12]})")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .api import from_weights
    from .mixlora import NOT_MERGEABLE, is_mixlora_folder

    from .routed import CONFIG_FILE as ROUTED_CONFIG

    if is_mixlora_folder(args.adapter):
        raise LorahubError(f"{args.adapter} {NOT_MERGEABLE}")
    if (Path(args.adapter) / ROUTED_CONFIG).is_file():
        raise LorahubError(f"{args.adapter} is a routed composition: its routers weight the modules per token, so "
                           "the update depends on the input and cannot be merged; compose with --method static "
                           "for a mergeable adapter")
    comp = from_weights({Path(args.adapter).name: 1.0}, [args.adapter], args.base_model, device=args.device)
    out = comp.save(args.out, merged=True)
    print(f"merged model written to {out / 'merged'} (adapter copy and record beside it)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorahub", description="Gradient-free composition of LoRA modules (LoraHub).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compose", help="compose an adapter for a new task from few-shot examples",
                       description="Search module weights on few-shot examples and write a PEFT adapter.")
    p.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    _add_config_flags(p)
    p.set_defaults(func=cmd_compose)

    m = sub.add_parser("modules", help="list, add or verify modules of a hub").add_subparsers(dest="action", required=True)
    ml = m.add_parser("list", help="list a hub's modules")
    ml.add_argument("--hub", default=None, help="hub name or manifest path (default: the default hub)")
    ml.set_defaults(func=cmd_modules_list)
    mv = m.add_parser("verify", help="load every module, checking sha256 and shapes")
    mv.add_argument("--hub", default=None, help="hub name or manifest path (default: the default hub)")
    mv.set_defaults(func=cmd_modules_verify)
    ma = m.add_parser("add", help="add a PEFT LoRA folder (or hub id) to a manifest, recording its sha256")
    ma.add_argument("manifest", help="manifest JSON file (created if missing)")
    ma.add_argument("path", help="PEFT LoRA folder or hf://owner/repo")
    ma.add_argument("--name", default=None, help="module name (default: folder name)")
    ma.add_argument("--task", default=None, help="task the module was trained on")
    ma.set_defaults(func=cmd_modules_add)

    mg = sub.add_parser("merge", help="merge a PEFT LoRA adapter folder into its base model (zero inference cost)",
                        description="Write OUT/merged/: the base model with the adapter's B·A·scaling added to its weights. "
                                    "MixLoRA folders are refused: their routing is input-dependent.")
    mg.add_argument("adapter", help="PEFT LoRA adapter folder (e.g. written by lorahub compose)")
    mg.add_argument("--out", required=True, help="output folder (adapter copy, lorahub.json, merged/)")
    mg.add_argument("--base-model", default=None, help="HF id or path (default: the adapter's base_model_name_or_path)")
    mg.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    mg.set_defaults(func=cmd_merge)

    for extra in ("hub_cli", "bbh_cli", "train_cli"):
        try:
            mod = __import__(f"lorahub.{extra}", fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != f"lorahub.{extra}":
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except LorahubError as e:
        print(f"lorahub: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
