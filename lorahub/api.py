"""``compose()``: the whole LoraHub loop in one call, and the ``Composition`` it returns."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from .compose import composed_layers, delta_weights
from .data import DEFAULT_MAX_LENGTH, Example, as_examples
from .errors import LorahubValueError
from .evaluate import PopulationEvaluator
from .export import adapter_config, check_output_dir, merge_copy, save_adapter, versions, write_best_weights
from .files import locked_output
from .generate import generate, merged_into
from .loading import load_base_for, resolve_store, stack_for
from .models import is_seq2seq
from .optimize import SearchConfig, SearchResult, divisor_of, resolve_probe_singles, search, search_evaluations
from .progress import progress_bar
from .select import SelectionTask, get_order, get_selector, select_candidates
from .store import StackedModules

if TYPE_CHECKING:
    from .routed import RoutedComposition, RoutedConfig

COMPOSE_METHODS = {
    "static": "LoraHub's composition: one weighting of the modules, searched without gradients, mergeable",
    "routed": "per-layer top-k routers over the frozen modules, learnt by gradient on the examples (not mergeable)",
}


@dataclass
class Composition:
    """The result of :func:`compose`: weights per module, loss, history, and the means to use them."""

    weights: dict[str, float]
    loss: float
    objective: float
    history: list[dict]
    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    stacked: StackedModules = field(repr=False)
    record: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Composed (A, B) per layer."""
        w = torch.tensor([self.weights[n] for n in self.stacked.names])
        return composed_layers(self.stacked, w)

    def predict(self, inputs: Sequence[str] | str, *, max_new_tokens: int | None = None, batch_size: int = 16,
                progress: bool = False) -> list[str]:
        """Greedy answers with the composed adapter merged into the weights (restored afterwards)."""
        if isinstance(inputs, str):
            inputs = [inputs]
        max_new = max_new_tokens or self.record.get("max_new_tokens", 32)
        with merged_into(self.model, delta_weights(self.layers, self.stacked.scaling)):
            return generate(self.model, self.tokenizer, list(inputs), max_new_tokens=max_new,
                            batch_size=batch_size, progress=progress)

    def merge(self) -> Any:
        """A copy of the base model with the adapter merged in (zero inference overhead)."""
        return merge_copy(self.model, self.layers, self.stacked.scaling)

    def peft_config(self) -> dict[str, Any]:
        return adapter_config(self.stacked.config, self.record["base_model"], is_seq2seq(self.model))

    @locked_output("out_dir")
    def save(self, out_dir: str | Path, *, merged: bool = False) -> Path:
        """Write a PEFT adapter folder (+ lorahub.json, card; ``merged/`` with ``merged=True``) atomically.

        The call holds ``out_dir``'s lock (:func:`lorahub.files.output_lock`): another process writing there is
        refused, not interleaved."""
        return save_adapter(out_dir, self.layers, self.peft_config(), self.record,
                            merged_model=self.merge() if merged else None,
                            tokenizer=self.tokenizer if merged else None)


def from_weights(weights: dict[str, float], modules: Any = None, base_model: Any = None, *,
                 device: str | torch.device | None = None, max_new_tokens: int = 32) -> Composition:
    """A Composition with given weights (no search): to apply, predict with or export a known weighting."""
    store = resolve_store(modules)
    model, tokenizer, base_name = load_base_for(base_model, store, device)
    names = list(weights)
    stacked = stack_for(store, names, model, base_name)
    record = {"base_model": base_name, "modules": names, "weights": dict(weights), "loss": float("nan"),
              "objective": float("nan"), "optimizer": "given", "evaluations": 0, "seed": None, "num_examples": 0,
              "max_new_tokens": max_new_tokens, "hub": store.name, "versions": versions()}
    return Composition(dict(weights), float("nan"), float("nan"), [], model, tokenizer, stacked, record)


