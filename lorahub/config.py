"""``ComposeConfig``: every option of a composition run, shared by the CLI flags and YAML config files."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .errors import LorahubValueError
from .optimize import DEFAULT_STEP, OPTIMIZERS


@dataclass
class ComposeConfig:
    """Options of ``lorahub compose`` (and of ``--config FILE.yaml``, which takes the same keys).

    Args:
        examples: JSONL file of the new task's few-shot examples (``input``/``output`` per line).
        out: folder to write the adapter to (PEFT format + lorahub.json + card).
        hub: module hub (name in hub_index/ or manifest path); default: the project's default hub.
        modules: module folders or hub ids to use instead of a hub.
        base_model: HF id or local path; default: the hub's base model.
        eval_examples: optional held-out JSONL: exact match is reported before and after composing.
        num_candidates: modules drawn at random from the library (LoraHub: 20).
        budget: candidate evaluations (LoraHub: 40).
        population: candidates scored per batch (CMA default: 4 + 3 ln N, at most budget/5).
        optimizer: "cma" (CMA-ES) or "ngopt" (the reference's NGOpt, which runs Cobyla).
        l1: coefficient of the mean |w| penalty (LoraHub: 0.05).
        lower / upper: bounds of every weight (LoraHub: -1.5, 1.5).
        seed: seeds the choice of modules and the optimizer.
        probe_singles: score the N single modules in one batch first, so the result is never worse than
            the best of them (default: on, except for the reference optimizer "ngopt").
        start: where CMA-ES starts: "best-probe" (the best single module; default) or "zero" (LoraHub).
        step: CMA-ES's first step around the start, in weight units.
        device: "cpu", "cuda", ...; default: cuda if available.
        merged: also write the base model with the adapter merged in (``merged/``).
        max_rows: rows (candidates x examples) per forward pass; lower it if memory runs out.
        progress: show progress bars.
        method: "static" (LoraHub: one searched weighting, mergeable) or "routed" (per-layer top-k routers
            over the frozen candidates, learnt by gradient; not mergeable; the search options are unused).
        routed_top_k / routed_steps / routed_lr / router_aux_loss_coef: the routed method's experts per token,
            AdamW steps, learning rate and load-balance coefficient (:class:`lorahub.routed.RoutedConfig`).
    """

    examples: str = field(default=MISSING, metadata={"help": "JSONL file of few-shot examples (input/output per line)"})
    out: str = field(default=MISSING, metadata={"help": "folder for the composed adapter"})
    hub: str | None = field(default=None, metadata={"help": "module hub name (hub_index/NAME.json) or manifest path"})
    modules: list[str] | None = field(default=None, metadata={"help": "module folders or hub ids instead of a hub"})
    base_model: str | None = field(default=None, metadata={"help": "HF id or local path (default: the hub's base)"})
    eval_examples: str | None = field(default=None, metadata={"help": "held-out JSONL: exact match before/after"})
    num_candidates: int = field(default=20, metadata={"help": "modules drawn at random from the library"})
    budget: int = field(default=40, metadata={"help": "candidate evaluations"})
    population: int | None = field(default=None, metadata={"help": "candidates per batch (CMA default 4+3 ln N, at most budget/5)"})
    optimizer: str = field(default="cma", metadata={"help": f"one of {', '.join(OPTIMIZERS)}"})
    l1: float = field(default=0.05, metadata={"help": "coefficient of the mean |w| penalty"})
    lower: float = field(default=-1.5, metadata={"help": "lower bound of each weight"})
    upper: float = field(default=1.5, metadata={"help": "upper bound of each weight"})
    seed: int = field(default=42, metadata={"help": "seed for module choice and optimizer"})
    probe_singles: bool | None = field(default=None, metadata={
        "help": "score each single module before the search (N extra evaluations; default: on except for ngopt)"})
    start: str = field(default="best-probe", metadata={
        "help": "CMA-ES start: best-probe (the best single module) or zero (LoraHub's start)"})
    step: float = field(default=DEFAULT_STEP, metadata={"help": "CMA-ES's first step around the start, in weight units"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available)"})
    merged: bool = field(default=False, metadata={"help": "also write the merged full model under OUT/merged"})
    max_rows: int = field(default=256, metadata={"help": "rows per forward pass (lower it if memory runs out)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    method: str = field(default="static", metadata={
        "help": "static (LoraHub: one searched weighting, mergeable) or routed (learnt per-token top-k routers)"})
    routed_top_k: int = field(default=2, metadata={"help": "routed: candidate modules per token"})
    routed_steps: int = field(default=40, metadata={"help": "routed: AdamW steps on the examples"})
    routed_lr: float = field(default=2e-3, metadata={"help": "routed: router learning rate"})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "routed: load-balance loss coefficient"})

    def __post_init__(self) -> None:
        for name in ("num_candidates", "budget", "max_rows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LorahubValueError(f"`{name}` should be a positive integer, but the value passed is {getattr(self, name)!r}")
        if self.population is not None and self.population < 1:
            raise LorahubValueError(f"`population` should be a positive integer, but the value passed is {self.population!r}")
        if self.population is not None and self.budget < self.population:
            raise LorahubValueError(f"`budget` ({self.budget}) is smaller than `population` ({self.population}); raise the budget")
        if self.optimizer not in OPTIMIZERS:
            raise LorahubValueError(f"unknown optimizer {self.optimizer!r}. Available: {', '.join(OPTIMIZERS)}")
        if not self.lower < 0 < self.upper:
            raise LorahubValueError(f"bounds must contain the start w=0: lower ({self.lower}) < 0 < upper ({self.upper})")
        if not self.step > 0:
            raise LorahubValueError(f"`step` should be a positive number, but the value passed is {self.step!r}")
        if self.start not in ("zero", "best-probe"):
            raise LorahubValueError(f"unknown start {self.start!r}. Available: zero, best-probe")
        if self.hub and self.modules:
            raise LorahubValueError("give either `hub` or `modules`, not both")
        if self.method not in ("static", "routed"):
            raise LorahubValueError(f"unknown method {self.method!r}. Available: static, routed")
        if self.method == "routed":
            if self.merged:
                raise LorahubValueError(
                    "`merged` cannot be used with method routed: its routing is input-dependent (per token), so it "
                    "does not merge into the weights; drop --merged, or use --method static for a mergeable adapter"
                )
            self.routed_config()  # checks top_k, steps, lr, coefficient

    def routed_config(self) -> Any:
        """The :class:`lorahub.routed.RoutedConfig` of the routed_* options."""
        from .routed import RoutedConfig

        return RoutedConfig(top_k=self.routed_top_k, steps=self.routed_steps, lr=self.routed_lr,
                            router_aux_loss_coef=self.router_aux_loss_coef)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "config") -> "ComposeConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LorahubValueError(f"{where}: unknown key(s) {unknown}. Known keys: {', '.join(sorted(known))}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
        if missing:
            raise LorahubValueError(f"{where}: missing required key(s) {missing}")
        return cls(**data)
