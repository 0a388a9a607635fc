"""``ComposeConfig``: every option of a composition run, shared by the CLI flags and YAML config files.

The search options and their defaults are :class:`lorahub.optimize.SearchConfig`'s; this adds the rest."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any

from .data import DEFAULT_MAX_LENGTH
from .errors import LorahubValueError
from .optimize import SearchConfig


@dataclass(kw_only=True)
class ComposeConfig(SearchConfig):
    """Options of ``lorahub compose`` (and of ``--config FILE.yaml``, which takes the same keys).

    The search options (num_candidates, select, candidate_order, loss_scale, budget, population, optimizer, l1,
    lower, upper, seed, probe_singles, start, step, max_rows) are :class:`~lorahub.optimize.SearchConfig`'s. The others:

    Args:
        examples: JSONL file of the new task's few-shot examples (``input``/``output`` per line).
        out: folder to write the adapter to (PEFT format + lorahub.json + card).
        hub: module hub (``NAME.json`` on :func:`lorahub.store.hub_dirs`, or a manifest path); default: the default hub.
        modules: module folders or hub ids to use instead of a hub.
        base_model: HF id or local path; default: the hub's base model.
        eval_examples: optional held-out JSONL: exact match is reported before and after composing.
        device: "cpu", "cuda", ...; default: cuda if available.
        max_length: token limit of one example: a longer prompt is cut from the left (one warning line names the
            example), an answer over the limit is an error naming it.
        merged: also write the base model with the adapter merged in (``merged/``).
        progress: show progress bars.
        method: "static" (LoraHub: one searched weighting, mergeable) or "routed" (per-layer top-k routers
            over the frozen candidates, learnt by gradient; not mergeable; the search options are unused).
        routed_top_k / routed_steps / routed_lr / router_aux_loss_coef: the routed method's experts per token,
            AdamW steps, learning rate and load-balance coefficient (:class:`lorahub.routed.RoutedConfig`).
    """

    examples: str = field(default=MISSING, metadata={"help": "JSONL file of few-shot examples (input/output per line)"})
    out: str = field(default=MISSING, metadata={"help": "folder for the composed adapter"})
    hub: str | None = field(default=None, metadata={"help": "module hub name (NAME.json on the hub path: $LORAHUB_HUB_PATH, lorahub/hubs/) or manifest path"})
    modules: list[str] | None = field(default=None, metadata={"help": "module folders or hub ids instead of a hub"})
    base_model: str | None = field(default=None, metadata={"help": "HF id or local path (default: the hub's base)"})
    eval_examples: str | None = field(default=None, metadata={"help": "held-out JSONL: exact match before/after"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available)"})
    max_length: int = field(default=DEFAULT_MAX_LENGTH, metadata={
        "help": "tokens per example; a longer prompt is cut from the left (with a warning naming it), never the answer"})
    merged: bool = field(default=False, metadata={"help": "also write the merged full model under OUT/merged"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    method: str = field(default="static", metadata={
        "help": "static (LoraHub: one searched weighting, mergeable) or routed (learnt per-token top-k routers)"})
    routed_top_k: int = field(default=2, metadata={"help": "routed: candidate modules per token"})
    routed_steps: int = field(default=40, metadata={"help": "routed: AdamW steps on the examples"})
    routed_lr: float = field(default=2e-3, metadata={"help": "routed: router learning rate"})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "routed: load-balance loss coefficient"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hub and self.modules:
            raise LorahubValueError("give either `hub` or `modules`, not both")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise LorahubValueError(f"`max_length` should be an integer of at least 2 tokens, but the value passed is {self.max_length!r}")
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
                            router_aux_loss_coef=self.router_aux_loss_coef, max_length=self.max_length)
