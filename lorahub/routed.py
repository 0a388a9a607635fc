"""Routed composition: the candidate modules as frozen experts, per-layer top-k routers learnt by gradient.

LoraHub (``compose(method="static")``) gives every token one weighting w of the N candidate modules. Routed
composition (``method="routed"``) lets the weighting depend on the token, MixLoRA-style, with the modules as
frozen experts. Each attention module whose projections the modules adapt gets ONE linear router R (in → N,
no bias), shared by the projections that read the same input (Llama's q_proj and v_proj both read the normed
hidden state; projections of one parent with different in_features each get their own). Per token x::

    p = softmax(R x)                        # (N,)
    w = top-k of p, renormalised to sum 1   # k = 1: Switch routing, w_e = p_e (lorahub.mixlora.route)
    y = W x + Σ_{e ∈ top-k} w_e · s · B_e A_e x          # s = alpha / r

Only the routers are trained (N·in weights per router: ~ N·hidden·layers in all); the base model and the
modules stay frozen. The objective is the few-shot answer-token loss (:func:`lorahub.evaluate.block_losses`:
what the static search scores, soft-capping included) plus ``router_aux_loss_coef`` × the Switch load-balance
loss (:func:`lorahub.mixlora.load_balance_loss`, padding excluded), averaged over the router calls of the
forward pass. Full-batch AdamW, seeded, no dropout: deterministic. The router state with the lowest objective
seen is kept (each step's objective is measured at the weights it starts from, and the final weights are
measured once more).

Why dense: the delta is computed for all N experts and masked by the gates, as two matmuls,
``((x @ A_catᵀ) ⊙ gates) @ B_cat`` with A_cat [N·r, in] and B_cat [N·r, out]. N·r (320 for 20 modules of
rank 16) is small next to the hidden size, so this costs about as much as one more projection, and it
needs no per-expert gather/scatter of tokens (which dominates at these sizes, and complicates autograd).

Not mergeable: the weighting changes from token to token, so no single ΔW reproduces it; predictions run
with forward hooks on the base ``nn.Linear`` layers (no module replacement). They handle generation with a
KV cache: each step sees only its new tokens, and routing is per token.

Folder written by :meth:`RoutedComposition.save` (atomically)::

    routed_config.json     format_version, method "routed", RoutedConfig, base model, hub, the modules in
                           expert order with their sha256 and location, each router's shape and layers,
                           sha256 of routers.safetensors, and the record (loss history, times, seed, ...)
    routers.safetensors    fp32 router weights [N, in], one tensor per router (key = router name)
    README.md              a short card: method, modules, loss, the command

:func:`load_routed` reads it back (checking both sha256s and every shape) and predicts identically.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .files import atomic_dir, locked_output, sha256_file
from .data import Example, encode
from .errors import LorahubFileError, LorahubIntegrityError, LorahubValueError
from .evaluate import block_losses
from .loading import load_base_for, resolve_store, stack_for
from .mixlora import load_balance_loss, route
from .models import is_seq2seq
from .export import card_text, check_output_dir, versions
from .store import ModuleStore, StackedModules
from .tables import markdown_table
from .train import stable_seed

CONFIG_FILE = "routed_config.json"
WEIGHTS_FILE = "routers.safetensors"
FORMAT_VERSION = 1


@dataclass
class RoutedConfig:
    """How the routers of a routed composition are trained (documented like PEFT's ``LoraConfig``).

    Args:
        top_k: Experts (candidate modules) per token; renormalised top-k for k > 1, Switch routing for k = 1.
        steps: Full-batch AdamW steps on the few-shot examples.
        lr: AdamW learning rate (constant).
        weight_decay: AdamW weight decay on the router weights (decay pulls towards uniform routing).
        grad_clip: Clip the routers' global gradient norm to this (0 disables).
        router_aux_loss_coef: Coefficient of the load-balance loss added to the few-shot loss.
        router_init_std: Router weights start from N(0, std²); 0 starts from uniform probabilities.
        max_length: Token limit of one example (longer prompts are cut from the left).
        seed: Seed of the router initialisation (None: the ``seed`` given to ``compose``).
        null_expert: Add a zero expert (ΔW = 0) to the router's choices. Renormalised top-k gates sum to 1,
            so without it every token gets a full-strength mix of modules and the composition cannot
            stay close to the base model; with it, top-2 picking (module, null) scales one module down.
    """

    top_k: int = field(default=2, metadata={"help": "experts per token (renormalised top-k; k=1: Switch routing)"})
    steps: int = field(default=40, metadata={"help": "full-batch AdamW steps on the few-shot examples"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate (constant)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the router weights"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the routers' gradient norm to this; 0 disables"})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "coefficient of the load-balance loss"})
    router_init_std: float = field(default=0.02, metadata={"help": "router weight ~ N(0, std^2); 0: uniform start"})
    max_length: int = field(default=1024, metadata={"help": "tokens per example; longer prompts are cut from the left"})
    seed: int | None = field(default=None, metadata={"help": "seed of the router initialisation (None: compose's seed)"})
    null_expert: bool = field(default=True, metadata={
        "help": "add a zero expert the router can pick: a token may then take a module at less than full strength, "
                "or none (without it the gates of the chosen modules always sum to 1)"})

    def __post_init__(self) -> None:
        for name in ("top_k", "steps", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LorahubValueError(f"`{name}` should be a positive integer but the value passed is {value!r}")
        if not self.lr > 0:
            raise LorahubValueError(f"`lr` should be positive but the value passed is {self.lr!r}")
        for name in ("weight_decay", "grad_clip", "router_aux_loss_coef", "router_init_std"):
            if getattr(self, name) < 0:
                raise LorahubValueError(f"`{name}` should be >= 0 but the value passed is {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def num_experts(self, num_modules: int) -> int:
        """Router outputs: the modules, plus the zero expert when ``null_expert``."""
        return num_modules + int(self.null_expert)


NULL_EXPERT = "(none)"  # the zero expert's name in usage tables


# -----------------------------------------------------------------------------
# routing math


def router_groups(model: nn.Module, stacked: StackedModules) -> dict[str, list[str]]:
    """Router name -> the adapted layers it serves: one router per parent module and input width.

    ``model.layers.0.self_attn.q_proj`` and ``...v_proj`` share ``model.layers.0.self_attn.router[q_proj+v_proj]``.
    """
    named = dict(model.named_modules())
    by_parent: dict[str, dict[int, list[str]]] = {}
    for layer in stacked.layers:
        parent = layer.rpartition(".")[0]
        by_parent.setdefault(parent, {}).setdefault(named[layer].in_features, []).append(layer)
    groups = {}
    for parent, by_in in by_parent.items():
        for layers in by_in.values():
            leaves = "+".join(l.rsplit(".", 1)[-1] for l in layers)
            groups[f"{parent}.router[{leaves}]" if parent else f"router[{leaves}]"] = layers
    return groups


def init_routers(model: nn.Module, groups: Mapping[str, Sequence[str]], num_experts: int, std: float,
                 seed: int) -> dict[str, torch.Tensor]:
    """fp32 router weights [N, in] ~ N(0, std²), each from a generator seeded by (seed, router name)."""
    named = dict(model.named_modules())
    device = next(model.parameters()).device
    routers = {}
    for name, layers in groups.items():
        gen = torch.Generator().manual_seed(stable_seed(seed, name, "router"))
        w = torch.randn(num_experts, named[layers[0]].in_features, generator=gen) * std
        routers[name] = w.to(device)
    return routers


def routed_delta(x: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Σ_e gate_e · B_e A_e x, dense over the N experts.

    x (..., in), a_cat [N·r, in] (A stacked), b_cat [N·r, out] (Bᵀ stacked, scaling folded in), gates (..., N).
    """
    n = gates.shape[-1]
    h = x @ a_cat.T  # (..., N·r)
    h = (h.unflatten(-1, (n, -1)) * gates.unsqueeze(-1).to(h.dtype)).flatten(-2)  # (..., N·r), off-top-k zeroed
    return h @ b_cat  # (..., out)


class RoutingHooks:
    """Forward hooks that add the routed delta to every adapted ``nn.Linear``; use as a context manager.

    Projections sharing a router and reading the same input tensor (q_proj, v_proj) route it once. With
    ``record=True`` each router call's (probs, top-k, gates) is kept in ``stats`` for :meth:`aux_loss`.
    """

    def __init__(self, model: nn.Module, stacked: StackedModules, routers: Mapping[str, torch.Tensor],
                 groups: Mapping[str, Sequence[str]], top_k: int, *, record: bool = False, null_expert: bool = False):
        p = next(model.parameters())
        self.model, self.routers, self.top_k, self.record = model, routers, top_k, record
        self.num_modules = len(stacked)
        self.num_experts = len(stacked) + int(null_expert)  # the zero expert, if any, is the last gate
        self._router_of = {layer: name for name, layers in groups.items() for layer in layers}
        self._a = {l: a.to(p.device, p.dtype).flatten(0, 1) for l, a in stacked.A.items()}  # [N·r, in]
        self._b = {l: (b * stacked.scaling).to(p.device, p.dtype).transpose(1, 2).flatten(0, 1)  # [N·r, out]
                   for l, b in stacked.B.items()}
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # router -> (input, gates)
        self._handles: list[Any] = []
        self.stats: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> "RoutingHooks":
        named = dict(self.model.named_modules())
        for layer in self._a:
            self._handles.append(named[layer].register_forward_hook(self._make_hook(layer)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.reset()

    def reset(self) -> None:
        """Forget the last forward's routing (call before each training forward)."""
        self._cache.clear()
        self.stats.clear()

    def _gates(self, name: str, x: torch.Tensor) -> torch.Tensor:
        cached = self._cache.get(name)
        if cached is not None and cached[0] is x:  # the sibling projection of the same input
            return cached[1]
        probs, top_i, gates = route(x, self.routers[name], self.top_k, dense=True)  # gates (..., N)
        if self.record:
            self.stats.append((name, probs, top_i, gates))
        self._cache[name] = (x, gates)
        return gates

    def _make_hook(self, layer: str) -> Callable:
        name, a_cat, b_cat = self._router_of[layer], self._a[layer], self._b[layer]

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            gates = self._gates(name, x)[..., : self.num_modules]  # the zero expert adds nothing
            return out + routed_delta(x, a_cat, b_cat, gates).to(out.dtype)

        return hook

    def aux_loss(self, masks: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
        """Load-balance loss of the recorded router calls, averaged; padding excluded.

        Each call takes the first mask of ``masks`` with its (batch, tokens) shape (causal LMs: the attention
        mask; seq2seq: the encoder's or the decoder's mask, told apart by shape only).
        """
        if not self.stats:
            raise LorahubValueError("no router statistics: run a forward pass with RoutingHooks(..., record=True) first")
        losses = []
        for _, probs, top_i, _ in self.stats:
            mask = _mask_of(masks, probs)
            losses.append(load_balance_loss(probs, top_i, self.num_experts, mask))
        return torch.stack(losses).mean()

    def usage(self, masks: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
        """Mean gate of each expert over the recorded calls' real tokens: (N,), sums to 1 (k>1)."""
        per_call = []
        for _, probs, _, gates in self.stats:
            mask = _mask_of(masks, probs)
            g = gates.reshape(-1, gates.shape[-1])
            if mask is not None:
                g = g[mask.reshape(-1).bool()]
            per_call.append(g.mean(0))
        return torch.stack(per_call).mean(0)


def _mask_of(masks: Sequence[torch.Tensor | None], probs: torch.Tensor) -> torch.Tensor | None:
    """The first mask with the (batch, tokens) shape of a router call's probs (None: no padding to drop)."""
    return next((m for m in masks if m is not None and tuple(m.shape) == tuple(probs.shape[:-1])), None)


# -----------------------------------------------------------------------------
# training


@dataclass
class RouterTraining:
    """What :func:`train_routers` returns: the kept routers and the run's figures."""

    routers: dict[str, torch.Tensor]
    loss: float  # few-shot loss at the kept routers
    objective: float  # loss + coef · load balance, the quantity minimised
    initial_loss: float  # at the initial routers
    zero_weight_loss: float  # base model alone
    history: list[dict[str, float]]
    usage: list[float]  # mean gate per expert at the kept routers
    seconds: float


def train_routers(model: nn.Module, tokenizer: Any, stacked: StackedModules, examples: Sequence[Example],
                  config: RoutedConfig, *, seed: int, progress: bool = False) -> RouterTraining:
    """Learn the routers on ``examples`` (full batch, AdamW); base model and modules stay frozen."""
    n_experts = config.num_experts(len(stacked))
    if config.top_k > n_experts:
        raise LorahubValueError(
            f"`top_k`={config.top_k} is larger than the {n_experts} experts ({len(stacked)} candidate module(s)"
            f"{' + the zero expert' if config.null_expert else ''}); lower top_k or give more modules (num_candidates)"
        )
    seq2seq = is_seq2seq(model)
    device = next(model.parameters()).device
    batch = encode(tokenizer, examples, seq2seq=seq2seq, max_length=config.max_length).to(device)
    masks = (batch.attention_mask, batch.decoder_attention_mask)
    groups = router_groups(model, stacked)
    routers = init_routers(model, groups, n_experts, config.router_init_std, seed)
    for w in routers.values():
        w.requires_grad_(True)
    opt = torch.optim.AdamW(list(routers.values()), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999))
    t0 = time.perf_counter()
    with torch.no_grad():
        zero_loss = float(block_losses(model, batch, 1, seq2seq)[0])
    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor], float, list[float]] = (math.inf, {}, math.inf, [])
    bar = None
    if progress:
        from .progress import progress_bar

        bar = progress_bar(config.steps, "routed compose", unit="step")
    try:
        with RoutingHooks(model, stacked, routers, groups, config.top_k, record=True,
                          null_expert=config.null_expert) as hooks:
            for step in range(config.steps + 1):  # the last pass only measures the final routers
                last = step == config.steps
                hooks.reset()
                with torch.set_grad_enabled(not last):
                    loss = block_losses(model, batch, 1, seq2seq)[0]
                    aux = hooks.aux_loss(masks)
                    objective = loss + config.router_aux_loss_coef * aux
                row = {"step": step, "loss": loss.item(), "aux_loss": aux.item(), "objective": objective.item()}
                history.append(row)
                if math.isfinite(row["objective"]) and row["objective"] < best[0]:
                    usage = hooks.usage(masks).detach().cpu().tolist()
                    best = (row["objective"], {n: w.detach().clone() for n, w in routers.items()}, row["loss"], usage)
                if last:
                    break
                opt.zero_grad(set_to_none=True)
                objective.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(list(routers.values()), config.grad_clip)
                opt.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
    finally:
        if bar is not None:
            bar.close()
    if not best[1]:
        raise LorahubValueError("every router state scored a non-finite loss; check the examples and the modules")
    return RouterTraining(best[1], best[2], best[0], history[0]["loss"], zero_loss, history, best[3],
                          time.perf_counter() - t0)


# -----------------------------------------------------------------------------
# the composition


@dataclass
class RoutedComposition:
    """The result of ``compose(..., method="routed")``: routers over frozen candidate modules.

    Same surface as :class:`lorahub.api.Composition` (``predict``, ``save``, ``record``, ``loss``,
    ``history``), except that it cannot be merged into the weights: routing is input-dependent.
    """

    routers: dict[str, torch.Tensor]
    loss: float
    objective: float
    history: list[dict]
    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    stacked: StackedModules = field(repr=False)
    config: RoutedConfig = field(default_factory=RoutedConfig)
    record: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def groups(self) -> dict[str, list[str]]:
        return router_groups(self.model, self.stacked)

    @property
    def num_router_params(self) -> int:
        return sum(w.numel() for w in self.routers.values())

    def routing(self, *, record: bool = False) -> RoutingHooks:
        """The routing hooks, to run the model by hand: ``with comp.routing(): comp.model(...)``."""
        return RoutingHooks(self.model, self.stacked, self.routers, self.groups, self.config.top_k, record=record,
                            null_expert=self.config.null_expert)

    def predict(self, inputs: Sequence[str] | str, *, max_new_tokens: int | None = None, batch_size: int = 16,
                progress: bool = False) -> list[str]:
        """Greedy answers with the routing hooks attached (removed afterwards)."""
        from .generate import generate

        if isinstance(inputs, str):
            inputs = [inputs]
        max_new = max_new_tokens or self.record.get("max_new_tokens", 32)
        with self.routing():
            return generate(self.model, self.tokenizer, list(inputs), max_new_tokens=max_new,
                            batch_size=batch_size, progress=progress)

    def merge(self) -> Any:
        raise LorahubValueError(
            "a routed composition cannot be merged into the weights: its routing is input-dependent (each token "
            "gets its own weighting of the modules), so no single ΔW reproduces it. Use compose(method='static') "
            "(LoraHub's composition) for a mergeable adapter, or predict() with the routing hooks"
        )

    @locked_output("out_dir")
    def save(self, out_dir: str | os.PathLike, *, merged: bool = False) -> Path:
        """Write ``routed_config.json``, ``routers.safetensors`` and a card into ``out_dir`` atomically (holding
        its lock: :func:`lorahub.files.output_lock`)."""
        if merged:
            self.merge()  # raises: input-dependent routing
        from safetensors.torch import save_file

        out = check_output_dir(out_dir, marker=CONFIG_FILE)
        groups = self.groups
        state = {n: w.detach().float().cpu().contiguous() for n, w in self.routers.items()}
        with atomic_dir(out) as tmp:
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "lorahub": "routed"})
            meta = {
                "format_version": FORMAT_VERSION, "method": "routed", "config": self.config.to_dict(),
                "base_model": self.record.get("base_model"), "hub": self.record.get("hub"),
                "modules": self.record.get("module_files") or [{"name": n} for n in self.stacked.names],
                "routers": {n: {"shape": list(state[n].shape), "layers": groups[n]} for n in state},
                "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(tmp / WEIGHTS_FILE)},
                "record": self.record,
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            (tmp / "README.md").write_text(_card(self), encoding="utf-8")
        return out


def _card(comp: RoutedComposition) -> str:
    r = comp.record
    usage = r.get("module_usage") or {}
    names = list(comp.stacked.names) + ([NULL_EXPERT] if comp.config.null_expert else [])
    return card_text(
        base_model=r.get("base_model"), tags=["lorahub", "routed-lora"], title="Routed LoRA composition",
        description=f"""{len(comp.stacked)} frozen LoRA modules with learnt per-layer top-{comp.config.top_k} routers
({comp.num_router_params} router parameters, {comp.config.steps} AdamW steps on {r.get('num_examples')} examples,
seed {r.get('router_seed')}). Few-shot loss {comp.loss:.4f} (base model {r.get('zero_weight_loss', float('nan')):.4f}).
Routing is per token, so this is not a mergeable adapter: load it with `lorahub.routed.load_routed(folder)`.""",
        table=markdown_table(["module", "mean gate on the few-shot tokens"],
                             [(n, f"{usage.get(n, float('nan')):.3f}") for n in names]),
        command=r.get("command") or '(Python API: lorahub.compose(..., method="routed"))',
    )


def module_files(store: ModuleStore, names: Sequence[str]) -> list[dict[str, Any]]:
    """Each module's name, location and weights sha256 (from the manifest, else hashed), for the record."""
    return [{"name": n, "location": store.specs[n].location, "sha256": store.weights_sha256(n)} for n in names]


def compose_routed(examples: Sequence[Example], store: ModuleStore, model: Any, tokenizer: Any, base_name: str,
                   stacked: StackedModules, config: RoutedConfig, *, seed: int, num_candidates: int,
                   progress: bool = False, command: str | None = None) -> RoutedComposition:
    """The routed path of :func:`lorahub.api.compose` (candidates already drawn and stacked)."""
    router_seed = seed if config.seed is None else config.seed
    run = train_routers(model, tokenizer, stacked, examples, config, seed=router_seed, progress=progress)
    max_target = max(len(tokenizer(e.output, add_special_tokens=False).input_ids) for e in examples)
    groups = router_groups(model, stacked)
    record = {
        "method": "routed", "base_model": base_name, "modules": list(stacked.names),
        "module_files": module_files(store, stacked.names), "hub": store.name,
        "loss": run.loss, "objective": run.objective, "zero_weight_loss": run.zero_weight_loss,
        "initial_loss": run.initial_loss, "seconds": round(run.seconds, 3), "steps": config.steps,
        "evaluations": len(run.history), "num_router_params": sum(w.numel() for w in run.routers.values()),
        "routers": {n: {"shape": list(run.routers[n].shape), "layers": groups[n]} for n in run.routers},
        "module_usage": dict(zip(list(stacked.names) + [NULL_EXPERT] * config.null_expert, run.usage)),
        "routed_config": config.to_dict(),
        "seed": seed, "router_seed": router_seed, "num_candidates": num_candidates, "num_examples": len(examples),
        "max_new_tokens": max_target + 4, "history": run.history, "command": command, "versions": versions(),
    }
    return RoutedComposition(run.routers, run.loss, run.objective, run.history, model, tokenizer, stacked, config, record)


def read_routed_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise LorahubFileError(f"{path} not found: not a routed composition folder (save one with RoutedComposition.save)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("method") != "routed" or meta.get("format_version") != FORMAT_VERSION:
            raise LorahubValueError(f"{path}: method {meta.get('method')!r}, format_version {meta.get('format_version')!r}; "
                                    f"expected 'routed', {FORMAT_VERSION}")
        known = {f.name for f in fields(RoutedConfig)}
        unknown = set(meta["config"]) - known
        if unknown:
            raise LorahubValueError(f"{path}: unknown config fields {sorted(unknown)}")
        meta["config"] = RoutedConfig(**meta["config"])
        meta["modules"], meta["routers"], meta["weights"]["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise LorahubIntegrityError(f"{path} is corrupted or not a routed config ({type(e).__name__}: {e})") from None
    return meta


def load_routed(folder: str | os.PathLike, modules: Any = None, base_model: Any = None, *,
                device: str | torch.device | None = None) -> RoutedComposition:
    """Reload a saved routed composition: its modules (by default from the recorded hub or module folders,
    each checked against its recorded sha256), its base model (by default the recorded one) and its routers.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_routed_config(folder)
    names = [m["name"] for m in meta["modules"]]
    store = resolve_store(modules) if modules is not None else None
    if store is None and meta.get("hub"):
        try:
            store = resolve_store(meta["hub"])
        except LorahubFileError:  # a manifest off the hub path: fall back to the recorded module locations
            store = None
    if store is None:
        store = ModuleStore(name=meta.get("hub"))
        for m in meta["modules"]:
            store.add_path(m["location"], name=m["name"])
    missing = [n for n in names if n not in store]
    if missing:
        raise LorahubValueError(f"{folder}: modules {missing[:5]} are not in the given modules/hub ({store.name or 'folders'})")
    for got, want in zip(module_files(store, names), meta["modules"]):
        if want.get("sha256") and got["sha256"] != want["sha256"]:
            raise LorahubIntegrityError(
                f"module {got['name']!r}: its weights have sha256 {got['sha256'][:12]}…, but {CONFIG_FILE} recorded "
                f"{want['sha256'][:12]}…; the routers were learnt on another version of this module"
            )
    model, tokenizer, base_name = load_base_for(base_model if base_model is not None else meta.get("base_model"), store,
                                                device)
    stacked = stack_for(store, names, model, base_name)
    wpath = folder / WEIGHTS_FILE
    if not wpath.is_file():
        raise LorahubFileError(f"{wpath} not found")
    if (digest := sha256_file(wpath)) != meta["weights"]["sha256"]:
        raise LorahubIntegrityError(f"{wpath} is corrupted: sha256 {digest[:12]}… differs from "
                                    f"{meta['weights']['sha256'][:12]}… recorded in {CONFIG_FILE}")
    state = load_file(str(wpath))
    groups = router_groups(model, stacked)
    problems = []
    if set(state) != set(groups):
        problems.append(f"routers {sorted(set(state) ^ set(groups))[:4]} do not match the model's adapted layers")
    for n in set(state) & set(groups):
        want = (meta["config"].num_experts(len(stacked)), dict(model.named_modules())[groups[n][0]].in_features)
        if tuple(state[n].shape) != want:
            problems.append(f"router {n!r} has shape {list(state[n].shape)}, expected {list(want)}")
    if problems:
        raise LorahubValueError(f"{wpath} does not fit {type(model).__name__} with these modules: " + "; ".join(problems[:4]))
    p = next(model.parameters())
    routers = {n: state[n].to(p.device, torch.float32) for n in groups}
    record = dict(meta.get("record") or {})
    return RoutedComposition(routers, record.get("loss", math.nan), record.get("objective", math.nan),
                             record.get("history", []), model, tokenizer, stacked, meta["config"], record)
