"""Candidate selection: which ``num_candidates`` modules of a library a composition searches over.

A registry, :data:`SELECTORS`, maps a name to a selector ``(store, k, seed, task) -> Selection``:

==================  ====================================================================================
random              LoraHub's: k modules drawn with ``random.Random(seed).sample`` (the reference's draw)
retrieve            the k modules whose task embedding is closest (cosine) to the mean of the normalised
                    sentence embeddings of the few-shot inputs (LoraRetriever's idea; needs hub embeddings,
                    :mod:`lorahub.embed`)
probe               the k modules with the lowest few-shot loss alone (weight 1), all N scored in batched
                    passes of the :class:`~lorahub.evaluate.PopulationEvaluator` (N evaluations)
retrieve+probe      retrieve 2k, keep the k of them with the lowest probe loss (2k evaluations)
format+retrieve     retrieve among the modules of the examples' answer format (option letters or not) first
auto                format+retrieve where every module has a task embedding, else random (module folders, or
                    a hub whose training inputs are not at hand, such as lorahub-flan-t5-large)
==================  ====================================================================================

A :class:`Selection` keeps the chosen names in the selector's own order (random: the draw order; the others:
best first) and the scores it ranked by; :data:`CANDIDATE_ORDERS` says in which order the candidates become
the dimensions of the search: ``"store"`` (the library's order; lorahub's default) or ``"sample"`` (the
selector's order; for ``random`` this is LoraHub's ``random.sample`` order, which the reference's Cobyla path
depends on). Every selector is deterministic: same seed, same examples ⇒ same selection.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .data import Example
from .errors import LorahubValueError
from .store import ModuleStore, read_manifest

PROBE_CHUNK = 64  # modules stacked at once by the probe (a large hub is probed chunk after chunk)
RETRIEVE_POOL = 2  # retrieve+probe: modules retrieved per candidate kept


@dataclass
class SelectionTask:
    """What a selector may look at: the few-shot examples, and the base model that scores them (probe).

    Args:
        examples: the new task's few-shot examples.
        model, tokenizer, base_name: the loaded base model (needed by ``probe``).
        max_rows: rows per forward pass of the probe's evaluator.
        max_length: token limit of one example in the probe's evaluator (None: the evaluator's default).
    """

    examples: Sequence[Example]
    model: Any = None
    tokenizer: Any = None
    base_name: str | None = None
    max_rows: int = 256
    max_length: int | None = None


@dataclass
class Selection:
    """The chosen modules in the selector's order, and what they were ranked by.

    ``scores`` maps a kind (``"similarity"``: cosine similarity, higher is closer; ``"probe_loss"``: few-shot
    loss of the module alone) to module -> score, for every module the selector scored (not only the chosen).
    """

    selector: str
    names: list[str]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluations: int = 0  # few-shot loss evaluations spent on selecting (probe)
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)  # e.g. the embedder

    def ordered(self, order: str, store: ModuleStore) -> list[str]:
        """The candidates in ``order`` (a :data:`CANDIDATE_ORDERS` name)."""
        return get_order(order)(self, store)

    def record(self) -> dict[str, Any]:
        """JSON-ready, for lorahub.json and the BBH rows."""
        return {"selector": self.selector, "modules": list(self.names),
                "scores": {kind: {n: round(float(s), 6) for n, s in by.items()} for kind, by in self.scores.items()},
                "evaluations": self.evaluations, "seconds": round(self.seconds, 3), **self.info}


Selector = Callable[[ModuleStore, int, int, SelectionTask], Selection]


# -- selectors -----------------------------------------------------------------------------------


def select_random(store: ModuleStore, k: int, seed: int, task: SelectionTask) -> Selection:
    """LoraHub's draw: ``random.Random(seed).sample(store.names, k)`` (all modules if k >= N), in draw order.

    In store order this is :meth:`ModuleStore.select`'s choice; the draw order is the reference's
    (``random.seed(seed); random.sample(LORA_MODULE_NAMES, 20)`` in its reproduce_bbh.py)."""
    names = store.names
    return Selection("random", random.Random(seed).sample(names, min(k, len(names))))


_EMBEDDERS: dict[str, Any] = {}


def cached_embedder(name: str) -> Any:
    """The sentence embedder ``name``, loaded once per process (~2 s; a BBH run retrieves for every job)."""
    if name not in _EMBEDDERS:
        from .embed import load_embedder

        _EMBEDDERS[name] = load_embedder(name)
    return _EMBEDDERS[name]


def similarities(store: ModuleStore, task: SelectionTask) -> tuple[dict[str, float], str]:
    """Cosine similarity of each store module's task embedding to the examples' query vector, and the embedder.

    The query is the mean of the L2-normalised sentence embeddings of the few-shot inputs (the same kind of
    vector as a module's, :func:`lorahub.embed.task_embedding`). The hub's manifest is read afresh, so that
    vectors a hub build added since the store was loaded are found and their sha256 is the current one.
    """
    from .embed import DEFAULT_EMBEDDER, read_embeddings, task_embedding

    if store.manifest_path is None:
        raise LorahubValueError(
            "select='retrieve' needs a hub manifest with module embeddings (`lorahub hub embed NAME`); "
            "these modules were given as folders. Use select='random' or 'probe', or give a hub"
        )
    data = read_manifest(store.manifest_path)
    vectors = read_embeddings(store.manifest_path, data)
    missing = [n for n in store.names if n not in vectors]
    if missing:
        raise LorahubValueError(
            f"hub {store.name!r}: {len(missing)} module(s) have no embedding (e.g. {', '.join(missing[:3])}); "
            f"add them with `lorahub hub embed {store.name} --only-missing --tasks DIR`"
        )
    embedder_name = (data.get("embeddings") or {}).get("embedder") or DEFAULT_EMBEDDER
    query = task_embedding(cached_embedder(embedder_name), [e.input for e in task.examples])
    query = query / query.norm().clamp_min(1e-12)
    mat = torch.stack([vectors[n].float().reshape(-1) for n in store.names])
    if mat.shape[1] != query.numel():
        raise LorahubValueError(f"hub {store.name!r}: module embeddings have {mat.shape[1]} dimensions, the embedder "
                                f"{embedder_name!r} gives {query.numel()}; rerun `lorahub hub embed {store.name}`")
    sims = (mat / mat.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ query
    return {n: float(s) for n, s in zip(store.names, sims)}, embedder_name


def top_k(scores: dict[str, float], k: int, *, highest: bool) -> list[str]:
    """The k best names, best first; ties keep the dict's (store) order."""
    order = sorted(scores, key=(lambda n: -scores[n]) if highest else (lambda n: scores[n]))
    return order[:k]


def select_retrieve(store: ModuleStore, k: int, seed: int, task: SelectionTask) -> Selection:
    """The k modules most similar to the examples (LoraRetriever's retrieval), most similar first."""
    sims, embedder_name = similarities(store, task)
    return Selection("retrieve", top_k(sims, k, highest=True), {"similarity": sims}, info={"embedder": embedder_name})


def select_format_retrieve(store: ModuleStore, k: int, seed: int, task: SelectionTask) -> Selection:
    """``retrieve`` among the modules trained in the examples' answer format first (the manifest's ``format``:
    ``letters`` when most few-shot answers are option letters, :func:`lorahub.bigbench.answer_format`), then the
    others, each group by similarity. Why: a module that never produced the answer's format cannot be weighted
    into producing it, and the sentence embedding of the inputs barely sees the format."""
    from .bigbench import answer_format

    sims, embedder_name = similarities(store, task)
    fmt = answer_format([e.output for e in task.examples])
    in_format = {n for n in store.names if store.specs[n].extra.get("format", "native") == fmt}
    ranked = top_k(sims, len(sims), highest=True)
    names = ([n for n in ranked if n in in_format] + [n for n in ranked if n not in in_format])[:k]
    return Selection("format+retrieve", names, {"similarity": sims},
                     info={"embedder": embedder_name, "answer_format": fmt, "in_format": len(in_format)})


def has_embeddings(store: ModuleStore) -> bool:
    """Whether the store is a hub whose manifest records module embeddings (what retrieval needs).

    A hub that records them but lacks some, or whose vectors file is damaged, still counts: retrieval then fails
    with an error that names the fix, rather than ``auto`` quietly drawing at random."""
    return store.manifest_path is not None and bool(read_manifest(store.manifest_path).get("embeddings"))


def selection_uses_seed(select: str, store: ModuleStore) -> bool:
    """Whether selector ``select`` draws with its seed on ``store``: only ``random`` does (and ``auto`` where it
    falls back to random); retrieval and probing rank by scores, so the same examples give the same candidates."""
    return select == "random" or (select == "auto" and not has_embeddings(store))


def select_auto(store: ModuleStore, k: int, seed: int, task: SelectionTask) -> Selection:
    """``format+retrieve`` where the library can retrieve (:func:`has_embeddings`), else LoraHub's ``random`` draw.
    ``info["ran"]`` names the selector that ran, as the optimizer that ran is recorded."""
    ran = "format+retrieve" if has_embeddings(store) else "random"
    selection = SELECTORS[ran](store, k, seed, task)
    selection.info["ran"] = ran
    selection.selector = "auto"
    return selection


def probe_losses(store: ModuleStore, names: Sequence[str], task: SelectionTask, *,
                 chunk: int = PROBE_CHUNK) -> dict[str, float]:
    """Few-shot loss of each module alone (one-hot weight 1): batched passes, ``chunk`` modules stacked at once.

    The losses do not depend on the chunking (a one-hot weighting composes exactly one module)."""
    from .evaluate import PopulationEvaluator

    if task.model is None or task.tokenizer is None:
        raise LorahubValueError("the probe needs the base model and tokenizer (SelectionTask.model / .tokenizer)")
    p = next(task.model.parameters())
    extra = {} if task.max_length is None else {"max_length": task.max_length}
    out: dict[str, float] = {}
    for i in range(0, len(names), chunk):
        part = list(names[i : i + chunk])
        stacked = store.stack(part, task.model, base_name=task.base_name, device=p.device, dtype=p.dtype)
        with PopulationEvaluator(task.model, task.tokenizer, stacked, task.examples, max_rows=task.max_rows,
                                 **extra) as ev:
            losses = ev.score(torch.eye(len(part)))  # non-finite losses come back as +inf
        out.update((n, float(l)) for n, l in zip(part, losses))
    return out


def select_probe(store: ModuleStore, k: int, seed: int, task: SelectionTask) -> Selection:
    """The k modules with the lowest few-shot loss alone, lowest first (all N modules scored)."""
    losses = probe_losses(store, store.names, task)
    return Selection("probe", top_k(losses, k, highest=False), {"probe_loss": losses}, evaluations=len(losses))


def select_retrieve_probe(store: ModuleStore, k: int, seed: int, task: SelectionTask) -> Selection:
    """Retrieve ``RETRIEVE_POOL``·k modules by similarity, keep the k with the lowest probe loss, lowest first."""
    sims, embedder_name = similarities(store, task)
    pool = top_k(sims, RETRIEVE_POOL * k, highest=True)
    losses = probe_losses(store, pool, task)
    return Selection("retrieve+probe", top_k(losses, k, highest=False), {"similarity": sims, "probe_loss": losses},
                     evaluations=len(losses), info={"embedder": embedder_name, "pool": len(pool)})


SELECTORS: dict[str, Selector] = {
    "random": select_random,
    "retrieve": select_retrieve,
    "probe": select_probe,
    "retrieve+probe": select_retrieve_probe,
    "format+retrieve": select_format_retrieve,
    "auto": select_auto,
}


def get_selector(name: str) -> Selector:
    """A selector by name; an unknown name lists the available ones."""
    if name not in SELECTORS:
        raise LorahubValueError(f"unknown selector {name!r}. Available: {', '.join(SELECTORS)}")
    return SELECTORS[name]


def select_candidates(name: str, store: ModuleStore, k: int, seed: int, task: SelectionTask) -> Selection:
    """Run selector ``name`` for ``k`` candidates (timed); k must be positive and the store non-empty."""
    selector = get_selector(name)
    if not isinstance(k, int) or k <= 0:
        raise LorahubValueError(f"num_candidates must be a positive integer, got {k!r}")
    if not len(store):
        raise LorahubValueError("the module library is empty; give at least one module")
    t0 = time.perf_counter()
    selection = selector(store, k, seed, task)
    selection.seconds = time.perf_counter() - t0
    return selection


# -- candidate order -----------------------------------------------------------------------------


def store_order(selection: Selection, store: ModuleStore) -> list[str]:
    """The chosen modules in the library's order (lorahub's default: the order does not depend on the ranking)."""
    chosen = set(selection.names)
    return [n for n in store.names if n in chosen]


def sample_order(selection: Selection, store: ModuleStore) -> list[str]:
    """The selector's own order: random's draw order (the reference's), or best first."""
    return list(selection.names)


CANDIDATE_ORDERS: dict[str, Callable[[Selection, ModuleStore], list[str]]] = {
    "store": store_order,
    "sample": sample_order,
}


def get_order(name: str) -> Callable[[Selection, ModuleStore], list[str]]:
    """A candidate order by name; an unknown name lists the available ones."""
    if name not in CANDIDATE_ORDERS:
        raise LorahubValueError(f"unknown candidate order {name!r}. Available: {', '.join(CANDIDATE_ORDERS)}")
    return CANDIDATE_ORDERS[name]

