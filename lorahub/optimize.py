"""Gradient-free search of the module weights with nevergrad's ask/tell.

The default is Cobyla from the best single module (the N probes are scored in one batched pass first);
``"cma"`` is true CMA-ES (``ParametrizedCMA`` with an explicit population) whose whole population is
scored in one batched pass. ``"ngopt"`` reproduces the LoraHub reference: ``ng.optimizers.NGOpt`` with
one worker, which for this problem (bounded, small budget) resolves to Cobyla, evaluated one candidate
at a time. The optimizer that actually ran is recorded (``SearchResult.optimizer``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import nevergrad as ng
import numpy as np
import torch

from .compose import l1_penalty
from .errors import LorahubValueError

ScoreFn = Callable[[np.ndarray], Sequence[float]]  # (P, N) weightings -> P losses


# nevergrad's Cobyla hands scipy a final trust radius of 0, which scipy replaces by 1e-6 with this warning, once per
# search: noise in every compose and BBH log, about a setting we do not choose (the 40-evaluation budget ends first).
warnings.filterwarnings("ignore", message="COBYLA: Invalid RHOEND", category=UserWarning)
# With the probes inside the budget, the default's Cobyla gets N evaluations for N weights, fewer than scipy's minimum
# of N + 2, which it raises with this warning; lorahub's loop stops at the budget all the same (its first N + 1 points
# are the whole search, on purpose: docs/design.md, "Candidate selection").
warnings.filterwarnings("ignore", message="COBYLA: Invalid MAXFUN", category=UserWarning)

DEFAULT_STEP = 0.15  # CMA-ES's first step, in weight units (benchmarks/search_tuning.py)


def _cma(param: ng.p.Array, budget: int, population: int, step: float) -> ng.optimizers.base.Optimizer:
    """CMA-ES whose first generation spreads ``step`` (weight units) around the start.

    nevergrad's CMA-ES works in the parametrization's standardized space (weight = init + sigma·x) and, for a
    fully bounded Array, starts with σ₀ = scale·(0.3 if N < 18 else 0.15) there; we pick ``scale`` so that
    sigma·σ₀ = ``step`` (tested: the first generation's spread).
    """
    multiplier = 0.3 if param.dimension < 18 else 0.15
    scale = step / (float(param.sigma.value) * multiplier)
    return ng.optimizers.ParametrizedCMA(popsize=population, scale=scale)(param, budget=budget, num_workers=population)


def _ngopt(param: ng.p.Array, budget: int, population: int, step: float) -> ng.optimizers.base.Optimizer:
    """The reference's optimizer (``step`` unused: Cobyla takes its own first step)."""
    return ng.optimizers.NGOpt(param, budget=budget, num_workers=population)


def _cobyla(param: ng.p.Array, budget: int, population: int, step: float) -> ng.optimizers.base.Optimizer:
    """Cobyla, by name: what NGOpt resolves to here (same points, tested), without the reference's meaning.

    Its first ``N + 1`` evaluations build its simplex: the start, then the start plus 0.5 on each weight in turn
    (``step`` unused); from the best single module with 20 candidates and 20 evaluations, that is the search."""
    if population != 1:
        raise LorahubValueError(f"optimizer 'cobyla' scores one candidate at a time; use population=1 (or leave it "
                                f"unset), not {population}; optimizer='cma' scores a population per pass")
    return ng.optimizers.Cobyla(param, budget=budget, num_workers=1)


OPTIMIZERS: dict[str, Callable[..., ng.optimizers.base.Optimizer]] = {
    "cma": _cma,
    "cobyla": _cobyla,
    "ngopt": _ngopt,
}
NEVERGRAD_PREFIX = "ng:"  # "ng:NAME": any optimizer of nevergrad's registry, e.g. "ng:TwoPointsDE"
DEFAULT_POPULATION = {"ngopt": 1, "cobyla": 1}  # one candidate at a time (the reference; Cobyla is sequential)


def optimizer_factory(name: str) -> Callable[..., ng.optimizers.base.Optimizer]:
    """``name``'s factory ``(param, budget, population, step) -> optimizer``: one of :data:`OPTIMIZERS`, or
    ``"ng:NAME"`` for ``ng.optimizers.registry[NAME]`` (``step`` unused; population 1 unless given: some of
    them, Cobyla's kind, take one candidate at a time). Unknown names list the available ones."""
    if name in OPTIMIZERS:
        return OPTIMIZERS[name]
    if name.startswith(NEVERGRAD_PREFIX) and name[len(NEVERGRAD_PREFIX):] in ng.optimizers.registry:
        cls = ng.optimizers.registry[name[len(NEVERGRAD_PREFIX):]]

        def make(param: ng.p.Array, budget: int, population: int, step: float) -> ng.optimizers.base.Optimizer:
            try:
                return cls(param, budget=budget, num_workers=population)
            except ValueError as e:  # nevergrad: "... does not support parallelization"
                raise LorahubValueError(f"optimizer {name!r} scores one candidate at a time; use population=1 "
                                        f"(nevergrad: {e})") from None

        return make
    raise LorahubValueError(f"unknown optimizer {name!r}. Available: {', '.join(OPTIMIZERS)}, "
                            f"or {NEVERGRAD_PREFIX}NAME for a name of nevergrad's registry (e.g. ng:TwoPointsDE)")


MIN_GENERATIONS = 5  # a small budget still gets this many CMA-ES generations (benchmarks/search_tuning.py)


def default_population(optimizer: str, num_modules: int, budget: int | None = None) -> int:
    """CMA-ES's own default, 4 + ⌊3·ln N⌋ (12 for N=20), capped at ``budget // MIN_GENERATIONS`` where ``budget``
    is what the optimizer gets (8 for 40 evaluations: 5 generations rather than 3; 4 for the 20 left after 20
    probes); 1 for the sequential reference."""
    if optimizer in DEFAULT_POPULATION or optimizer.startswith(NEVERGRAD_PREFIX):
        return DEFAULT_POPULATION.get(optimizer, 1)
    own = 4 + int(3 * math.log(max(num_modules, 1)))
    return own if budget is None else max(2, min(own, budget // MIN_GENERATIONS))


STARTS = ("zero", "best-probe")

# What divides the few-shot loss in the objective, as a function of the number of examples Q.
# "token-mean": lorahub's objective, the mean answer-token cross-entropy (a HF model's ``labels`` loss on the Q
# examples as one batch). "per-example": LoraHub's reference (``default_get_loss``): the batch-mean loss summed
# over its batches and divided by Q; with its examples in one batch (its default, and reproduce_bbh.py's 5
# examples with batch_size=5) that is the token mean / Q, so its l1 term weighs Q times more.
LOSS_SCALES: dict[str, Callable[[int], float]] = {
    "token-mean": lambda num_examples: 1.0,
    "per-example": lambda num_examples: float(max(1, num_examples)),
}


def divisor_of(loss_scale: str, num_examples: int) -> float:
    """The divisor of ``loss_scale`` (a :data:`LOSS_SCALES` name) for ``num_examples``: a division, as the
    reference's ``float(loss) / len(examples)`` (a product with 1/Q can differ in the last bit); unknown names
    list the known ones."""
    if loss_scale not in LOSS_SCALES:
        raise LorahubValueError(f"unknown loss_scale {loss_scale!r}. Available: {', '.join(LOSS_SCALES)}")
    return LOSS_SCALES[loss_scale](num_examples)


def resolve_probe_singles(probe_singles: bool | None, optimizer: str) -> bool:
    """Whether a search probes the single modules first: as asked, or by default for every optimizer but the
    reference's ``"ngopt"`` (LoraHub probes nothing)."""
    return optimizer != "ngopt" if probe_singles is None else bool(probe_singles)


def told_value(objective: float) -> float:
    """What the optimizer is told for ``objective``: a non-finite one becomes a large finite loss."""
    return objective if math.isfinite(objective) else 1e30


def point_key(values: np.ndarray) -> bytes:
    """A weighting's identity for the cache of scored points (exact float64 bytes: only a true repeat matches)."""
    return np.asarray(values, dtype=np.float64).tobytes()


def search_uses_seed(optimizer: str) -> bool:
    """Whether ``optimizer``'s path depends on its seed. Cobyla's does not (it is deterministic from its start);
    CMA-ES samples, and NGOpt or a registry name may pick a sampling optimizer, so they count as seeded."""
    return optimizer != "cobyla"


def search_evaluations(budget: int, num_probes: int) -> int:
    """The evaluations left to the optimizer once the probes are scored: ``budget`` counts every evaluation of a
    search, the probes included, so a budget means the same cost with or without them."""
    if num_probes and budget <= num_probes:
        raise LorahubValueError(f"budget ({budget}) counts the {num_probes} single-module probes and must be larger; "
                                f"raise the budget or turn probe_singles off")
    return budget - num_probes


def check_search_options(optimizer: str, start: str, bounds: tuple[float, float], step: float) -> None:
    """The checks every search makes of its options, whether given to :func:`search` or to a config."""
    optimizer_factory(optimizer)  # unknown names list the available ones
    lo, hi = bounds
    if not lo < 0 < hi:
        raise LorahubValueError(f"bounds must contain the start w=0 (lower < 0 < upper), got lower={lo}, upper={hi}")
    if not step > 0:
        raise LorahubValueError(f"step must be positive, got {step}")
    if start not in STARTS:
        raise LorahubValueError(f"unknown start {start!r}. Available: {', '.join(STARTS)}")


@dataclass(kw_only=True)
class SearchConfig:
    """The options of the weight search, with LoraHub's defaults where it has one; the one place they are set.

    :func:`search`, :func:`lorahub.api.compose`, the CLI flags and ``--config`` YAML keys
    (:class:`lorahub.config.ComposeConfig` adds the rest) and the benchmark methods take their defaults here.

    Args:
        num_candidates: candidate modules chosen from the library by ``select`` (LoraHub: 20).
        select: how the candidates are chosen (:data:`lorahub.select.SELECTORS`): "auto" (default: format+retrieve
            on a hub with module embeddings, else random), "random" (LoraHub's draw), "retrieve" (embedding
            similarity to the examples), "probe" (lowest single-module loss), "retrieve+probe", "format+retrieve"
            (retrieve, modules of the examples' answer format first).
        candidate_order: the candidates' order as search dimensions: "sample" (default: the selector's, most
            similar first for retrieve, the draw order for random, as the reference) or "store" (the library's);
            Cobyla's path depends on it.
        loss_scale: the loss in the objective: "per-example" (default: the reference's loss / number of examples,
            so its L1 weighs as in LoraHub) or "token-mean" (the mean answer-token loss; :data:`LOSS_SCALES`).
        budget: few-shot evaluations in all, the single-module probes included (LoraHub: 40).
        population: candidates scored per batch (CMA default: 4 + 3 ln N, at most a fifth of what the probes leave).
        optimizer: "cobyla" (default: from the best single module, one evaluation at a time), "cma" (CMA-ES, a
            population per batched pass), "ngopt" (the reference's NGOpt, which runs Cobyla from zero) or "ng:NAME"
            (any of nevergrad's registry, one candidate at a time unless ``population`` is set). The defaults were
            chosen in benchmarks/search_tuning.py on the BBH tuning tasks (docs/results.md).
        l1: coefficient of the mean |w| penalty (LoraHub: 0.05).
        lower / upper: bounds of every weight (LoraHub: -1.5, 1.5).
        seed: seeds the choice of modules and the optimizer.
        probe_singles: score the N single modules in one batch first (N of the budget), so the result is never
            worse than the best of them (default: on, except for the reference optimizer "ngopt").
        start: where the search starts: "best-probe" (the best single module; default) or "zero" (LoraHub).
        step: CMA-ES's first step around the start, in weight units.
        max_rows: rows (candidates x examples) per forward pass; lower it if memory runs out.
    """

    num_candidates: int = field(default=20, metadata={"help": "candidate modules chosen from the library (by --select)"})
    select: str = field(default="auto", metadata={
        "help": "how candidates are chosen: random (LoraHub), retrieve (embedding similarity to the examples), "
                "probe (lowest single-module loss), retrieve+probe, format+retrieve (the examples' answer format first), "
                "auto (format+retrieve where the hub has embeddings, else random)"})
    candidate_order: str = field(default="sample", metadata={
        "help": "candidate order in the search: store (the library's) or sample (the selector's; the reference's)"})
    loss_scale: str = field(default="per-example", metadata={
        "help": "loss in the objective: token-mean (lorahub) or per-example (the reference: loss / number of examples)"})
    budget: int = field(default=40, metadata={"help": "few-shot evaluations in all, single-module probes included"})
    population: int | None = field(default=None, metadata={
        "help": "candidates per batch (CMA default 4+3 ln N, at most a fifth of what the probes leave of the budget)"})
    optimizer: str = field(default="cobyla", metadata={"help": f"one of {', '.join(OPTIMIZERS)}, or ng:NAME (nevergrad's registry)"})
    l1: float = field(default=0.05, metadata={"help": "coefficient of the mean |w| penalty"})
    lower: float = field(default=-1.5, metadata={"help": "lower bound of each weight"})
    upper: float = field(default=1.5, metadata={"help": "upper bound of each weight"})
    seed: int = field(default=42, metadata={"help": "seed for module choice and optimizer"})
    probe_singles: bool | None = field(default=None, metadata={
        "help": "score each single module before the search (N of the budget; default: on except for ngopt)"})
    start: str = field(default="best-probe", metadata={
        "help": "CMA-ES start: best-probe (the best single module) or zero (LoraHub's start)"})
    step: float = field(default=DEFAULT_STEP, metadata={"help": "CMA-ES's first step around the start, in weight units"})
    max_rows: int = field(default=256, metadata={"help": "rows per forward pass (lower it if memory runs out)"})

    def __post_init__(self) -> None:
        for name in ("num_candidates", "budget", "max_rows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LorahubValueError(f"`{name}` should be a positive integer, but the value passed is {getattr(self, name)!r}")
        if self.population is not None and self.population < 1:
            raise LorahubValueError(f"`population` should be a positive integer, but the value passed is {self.population!r}")
        if self.population is not None and self.budget < self.population:
            raise LorahubValueError(f"`budget` ({self.budget}) is smaller than `population` ({self.population}); raise the budget")
        check_search_options(self.optimizer, self.start, self.bounds, self.step)
        divisor_of(self.loss_scale, 1)
        from .select import get_order, get_selector

        get_selector(self.select)  # unknown names list the available ones
        get_order(self.candidate_order)

    @property
    def bounds(self) -> tuple[float, float]:
        return (self.lower, self.upper)


@dataclass
class SearchResult:
    """Best weighting seen, its objective (loss + l1), its loss alone, and every evaluation in order."""

    weights: np.ndarray
    objective: float
    loss: float
    optimizer: str
    population: int
    history: list[dict] = field(default_factory=list)  # {"evaluation", "loss", "objective", "best"}
    start: str = "zero"  # where the search's mean started: "zero", or "best-probe" when there were probes


def search(
    score: ScoreFn,
    num_modules: int,
    *,
    budget: int = SearchConfig.budget,
    population: int | None = SearchConfig.population,
    optimizer: str = SearchConfig.optimizer,
    l1: float = SearchConfig.l1,
    bounds: tuple[float, float] = (SearchConfig.lower, SearchConfig.upper),
    seed: int = SearchConfig.seed,
    probes: np.ndarray | None = None,
    start: str = SearchConfig.start,
    step: float = SearchConfig.step,
    on_step: Callable[[int, SearchResult], None] | None = None,
    loss_divisor: float = 1.0,
) -> SearchResult:
    """Minimise loss(w) / ``loss_divisor`` + l1·mean|w| over w ∈ [lo, hi]^N within ``budget`` evaluations, probes included.

    Each generation asks ``population`` candidates, scores them in one call and tells the results::

        cands = [opt.ask() for _ in range(k)]
        losses = score(np.stack([c.value for c in cands]))
        for c, loss in zip(cands, losses): opt.tell(c, loss + l1_term)

    ``probes`` (K, N): points scored in one batch before the search (counted in ``budget``, which must be larger
    than K; marked ``"probe"`` in the history), e.g. the single modules; the best point seen is returned, so the result is never worse
    than the best probe.
    ``start``: where the search's mean starts. ``"best-probe"`` (default): at the best probe, with a first
    step of ``step`` (weight units) around it. ``"zero"`` (LoraHub): at w = 0; the probes are then also told
    to the optimizer as not-asked candidates (lorahub 0.1's default, with ``step=0.075``). The probes are not
    told when the search starts at one of them: CMA-ES would take the other probes, far outside its
    sampling distribution, for its own samples. Without probes the search starts at zero.
    ``loss_divisor`` divides the loss in the objective (:func:`divisor_of`: Q gives the reference's
    per-example loss); the ``loss`` of the history and of the result stays the undivided score.
    Same seed ⇒ same weights. ``on_step(evaluations_done, best_so_far)`` runs after each generation.
    """
    check_search_options(optimizer, start, bounds, step)
    num_probes = 0 if probes is None else len(probes)
    remaining = search_evaluations(budget, num_probes)
    population = population or default_population(optimizer, num_modules, remaining)
    lo, hi = bounds
    if population < 1:
        raise LorahubValueError(f"population must be at least 1, got {population}")
    if optimizer == "cma" and num_modules < 2:
        raise LorahubValueError(f"CMA-ES needs at least 2 candidate modules, got {num_modules}; "
                                "raise num_candidates or use optimizer='ngopt'")
    if optimizer == "cma" and population < 2:
        raise LorahubValueError(f"CMA-ES needs a population of at least 2, got {population}; use optimizer='ngopt' for one at a time")
    if remaining < population:
        left = f" leaves {remaining} after the {num_probes} probes, which" if num_probes else ""
        raise LorahubValueError(f"budget ({budget}){left} is smaller than the population ({population}); "
                                "raise the budget or lower the population")
    best = SearchResult(np.zeros(num_modules), math.inf, math.inf, optimizer, population)
    scored: dict[bytes, float] = {}  # objective of every point scored, by point_key: a repeated ask is told, not rescored

    def evaluate(values: np.ndarray, probe: bool) -> list[float]:
        """Score (k, N) weightings in one call; record them; return objectives (+inf if not finite)."""
        losses = np.asarray(score(values), dtype=np.float64)
        penalties = l1_penalty(torch.from_numpy(values), l1).numpy()
        objectives = []
        for v, loss, pen in zip(values, losses, penalties):
            objective = float(loss / loss_divisor + pen) if math.isfinite(loss) else math.inf
            if objective < best.objective:
                best.weights, best.objective, best.loss = v.copy(), objective, float(loss)
            entry = {"evaluation": len(best.history) + 1, "loss": float(loss), "objective": objective, "best": best.objective}
            best.history.append({**entry, "probe": True} if probe else entry)
            scored[point_key(v)] = told_value(objective)
            objectives.append(objective)
        return objectives

    probe_values = np.clip(np.asarray(probes, float), lo, hi) if probes is not None and len(probes) else None
    probe_objectives = evaluate(probe_values, True) if probe_values is not None else []
    init = np.zeros(num_modules)
    if start == "best-probe" and probe_objectives and min(probe_objectives) < math.inf:
        init = probe_values[int(np.argmin(probe_objectives))]
        best.start = "best-probe"
    param = ng.p.Array(init=init, lower=lo, upper=hi)
    param.random_state = np.random.RandomState(seed)
    opt = optimizer_factory(optimizer)(param, remaining, population, step)
    best.optimizer = f"{optimizer}:{opt.optim.name if hasattr(opt, 'optim') else opt.name}"  # NGOpt delegates
    told = probe_values if probe_values is not None and best.start == "zero" else []
    for v, objective in zip(told, probe_objectives):
        opt.tell(opt.parametrization.spawn_child(new_value=v), told_value(objective))
    done, repeats = num_probes, 0
    while done < budget and repeats <= budget:
        k = min(population, budget - done)
        cands = [opt.ask() for _ in range(k)]
        keys = [point_key(c.value) for c in cands]
        fresh = [c for c, key in zip(cands, keys) if key not in scored]
        for c, key in zip(cands, keys):  # a point scored before (Cobyla's first ask is its start, the best probe) costs nothing
            if key in scored:
                opt.tell(c, scored[key])
                repeats += 1
        if fresh:
            for c, objective in zip(fresh, evaluate(np.stack([c.value for c in fresh]), False)):
                opt.tell(c, told_value(objective))
            done += len(fresh)
            if on_step is not None:
                on_step(done, best)
    return best
