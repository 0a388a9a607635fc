"""The methods of the BBH table, a registry of name -> :class:`Method`, and the worker that runs a job.

A method prepares a task: it picks the test prompts and, if it adapts the model, a
:class:`~lorahub.api.Composition` (None: the base model). :meth:`Worker.run` then generates for every
test prompt (batched greedy, left padding + attention mask, adapter merged into the weights, cut at the
first newline; :func:`lorahub.generate.generate`) and scores exact match. So a new method is one
``prepare`` function and one :func:`register` call; ``adapter:DIR`` (:func:`adapter_method`) is built that
way, for evaluating a saved adapter folder.

==========================  ======  ================================================================================
name                        seeded  what it does
==========================  ======  ================================================================================
majority                    no      no model: the most common answer of the 5 learning examples, for every question (ties:
                                    the first drawn); the floor a few-shot method must clear to have learnt more than that
zero-shot                   no      the base model on ``"{description}\\n\\nQ: {input}\\nA:"``
icl                         no      the 5 learning examples as Q/A blocks in the prompt
best-single                 no      the hub module with the lowest few-shot loss (all modules scored in batched passes)
lorahub-reference           yes     LoraHub as published: 20 random modules in ``random.sample`` order, budget 40,
                                    ``optimizer="ngopt"`` (Cobyla) from w = 0, the reference's objective (loss / number
                                    of examples + 0.05·mean|w|; ``loss_scale="per-example"``, ``candidate_order="sample"``)
lorahub-default             yes     lorahub's defaults: 20 candidates by ``select="auto"`` (format+retrieve on a hub with
                                    embeddings, else random), the single modules probed in one batch, then Cobyla from
                                    the best of them (the reference's objective and order); budget 40 (``--budget``),
                                    the 20 probes included
lorahub-retrieve            yes     lorahub-default over the 20 modules whose task embeddings are nearest the learning
                                    inputs (``select="retrieve"``; needs the hub's embeddings; not in the defaults)
lorahub-probe               yes     lorahub-default over the 20 modules of lowest single-module loss (``select="probe"``:
                                    all N modules scored first, N evaluations; not in the defaults)
lorahub-retrieve-probe      yes     lorahub-default over the 20 lowest-loss of the 40 nearest (``select="retrieve+probe"``)
lorahub-reference-retrieve  yes     lorahub-reference's search and objective over the 20 nearest modules
                                    (``select="retrieve"``, most similar first): what selection alone changes
lorahub-routed              yes     the same 20 random modules as frozen experts under per-layer top-2 routers learnt by
                                    gradient on the learning examples (``compose(method="routed")``; not in the defaults)
adapter:NAME                no      a PEFT LoRA folder (``--adapter DIR``) merged into the base, or a MixLoRA folder
                                    run with its routers
==========================  ======  ================================================================================
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..files import sha256_file
from ..data import as_examples, format_example
from ..errors import LorahubValueError
from ..metrics import exact_match
from ..optimize import SearchConfig, resolve_probe_singles
from .bbh import TaskSplit


@dataclass
class Prepared:
    """What a method hands to the evaluation: the prompts, and the adapter (None: the base model)."""

    prompts: list[str]
    composition: Any = None  # lorahub.api.Composition, merged into the weights while generating
    compose_seconds: float = 0.0  # wall time of preparing (search, scoring), not of generating
    evals: int = 0  # candidate evaluations (few-shot loss of one weighting = 1)
    info: dict[str, Any] = field(default_factory=dict)  # weights, modules, loss, optimizer, ...
    reads_prompts: bool = True  # False: the answers do not come from the prompts (their tokens count 0)


PrepareFn = Callable[["Worker", TaskSplit, "int | None", dict], Prepared]


@dataclass(frozen=True)
class Method:
    """A row of the table.

    Args:
        name: the name given to ``--methods``.
        prepare: ``(worker, task, seed, spec) -> Prepared``.
        seeded: runs once per ``--seeds`` value; otherwise once, with seed None.
        uses_hub: needs the module hub (its fingerprint joins ``spec``).
        spec: the method's settings; results made with another spec are never mixed in.
        label: the row label in summary.md.
        seed_used: ``(spec, hub store) -> bool``, for a seeded method whose seed may change nothing: False means
            every seed gives the same result, so a run computes the first seed and copies its row to the others
            (None: the seed is always used).
    """

    name: str
    prepare: PrepareFn = field(repr=False)
    seeded: bool = False
    uses_hub: bool = False
    spec: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    seed_used: Callable[[dict[str, Any], Any], bool] | None = field(default=None, repr=False)


METHODS: dict[str, Method] = {}
ADAPTER_PREFIX = "adapter:"


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise LorahubValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """A registered method by name; an unknown name lists the available ones."""
    if name not in METHODS:
        avail = ", ".join(list(METHODS) + [ADAPTER_PREFIX + "NAME (with --adapter DIR)"])
        raise LorahubValueError(f"unknown method {name!r}. Available: {avail}")
    return METHODS[name]


class Worker:
    """Holds the base model and the hub, each loaded once, and runs jobs (in process or as a Ray actor).

    Args:
        base_model: HF id or path (None: the hub's base model, else the default SmolLM2).
        hub: a hub name or manifest path, or a list of module folders (None: the default hub).
        device: "cpu", "cuda", ... (None: cuda if available).
        threads: torch CPU threads (None: leave torch's setting).
        batch_size: prompts per generation batch.
        progress: show per-job progress bars (composition and generation).
    """

    def __init__(self, base_model: str | None = None, hub: Any = None, device: str | None = None,
                 threads: int | None = None, batch_size: int = 16, progress: bool = False):
        if threads:
            torch.set_num_threads(threads)
        self.base_model, self.hub, self.device, self.batch_size = base_model, hub, device, batch_size
        self.progress = progress  # per-job bars (composition, generation)
        self._pair: tuple[Any, Any] | None = None
        self._store: Any = None
        self._adapters: dict[str, Any] = {}

    @property
    def store(self) -> Any:
        if self._store is None:
            from ..loading import resolve_store

            self._store = resolve_store(self.hub)
        return self._store

    @property
    def model_and_tokenizer(self) -> tuple[Any, Any]:
        """The base model, loaded on first use and kept (never once per task or seed)."""
        if self._pair is None:
            from ..models import load_base

            name = self.base_model
            if name is None and self.hub is not None:
                name = self.store.base_model
            self._pair = load_base(name, device=self.device)
        return self._pair

    def adapter_store(self, path: str) -> Any:
        if path not in self._adapters:
            from ..store import ModuleStore

            store = ModuleStore(name=Path(path).name)
            store.add_path(path)
            self._adapters[path] = store
        return self._adapters[path]

    def run(self, job: tuple[str, str, int | None], task: TaskSplit, method: Method) -> dict[str, Any]:
        """Prepare ``method`` on ``task`` (with ``seed``), generate for every test prompt, score exact match."""
        from ..generate import generate

        task_name, method_name, seed = job
        model, tok = self.model_and_tokenizer
        prep = method.prepare(self, task, seed, method.spec)
        max_new = max_new_tokens(tok, task, seq2seq=bool(getattr(model.config, "is_encoder_decoder", False)))
        t0 = time.perf_counter()
        if prep.composition is None:
            preds = generate(model, tok, prep.prompts, max_new_tokens=max_new, batch_size=self.batch_size,
                             progress=self.progress)
        else:
            preds = prep.composition.predict(prep.prompts, max_new_tokens=max_new, batch_size=self.batch_size,
                                             progress=self.progress)
        eval_seconds = time.perf_counter() - t0
        return {
            "task": task_name, "method": method_name, "seed": seed,
            "em": exact_match(preds, task.references), "n_test": len(task.test), "n_learn": len(task.learn),
            "tokens_per_example": prompt_tokens(tok, prep.prompts, model) if prep.reads_prompts else 0.0,
            "max_new_tokens": max_new,
            "compose_seconds": round(prep.compose_seconds, 4), "eval_seconds": round(eval_seconds, 4),
            "evals": prep.evals, "machine": machine_description(next(model.parameters()).device), **prep.info,
            "predictions": preds,
        }


    def run_with(self, job: tuple[str, str, int | None], tasks: dict[str, TaskSplit], method: Method) -> dict[str, Any]:
        """:meth:`run` with the task looked up in ``tasks`` (a Ray actor gets the dict once, by reference)."""
        return self.run(job, tasks[job[0]], method)


def machine_description(device: Any) -> str:
    """What ran a job, for the report: the GPU's name, or the CPU's model and torch's thread count."""
    dev = torch.device(device) if device else torch.device("cpu")
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (cuda)"
    cpu = "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        import platform

        cpu = platform.processor() or cpu
    return f"{cpu}, {torch.get_num_threads()} threads"


def max_new_tokens(tokenizer: Any, task: TaskSplit, *, seq2seq: bool, margin: int = 2) -> int:
    """Tokens of the task's longest target (as the model sees it: leading space), + margin for newline/EOS."""
    lengths = [len(tokenizer(format_example("A:", t, seq2seq=seq2seq)[1], add_special_tokens=False).input_ids)
               for t in task.all_targets]
    return max(lengths) + margin


def prompt_tokens(tokenizer: Any, prompts: list[str], model: Any) -> float:
    """Mean prompt length in tokens, as fed to the model."""
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    n = [len(tokenizer(format_example(p, None, seq2seq=seq2seq)[0]).input_ids) for p in prompts]
    return round(sum(n) / max(1, len(n)), 2)


# -- the methods ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConstantAnswer:
    """Gives one answer to every prompt: the ``majority`` baseline's predictor."""

    answer: str

    def predict(self, prompts: list[str], **kwargs: Any) -> list[str]:
        return [self.answer] * len(prompts)


def majority_answer(targets: list[str]) -> str:
    """The most common of ``targets``; a tie goes to the one that comes first (``Counter.most_common`` keeps equal
    counts in the order first met)."""
    return Counter(targets).most_common(1)[0][0]


def _majority(worker: Worker, task: TaskSplit, seed: int | None, spec: dict) -> Prepared:
    """The learning examples' most common answer for every test question. With a model that answers a whole task
    with one label (SmolLM2-135M does, ICL included: docs/results.md), this is what such a method can reach by
    reading only the answers of its examples."""
    answer = majority_answer([ex.output for ex in task.learn])
    return Prepared(task.test_prompts, ConstantAnswer(answer), info={"answer": answer}, reads_prompts=False)


def _zero_shot(worker: Worker, task: TaskSplit, seed: int | None, spec: dict) -> Prepared:
    return Prepared(task.test_prompts)


def _icl(worker: Worker, task: TaskSplit, seed: int | None, spec: dict) -> Prepared:
    return Prepared(task.test_icl_prompts)


def _best_single(worker: Worker, task: TaskSplit, seed: int | None, spec: dict) -> Prepared:
    """Score every hub module alone (weight 1) on the learning examples in batched passes; keep the best.

    The scores are the ``probe`` selector's (:func:`lorahub.select.probe_losses`); ties go to the first in store order."""
    from ..api import from_weights
    from ..select import SelectionTask, probe_losses

    model, tok = worker.model_and_tokenizer
    store = worker.store
    t0 = time.perf_counter()
    losses = probe_losses(store, store.names, SelectionTask(as_examples(task.learning_examples()), model, tok,
                                                            getattr(model, "lorahub_base_name", None)))
    name = min(losses, key=losses.__getitem__)
    comp = from_weights({name: 1.0}, store, (model, tok))
    return Prepared(task.test_prompts, comp, time.perf_counter() - t0, len(losses),
                    {"weights": {name: 1.0}, "loss": losses[name],
                     "module_losses": {n: round(l, 5) for n, l in losses.items()}})


def _lorahub(worker: Worker, task: TaskSplit, seed: int | None, spec: dict) -> Prepared:
    """LoraHub: ``num_candidates`` modules (chosen by ``spec["select"]``, default random with ``seed``), weights
    searched on the learning examples. Settings a spec leaves out take lorahub's defaults (random selection in
    store order, token-mean loss), so the specs of earlier runs keep meaning what they meant.

    ``evals`` counts the selection's evaluations (probe) with the search's. A spec that probes the single modules
    says ``"probes_in_budget": True``: until December 2026 the probes came on top of the budget, and a spec of
    that time is refused rather than silently rerun with another meaning."""
    from ..api import compose

    if resolve_probe_singles(spec.get("probe_singles"), spec["optimizer"]) and not spec.get("probes_in_budget"):
        raise LorahubValueError("this method's spec probes the single modules on top of its budget (the budget's "
                                "old meaning); the budget now counts the probes, so this spec cannot be rerun: "
                                "add \"probes_in_budget\": true and run into a new --out folder")
    t0 = time.perf_counter()
    comp = compose(task.learning_examples(), worker.store, worker.model_and_tokenizer,
                   num_candidates=spec["num_candidates"], budget=spec["budget"], population=spec.get("population"),
                   optimizer=spec["optimizer"], l1=spec.get("l1", SearchConfig.l1), probe_singles=spec.get("probe_singles"),
                   start=spec.get("start", "zero"), step=spec.get("step", SearchConfig.step),
                   select=spec.get("select", "random"), candidate_order=spec.get("candidate_order", "store"),
                   loss_scale=spec.get("loss_scale", "token-mean"), seed=seed, progress=worker.progress)
    r = comp.record
    return Prepared(task.test_prompts, comp, time.perf_counter() - t0, r["evaluations"] + r["selection"]["evaluations"],
                    {"weights": comp.weights, "loss": comp.loss, "objective": comp.objective,
                     "zero_weight_loss": r["zero_weight_loss"], "optimizer": r["optimizer"], "population": r["population"],
                     "probe_singles": r.get("probe_singles"), "loss_scale": r["loss_scale"],
                     "candidate_order": r["candidate_order"], "selection": r["selection"], "search_seconds": r["seconds"]})


def _lorahub_seed_used(spec: dict, store: Any) -> bool:
    """A static composition uses its seed only to draw candidates at random or in a sampling optimizer."""
    from ..optimize import search_uses_seed
    from ..select import selection_uses_seed

    return selection_uses_seed(spec.get("select", "random"), store) or search_uses_seed(spec["optimizer"])


def _lorahub_routed(worker: Worker, task: TaskSplit, seed: int | None, spec: dict) -> Prepared:
    """Routed composition: the candidates lorahub-* draw for ``seed``, with top-k routers learnt on the examples."""
    from ..api import compose
    from ..routed import RoutedConfig

    t0 = time.perf_counter()
    cfg = RoutedConfig(top_k=spec["top_k"], steps=spec["steps"], lr=spec["lr"],
                       router_aux_loss_coef=spec["router_aux_loss_coef"])
    comp = compose(task.learning_examples(), worker.store, worker.model_and_tokenizer,
                   num_candidates=spec["num_candidates"], method="routed", routed=cfg, seed=seed,
                   progress=worker.progress)
    r = comp.record
    return Prepared(task.test_prompts, comp, time.perf_counter() - t0, r["evaluations"],
                    {"modules": r["modules"], "module_usage": r["module_usage"], "loss": comp.loss,
                     "zero_weight_loss": r["zero_weight_loss"], "initial_loss": r["initial_loss"],
                     "num_router_params": r["num_router_params"], "search_seconds": r["seconds"]})


def _adapter(worker: Worker, task: TaskSplit, seed: int | None, spec: dict) -> Prepared:
    from ..api import from_weights

    store = worker.adapter_store(spec["path"])
    t0 = time.perf_counter()
    comp = from_weights({store.names[0]: 1.0}, store, worker.model_and_tokenizer)
    return Prepared(task.test_prompts, comp, time.perf_counter() - t0, 0, {"adapter": spec["path"]})


def _mixlora_adapter(worker: Worker, task: TaskSplit, seed: int | None, spec: dict) -> Prepared:
    from ..mixlora import MixLoraPredictor

    model, tok = worker.model_and_tokenizer
    return Prepared(task.test_prompts, MixLoraPredictor(model, tok, spec["path"]), 0.0, 0,
                    {"adapter": spec["path"], "kind": "mixlora"})


def adapter_method(path: str | os.PathLike) -> Method:
    """``adapter:<folder name>``: a saved PEFT LoRA adapter (e.g. ``lorahub compose --out``) merged into the
    base, or a MixLoRA folder (``lorahub train --method mixlora``) run with its routers (not mergeable)."""
    from ..mixlora import WEIGHTS_FILE as MIXLORA_WEIGHTS
    from ..mixlora import is_mixlora_folder, read_mixlora_config
    from ..errors import LorahubFileError
    from ..store import weights_file

    folder = Path(path).resolve()
    if is_mixlora_folder(folder):
        read_mixlora_config(folder)  # a damaged config fails here, before any job runs
        weights = folder / MIXLORA_WEIGHTS
        if not weights.is_file():
            raise LorahubValueError(f"--adapter {path}: MixLoRA folder without {MIXLORA_WEIGHTS}")
        return Method(ADAPTER_PREFIX + folder.name, _mixlora_adapter,
                      spec={"path": str(folder), "sha256": sha256_file(weights), "kind": "mixlora"},
                      label=f"MixLoRA {folder.name}")
    try:
        weights = weights_file(folder)
    except LorahubFileError as e:
        raise LorahubValueError(f"--adapter {path}: {e}; give a PEFT LoRA adapter folder") from None
    return Method(ADAPTER_PREFIX + folder.name, _adapter, spec={"path": str(folder), "sha256": sha256_file(weights)},
                  label=f"adapter {folder.name}")


register(Method("majority", _majority, label="Majority answer of the 5 examples (no model)"))
register(Method("zero-shot", _zero_shot, label="Zero-shot"))
register(Method("icl", _icl, label="In-context learning"))
register(Method("best-single", _best_single, uses_hub=True, label="Best single module (few-shot loss)"))


def register_lorahub(name: str, spec: dict[str, Any], label: str) -> Method:
    """A static LoraHub composition (:func:`_lorahub`) with ``spec``: seeded, on the hub, its seed used only where
    it draws at random (:func:`_lorahub_seed_used`)."""
    return register(Method(name, _lorahub, seeded=True, uses_hub=True, spec=spec, label=label,
                           seed_used=_lorahub_seed_used))


# the paper's settings, fixed on purpose: its draw order and its objective (loss / number of examples + l1), tested
# against sail-sg/lorahub's algorithm.py (tests/test_reference.py)
register_lorahub("lorahub-reference",
                 {"num_candidates": 20, "budget": 40, "optimizer": "ngopt", "population": None, "l1": 0.05,
                  "probe_singles": False, "start": "zero", "select": "random", "candidate_order": "sample",
                  "loss_scale": "per-example"},
                 "LoraHub-reference (ngopt, as published)")
# lorahub-default: lorahub's defaults, every setting named, so a change of default changes the spec and refuses to mix
# with the results made before (runner.check_config)
LORAHUB_DEFAULT_SPEC = {"num_candidates": SearchConfig.num_candidates, "budget": SearchConfig.budget,
                        "optimizer": SearchConfig.optimizer, "population": SearchConfig.population, "l1": SearchConfig.l1,
                        "probe_singles": True, "probes_in_budget": True, "start": SearchConfig.start,
                        "step": SearchConfig.step, "select": SearchConfig.select,
                        "candidate_order": SearchConfig.candidate_order, "loss_scale": SearchConfig.loss_scale}
register_lorahub("lorahub-default", dict(LORAHUB_DEFAULT_SPEC),
                 "lorahub-default (auto selection, Cobyla from the best single module)")
register_lorahub("lorahub-retrieve", {**LORAHUB_DEFAULT_SPEC, "select": "retrieve"},
                 "lorahub-retrieve (nearest modules by task embedding, Cobyla)")
register_lorahub("lorahub-probe", {**LORAHUB_DEFAULT_SPEC, "select": "probe"},
                 "lorahub-probe (lowest single-module loss, Cobyla)")
register_lorahub("lorahub-retrieve-probe", {**LORAHUB_DEFAULT_SPEC, "select": "retrieve+probe"},
                 "lorahub-retrieve-probe (lowest loss of the 2k nearest, Cobyla)")
register_lorahub("lorahub-reference-retrieve", {**METHODS["lorahub-reference"].spec, "select": "retrieve"},
                 "LoraHub-reference over retrieved candidates (selection apart from search)")
register(Method("lorahub-routed", _lorahub_routed, seeded=True, uses_hub=True,
                spec={"num_candidates": 20, "top_k": 2, "steps": 40, "lr": 2e-3, "router_aux_loss_coef": 0.01},
                label="lorahub-routed (learnt top-2 routers)"))
DEFAULT_METHODS = ["majority", "zero-shot", "icl", "best-single", "lorahub-reference", "lorahub-default"]