@locked_output("out_dir")
def compose(
    task_examples: Any,
    modules: Any = None,
    base_model: Any = None,
    *,
    num_candidates: int = SearchConfig.num_candidates,
    select: str = SearchConfig.select,
    candidate_order: str = SearchConfig.candidate_order,
    loss_scale: str = SearchConfig.loss_scale,
    budget: int = SearchConfig.budget,
    population: int | None = SearchConfig.population,
    optimizer: str = SearchConfig.optimizer,
    l1: float = SearchConfig.l1,
    bounds: tuple[float, float] = (SearchConfig.lower, SearchConfig.upper),
    seed: int = SearchConfig.seed,
    device: str | torch.device | None = None,
    progress: bool = True,
    probe_singles: bool | None = SearchConfig.probe_singles,
    start: str = SearchConfig.start,
    step: float = SearchConfig.step,
    max_rows: int = SearchConfig.max_rows,
    max_length: int = DEFAULT_MAX_LENGTH,
    out_dir: str | Path | None = None,
    command: str | None = None,
    on_step: Callable[[int, SearchResult], None] | None = None,
    method: str = "static",
    routed: RoutedConfig | None = None,
) -> Composition | RoutedComposition:
    """Compose an adapter for a new task from a library of LoRA modules (LoraHub's COMPOSE + ADAPT).

    Args:
        task_examples: a few examples of the new task: ``{"input", "output"}`` dicts, (input, output)
            pairs or a ``datasets.Dataset`` with those columns. Inputs are fed verbatim.
        modules: a hub name or manifest path (None: the default hub), a list of module folders / hub
            ids, or a :class:`ModuleStore`.
        base_model: an HF id or path, ``(model, tokenizer)`` already loaded, or None for the hub's base.
        num_candidates: candidate modules chosen from the library by ``select``.
        select: how they are chosen (:data:`lorahub.select.SELECTORS`): ``"random"`` (LoraHub's draw with
            ``seed``), ``"retrieve"`` (the hub's module embeddings closest to the examples' inputs), ``"probe"``
            (the lowest few-shot loss alone; all N modules scored, N evaluations), ``"retrieve+probe"``,
            ``"format+retrieve"`` or ``"auto"`` (format+retrieve where the hub has module embeddings, else random).
            The selection and its scores are recorded (``record["selection"]``).
        candidate_order: the candidates' order as search dimensions, which the optimizer's path depends on:
            ``"store"`` (the library's) or ``"sample"`` (the selector's: LoraHub's ``random.sample`` order).
        loss_scale: the loss in the objective (:data:`lorahub.optimize.LOSS_SCALES`): ``"token-mean"`` (lorahub)
            or ``"per-example"`` (the reference's: the token-mean loss / number of examples, next to the same
            l1 term). ``loss`` and ``history`` losses stay token means; ``objective`` is what was minimised.
        budget: few-shot evaluations of the search, the single-module probes included; population: candidates
            scored per batch (CMA default 4+3·ln N, at most a fifth of the evaluations left after the probes).
        optimizer: ``"cma"`` (CMA-ES) or ``"ngopt"`` (the reference's NGOpt, i.e. Cobyla, one at a time).
        l1: coefficient of mean|w| added to the loss. bounds: box for each weight (must contain 0).
        probe_singles: score the N single modules (one-hot weights) in one batched pass before the
            search, so the result is never worse than the best single module (N of the ``budget``'s
            evaluations). Default: on, except for the reference ``"ngopt"``.
        start: where CMA-ES's mean starts: ``"best-probe"`` (the best single module, when ``probe_singles``;
            the default) or ``"zero"`` (LoraHub's start, w = 0).
        step: CMA-ES's first step around the start, in weight units (benchmarks/search_tuning.py).
        max_length: token limit of one example: a longer prompt is cut from the left (one warning line names
            the example), an answer over the limit is an error naming it.
        out_dir: if given, ``best_weights.json`` is written there at each new best; a folder lorahub did not
            make is refused before the search starts (:func:`lorahub.export.check_output_dir`), and the call
            holds the folder's lock (:func:`lorahub.files.output_lock`): a second writer is refused.
        method: ``"static"`` (LoraHub: the search above) or ``"routed"``: the same candidates (same ``seed``)
            as frozen experts under per-layer top-k routers learnt by gradient on the examples
            (:mod:`lorahub.routed`); it returns a :class:`~lorahub.routed.RoutedComposition`, which predicts
            and saves but cannot merge. The search options (budget ... start, out_dir, on_step) are unused.
        routed: the routed path's settings (:class:`~lorahub.routed.RoutedConfig`; None: its defaults).
    """
    if method not in COMPOSE_METHODS:
        avail = "; ".join(f"{k!r}: {v}" for k, v in COMPOSE_METHODS.items())
        raise LorahubValueError(f"unknown compose method {method!r}. Available: {avail}")
    if routed is not None and method != "routed":
        raise LorahubValueError(f"routed= settings were given with method={method!r}; pass method='routed' to use them")
    get_selector(select)  # unknown names fail before any work, listing the known ones
    get_order(candidate_order)
    divisor_of(loss_scale, 1)
    if out_dir is not None and method == "static":
        check_output_dir(out_dir)  # before any work, so best_weights.json never lands in a foreign folder
    examples: list[Example] = as_examples(task_examples)
    store = resolve_store(modules)
    model, tokenizer, base_name = load_base_for(base_model, store, device)
    selection = select_candidates(select, store, num_candidates, seed, SelectionTask(
        examples, model, tokenizer, base_name, max_rows=max_rows, max_length=max_length))
    names = selection.ordered(candidate_order, store)
    stacked = stack_for(store, names, model, base_name)
    chosen = {"selection": selection.record(), "candidate_order": candidate_order}
    if method == "routed":
        from .routed import RoutedConfig, compose_routed

        comp = compose_routed(examples, store, model, tokenizer, base_name, stacked, routed or RoutedConfig(),
                              seed=seed, num_candidates=num_candidates, progress=progress, command=command)
        comp.record.update(chosen)
        return comp

    probe_singles = resolve_probe_singles(probe_singles, optimizer)
    search_evaluations(budget, len(names) if probe_singles else 0)  # before any scoring: the probes fit the budget
    # one bar over every scored weighting: w = 0, then the budget (the single-module probes first)
    bar = progress_bar(1 + budget, "compose", progress, unit="eval")
    last_best = [float("inf")]

    def scored(w: np.ndarray) -> np.ndarray:
        losses = ev.score(w).numpy()
        bar.update(len(w))
        return losses

    def after_generation(done: int, best: SearchResult) -> None:
        bar.set_postfix(best_loss=f"{best.loss:.4f}")
        if out_dir is not None and best.objective < last_best[0]:
            last_best[0] = best.objective
            write_best_weights(out_dir, dict(zip(names, map(float, best.weights))), best.objective, done)
        if on_step is not None:
            on_step(done, best)

    t0 = time.perf_counter()
    try:
        with PopulationEvaluator(model, tokenizer, stacked, examples, max_rows=max_rows, max_length=max_length) as ev:
            zero_loss = float(scored(np.zeros((1, len(names))))[0])
            result = search(scored, len(names), budget=budget, population=population,
                            optimizer=optimizer, l1=l1, bounds=bounds, seed=seed, on_step=after_generation,
                            probes=np.eye(len(names)) if probe_singles else None, start=start, step=step,
                            loss_divisor=divisor_of(loss_scale, len(examples)))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if not np.isfinite(result.objective):
        raise LorahubValueError("every candidate scored a non-finite loss; check the examples and the modules")
    weights = {n: float(w) for n, w in zip(names, result.weights)}
    max_target = max(len(tokenizer(e.output, add_special_tokens=False).input_ids) for e in examples)
    record = {
        "base_model": base_name, "modules": names, "weights": weights, "loss": result.loss,
        "objective": result.objective, "zero_weight_loss": zero_loss, "optimizer": result.optimizer,
        "budget": budget, "evaluations": len(result.history), "probe_singles": bool(probe_singles), "start": result.start,
        "step": step,
        "population": result.population,
        "l1": l1, "loss_scale": loss_scale, "bounds": list(bounds), "seed": seed, "num_candidates": num_candidates,
        **chosen,
        "num_examples": len(examples), "max_new_tokens": max_target + 4, "max_length": max_length,
        "seconds": round(seconds, 3),
        "history": result.history, "hub": store.name, "command": command, "versions": versions(),
    }
    return Composition(weights, result.loss, result.objective, result.history, model, tokenizer, stacked, record)
