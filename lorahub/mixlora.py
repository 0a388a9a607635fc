"""MixLoRA: a mixture of LoRA experts over one frozen Llama-family FFN, plus plain LoRA on attention.

The layer (:class:`MixLoraFFN`). A Llama MLP computes ``down(act(gate(x)) * up(x))``. Expert e adds a
LoRA to each of the three projections (ΔW = B·A·alpha/r), so with ``g_e = gate(x) + s·B_g,e A_g,e x``,
``u_e = up(x) + s·B_u,e A_u,e x`` and ``h_e = act(g_e) * u_e``::

    y(x) = Σ_{e ∈ topk(x)} w_e(x) · (down(h_e) + s·B_d,e A_d,e h_e)

A linear router (hidden → N, no bias) gives p = softmax(router(x)); the k largest are kept and
renormalised to sum to 1. With ``top_k=1`` that renormalisation would make the gate constant 1 and
cut the router's gradient, so top-1 uses Switch routing: w = p_e, the raw probability. :func:`route`
does this, for routed composition (:mod:`lorahub.routed`) too.

Two exact implementations (``MixLoraFFN.impl``):

- ``naive``: each expert's tokens go through that expert's own full FFN; the frozen gate, up and down
  projections are recomputed for every expert (k passes of the base FFN per token).
- ``shared``: ``gate(x)`` and ``up(x)`` run once over all tokens; each expert adds its LoRA deltas on
  its routed tokens only. The frozen down projection is linear, so
  ``Σ_e w_e down(h_e) = down(Σ_e w_e h_e)`` (bias times Σ_e w_e): one down pass over the weighted sum
  of the experts' activations, plus each expert's down-LoRA on its own tokens. One pass of the base
  FFN per token; ``tests/test_mixlora.py`` checks it equals ``naive`` (outputs and gradients).

Load balance (:func:`load_balance_loss`): the Switch-Transformers auxiliary loss ``N · Σ_i f_i · P_i``
over the batch's tokens (padding excluded when an attention mask is given), where P_i is the mean
router probability of expert i and, for top-k, f_i = (tokens routed to i) / (k · tokens), i.e. the
fraction of the k·T token-assignments that went to i, so Σ_i f_i = 1 for any k. Perfectly balanced
routing gives exactly 1; a collapsed router (every token to expert 0 with p≈1) gives ≈ N for top-1
and ≈ N/k for top-k (a token can be assigned to expert 0 only once). :func:`mixlora_aux_loss` averages
it over the layers and multiplies by ``router_aux_loss_coef``: add it to the training loss.

Folder format (:func:`save_mixlora`, written atomically): ``mixlora_config.json`` (the
:class:`MixLoraConfig` fields, ``format_version``, and the sha256 and tensor shapes of the weights) and
``mixlora_model.safetensors`` (fp32, keys = the model's trainable parameter names, e.g.
``model.layers.0.mlp.lora_A_gate`` [N, r, hidden] or ``model.layers.0.self_attn.q_proj.lora_A`` [1, r, in]).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .files import atomic_dir, atomic_write_json, sha256_file
from .errors import NOT_MERGEABLE, LorahubFileError, LorahubIntegrityError, LorahubValueError
from .train import MultiLoraLinear, TrainConfig, attach_adapters

CONFIG_FILE = "mixlora_config.json"
WEIGHTS_FILE = "mixlora_model.safetensors"
FORMAT_VERSION = 1
IMPLS = ("shared", "naive")


@dataclass
class MixLoraConfig:
    """A MixLoRA adapter (documented like PEFT's ``LoraConfig``).

    Args:
        num_experts: Number N of LoRA experts in each FFN.
        top_k: Experts per token; renormalised top-k for k > 1, Switch (raw probability) routing for k = 1.
        r: LoRA rank of every expert projection and of the attention adapters.
        alpha: LoRA alpha; updates are scaled by alpha / r.
        dropout: Dropout on the LoRA inputs (experts and attention).
        router_aux_loss_coef: Coefficient of the load-balance loss in :func:`mixlora_aux_loss`.
        attn_targets: Attention projections that get a plain LoRA (empty: none).
        router_init_std: The router weight is drawn from N(0, router_init_std²).
        impl: FFN forward implementation, ``shared`` (fast) or ``naive`` (reference); same results.
    """

    num_experts: int = field(default=8, metadata={"help": "number N of LoRA experts in each FFN"})
    top_k: int = field(default=2, metadata={"help": "experts per token (renormalised top-k; k=1: Switch routing)"})
    r: int = field(default=8, metadata={"help": "LoRA rank of expert projections and attention adapters"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; updates are scaled by alpha / r"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA inputs"})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "coefficient of the load-balance loss"})
    attn_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "attention projections that get a plain LoRA (empty: none)"},
    )
    router_init_std: float = field(default=0.02, metadata={"help": "router weight ~ N(0, std^2)"})
    impl: str = field(default="shared", metadata={"help": "FFN forward: shared (fast) or naive (reference)"})

    def __post_init__(self) -> None:
        if isinstance(self.attn_targets, str):
            self.attn_targets = [t.strip() for t in self.attn_targets.split(",") if t.strip()]
        self.attn_targets = list(self.attn_targets)
        for name in ("num_experts", "top_k", "r"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LorahubValueError(f"`{name}` should be a positive integer but the value passed is {value!r}")
        if self.top_k > self.num_experts:
            raise LorahubValueError(
                f"`top_k`={self.top_k} is larger than `num_experts`={self.num_experts}; use top_k <= num_experts"
            )
        if self.alpha <= 0:
            raise LorahubValueError(f"`alpha` should be positive but the value passed is {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise LorahubValueError(f"`dropout` should be in [0, 1) but the value passed is {self.dropout!r}")
        if self.router_aux_loss_coef < 0 or self.router_init_std < 0:
            raise LorahubValueError("`router_aux_loss_coef` and `router_init_std` should be >= 0")
        if self.impl not in IMPLS:
            raise LorahubValueError(f"`impl` should be one of {IMPLS} but the value passed is {self.impl!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -----------------------------------------------------------------------------
# per-layer math


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, *, dense: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing, the one of MixLoRA and of routed composition (see the module docstring).

    x (..., in), router weight [N, in] -> probs = softmax(router x) (..., N) in fp32, the top-k experts
    (..., k) and their gates: (..., k), renormalised to sum 1 (k = 1: Switch, the raw probability, which
    keeps the router's gradient), or with ``dense`` the same gates scattered to (..., N), 0 off the top-k.
    """
    probs = F.softmax(x.to(router.dtype) @ router.T, dim=-1, dtype=torch.float32)  # (..., N)
    top_p, top_i = probs.topk(top_k, dim=-1)  # (..., k)
    w = top_p / top_p.sum(-1, keepdim=True) if top_k > 1 else top_p  # k=1: Switch, w = p
    return probs, top_i, torch.zeros_like(probs).scatter(-1, top_i, w) if dense else w


_LLAMA_FFN = ("gate_proj", "up_proj", "down_proj", "act_fn")


def check_llama_ffn(mlp: nn.Module, name: str = "mlp") -> None:
    """Raise unless ``mlp`` is a Llama-family gated FFN (gate_proj, up_proj, down_proj: nn.Linear; act_fn)."""
    missing = [a for a in _LLAMA_FFN if not hasattr(mlp, a)]
    bad = [a for a in _LLAMA_FFN[:3] if hasattr(mlp, a) and not isinstance(getattr(mlp, a), nn.Linear)]
    if missing or bad:
        raise LorahubValueError(
            f"FFN module {name!r} ({type(mlp).__name__}) is not a Llama-family FFN: MixLoRA needs nn.Linear "
            f"gate_proj, up_proj, down_proj and an act_fn; missing {missing}, not nn.Linear {bad}. "
            "Use a Llama-family base (Llama, SmolLM2, Qwen2, Mistral, Gemma)."
        )


class MixLoraFFN(nn.Module):
    """A frozen Llama FFN plus N LoRA experts and a top-k router (see the module docstring).

    After each forward, ``router_probs`` (B, T, N) and ``router_topk`` (B, T, k) hold the routing of
    the last batch for :func:`mixlora_aux_loss`.
    """

    def __init__(self, mlp: nn.Module, config: MixLoraConfig, name: str = "mlp"):
        super().__init__()
        check_llama_ffn(mlp, name)
        self.base = mlp
        self.num_experts, self.top_k, self.impl = config.num_experts, config.top_k, config.impl
        self.scaling = config.scaling
        self.aux_coef = config.router_aux_loss_coef
        n, r = config.num_experts, config.r
        hidden, inter = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        ref = mlp.gate_proj.weight
        kw = dict(device=ref.device, dtype=torch.float32)
        self.router = nn.Linear(hidden, n, bias=False, **kw)
        nn.init.normal_(self.router.weight, std=config.router_init_std)
        # experts: A [N, r, in], B [N, out, r]; A Kaiming-uniform (PEFT's), B zero, so ΔW = 0 at start
        self.lora_A_gate = nn.Parameter(torch.empty(n, r, hidden, **kw))
        self.lora_B_gate = nn.Parameter(torch.zeros(n, inter, r, **kw))
        self.lora_A_up = nn.Parameter(torch.empty(n, r, hidden, **kw))
        self.lora_B_up = nn.Parameter(torch.zeros(n, inter, r, **kw))
        self.lora_A_down = nn.Parameter(torch.empty(n, r, inter, **kw))
        self.lora_B_down = nn.Parameter(torch.zeros(n, hidden, r, **kw))
        with torch.no_grad():
            for a in (self.lora_A_gate, self.lora_A_up, self.lora_A_down):
                a.uniform_(-1 / math.sqrt(a.shape[-1]), 1 / math.sqrt(a.shape[-1]))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.router_probs: torch.Tensor | None = None
        self.router_topk: torch.Tensor | None = None

    def _lora(self, x: torch.Tensor, which: str, e: int) -> torch.Tensor:
        a, b = getattr(self, f"lora_A_{which}")[e], getattr(self, f"lora_B_{which}")[e]
        return ((self.dropout(x).to(a.dtype) @ a.T) * self.scaling) @ b.T  # (S_e, in) -> (S_e, r) -> (S_e, out)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape  # (B, T, H)
        x = hidden_states.reshape(-1, shape[-1])  # (S, H)
        probs, top_i, w = route(x, self.router.weight, self.top_k)  # (S, N), (S, k), (S, k)
        self.router_probs = probs.view(*shape[:-1], -1)
        self.router_topk = top_i.view(*shape[:-1], -1)
        out = self._shared(x, top_i, w) if self.impl == "shared" else self._naive(x, top_i, w)
        return out.view(shape)

    def _naive(self, x: torch.Tensor, top_i: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        m = self.base
        out = torch.zeros(x.shape[0], x.shape[1], device=x.device, dtype=torch.float32)  # (S, H)
        for e in range(self.num_experts):
            tok, slot = (top_i == e).nonzero(as_tuple=True)  # tokens routed to e, and where in their top-k
            if tok.numel() == 0:
                continue
            xe = x[tok]  # (S_e, H)
            g = m.gate_proj(xe) + self._lora(xe, "gate", e)  # (S_e, I)
            u = m.up_proj(xe) + self._lora(xe, "up", e)  # (S_e, I)
            h = m.act_fn(g) * u  # (S_e, I)
            y = m.down_proj(h.to(x.dtype)) + self._lora(h, "down", e)  # (S_e, H)
            out.index_add_(0, tok, y * w[tok, slot, None])
        return out.to(x.dtype)

    def _shared(self, x: torch.Tensor, top_i: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        m = self.base
        g_all = m.gate_proj(x)  # (S, I), once for all tokens
        u_all = m.up_proj(x)  # (S, I)
        acc_h = torch.zeros_like(g_all, dtype=torch.float32)  # Σ_e w_e h_e  (S, I)
        out = torch.zeros(x.shape[0], x.shape[1], device=x.device, dtype=torch.float32)  # Σ_e w_e ΔW_d,e h_e (S, H)
        wsum = w.sum(-1)  # (S,)
        for e in range(self.num_experts):
            tok, slot = (top_i == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            xe, we = x[tok], w[tok, slot, None]  # (S_e, H), (S_e, 1)
            g = g_all[tok] + self._lora(xe, "gate", e)  # (S_e, I)
            u = u_all[tok] + self._lora(xe, "up", e)  # (S_e, I)
            h = m.act_fn(g) * u  # (S_e, I)
            acc_h.index_add_(0, tok, h * we)  # in place: index_add's backward does not need acc_h
            out.index_add_(0, tok, self._lora(h, "down", e) * we)
        d = m.down_proj
        y = F.linear(acc_h.to(d.weight.dtype), d.weight)  # down(Σ w_e h_e), one pass  (S, H)
        if d.bias is not None:
            y = y + wsum[:, None].to(y.dtype) * d.bias
        return (out + y).to(x.dtype)


# -----------------------------------------------------------------------------
# load balance


def load_balance_loss(
    probs: torch.Tensor, topk: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformers loss N · Σ_i f_i · P_i over the (unmasked) tokens.

    probs (..., N) router probabilities; topk (..., k) chosen experts; mask (...) 1 for real tokens.
    f_i = (tokens routed to i) / (k · tokens), P_i = mean of probs[..., i]. Uniform routing gives 1.
    """
    probs = probs.reshape(-1, num_experts)  # (S, N)
    topk = topk.reshape(probs.shape[0], -1)  # (S, k)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        if keep.numel() != probs.shape[0]:
            raise LorahubValueError(
                f"attention mask has {keep.numel()} positions but the router saw {probs.shape[0]} tokens; "
                "pass the mask of the batch that was just run"
            )
        probs, topk = probs[keep], topk[keep]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    counts = F.one_hot(topk, num_experts).sum((0, 1)).to(probs.dtype)  # (N,) assignments per expert
    f = counts / topk.numel()  # (N,), Σ f = 1
    p = probs.mean(0)  # (N,)
    return num_experts * (f * p).sum()


def layers_balance_loss(layers: Iterable[MixLoraFFN], mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`load_balance_loss` of each layer's last forward, averaged over the layers (unscaled)."""
    losses = [load_balance_loss(m.router_probs, m.router_topk, m.num_experts, mask) for m in layers]
    return torch.stack(losses).mean()


def mixlora_layers(model: nn.Module) -> dict[str, MixLoraFFN]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MixLoraFFN)}


def mixlora_aux_loss(model: nn.Module, attention_mask: torch.Tensor | None = None, *, scaled: bool = True) -> torch.Tensor:
    """Load-balance loss of the last forward, averaged over MixLoRA layers, times the coefficient.

    Add it to the training loss. ``scaled=False`` leaves out ``router_aux_loss_coef``.
    """
    layers = list(mixlora_layers(model).values())
    if not layers:
        raise LorahubValueError(f"{type(model).__name__} has no MixLoRA layers; call attach_mixlora first")
    if any(m.router_probs is None for m in layers):
        raise LorahubValueError("no router statistics yet: run a forward pass before mixlora_aux_loss")
    loss = layers_balance_loss(layers, attention_mask)
    return loss * layers[0].aux_coef if scaled else loss


# -----------------------------------------------------------------------------
# wiring


def set_impl(model: nn.Module, impl: str) -> None:
    """Switch every MixLoRA layer of ``model`` to the ``shared`` or ``naive`` forward."""
    if impl not in IMPLS:
        raise LorahubValueError(f"`impl` should be one of {IMPLS} but the value passed is {impl!r}")
    for m in mixlora_layers(model).values():
        m.impl = impl


def attach_mixlora(model: nn.Module, config: MixLoraConfig) -> list[nn.Parameter]:
    """Freeze ``model``, replace each ``mlp`` by a :class:`MixLoraFFN` and put LoRA on the attention
    projections (``lorahub.train.MultiLoraLinear`` with one adapter); return the trainable parameters.

    Initialisation uses torch's global RNG (seed it first for a reproducible start).
    """
    if mixlora_layers(model):
        raise LorahubValueError(f"{type(model).__name__} already has MixLoRA layers attached")
    model.requires_grad_(False)
    mlps = [(p, m) for p, m in model.named_modules() if p.rsplit(".", 1)[-1] == "mlp"]
    if not mlps:
        raise LorahubValueError(f"{type(model).__name__} has no submodule named 'mlp'; MixLoRA needs a Llama-family model")
    for path, mlp in mlps:
        check_llama_ffn(mlp, path)
    for path, mlp in mlps:
        model.set_submodule(path, MixLoraFFN(mlp, config, path))
    if config.attn_targets:
        tcfg = TrainConfig(rank=config.r, alpha=config.alpha, dropout=config.dropout,
                           target_modules=list(config.attn_targets), seed=int(torch.randint(0, 2**31, ()).item()))
        layers = attach_adapters(model, ["mixlora"], tcfg)
        for layer in layers.values():  # keep the adapter on the base layer's device
            layer.to(layer.base.weight.device)
    params = [p for n, p in model.named_parameters() if is_adapter_param(n)]
    for p in params:
        p.requires_grad_(True)
    return params


def detach_mixlora(model: nn.Module) -> None:
    """Put the original FFN and attention layers back; ``model`` is the plain base model again."""
    wrapped = [(p, m) for p, m in model.named_modules() if isinstance(m, (MixLoraFFN, MultiLoraLinear))]
    for path, m in wrapped:
        model.set_submodule(path, m.base)


def is_adapter_param(name: str) -> bool:
    """True for the parameters MixLoRA trains and saves (``lora_*`` and the routers), by name."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith("lora_") or name.endswith("router.weight")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if is_adapter_param(n)}


# -----------------------------------------------------------------------------
# saving and loading


def save_mixlora(model: nn.Module, config: MixLoraConfig, folder: str | os.PathLike) -> Path:
    """Write ``mixlora_config.json`` and ``mixlora_model.safetensors`` (fp32) into ``folder`` atomically."""
    from safetensors.torch import save_file

    state = {n: t.float().cpu().contiguous() for n, t in adapter_state_dict(model).items()}
    if not state:
        raise LorahubValueError(f"{type(model).__name__} has no MixLoRA parameters to save; call attach_mixlora first")
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "lorahub": "mixlora"})
        atomic_write_json(tmp / CONFIG_FILE, {
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(tmp / WEIGHTS_FILE),
                        "shapes": {n: list(t.shape) for n, t in state.items()}},
        })
    return folder


def read_mixlora_config(folder: str | os.PathLike) -> tuple[MixLoraConfig, dict[str, Any]]:
    import json

    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise LorahubFileError(f"{path} not found: not a MixLoRA folder (save it with save_mixlora)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(MixLoraConfig)}
        unknown = set(meta["config"]) - known
        if unknown:
            raise LorahubValueError(f"{path}: unknown config fields {sorted(unknown)}")
        config = MixLoraConfig(**meta["config"])
        meta["weights"]["sha256"], meta["weights"]["shapes"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise LorahubIntegrityError(f"{path} is corrupted or not a MixLoRA config ({type(e).__name__}: {e})") from None
    return config, meta


def load_mixlora(base_model: nn.Module, folder: str | os.PathLike, *, expected: MixLoraConfig | None = None,
                 impl: str | None = None) -> MixLoraConfig:
    """Attach MixLoRA to ``base_model`` (in place) with the weights saved in ``folder``; return its config.

    ``expected``: raise if the saved config differs from it (e.g. another expert count).
    Every tensor's name and shape is checked against the model before anything is copied.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config, meta = read_mixlora_config(folder)
    if expected is not None:
        diff = {k: (v, getattr(config, k)) for k, v in expected.to_dict().items()
                if k != "impl" and getattr(config, k) != v}
        if diff:
            detail = ", ".join(f"{k}: expected {a!r}, checkpoint has {b!r}" for k, (a, b) in diff.items())
            raise LorahubValueError(f"{folder / CONFIG_FILE} does not match the expected MixLoRA config ({detail})")
    if impl is not None:
        config.impl = impl
    wpath = folder / WEIGHTS_FILE
    if not wpath.is_file():
        raise LorahubFileError(f"{wpath} not found")
    digest = sha256_file(wpath)
    if digest != meta["weights"]["sha256"]:
        raise LorahubIntegrityError(
            f"{wpath} is corrupted: sha256 {digest[:12]}… differs from {meta['weights']['sha256'][:12]}… "
            f"recorded in {CONFIG_FILE}"
        )
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise LorahubIntegrityError(f"{wpath} cannot be read as safetensors ({e})") from None
    n = config.num_experts
    for name, t in state.items():  # the checkpoint against its own config
        if ".mlp." in name and name.rsplit(".", 1)[-1].startswith(("lora_", "router")):
            got = t.shape[0]  # lora_* [N, ...] and router.weight [N, hidden]
            if got != n:
                raise LorahubValueError(
                    f"{wpath}: tensor {name!r} has {got} experts (shape {list(t.shape)}) but {CONFIG_FILE} "
                    f"says num_experts={n}"
                )
    attach_mixlora(base_model, config)
    params = dict(base_model.named_parameters())
    want = {k for k in params if is_adapter_param(k)}
    missing, extra = sorted(want - set(state)), sorted(set(state) - want)
    problems = [f"missing tensors {missing[:5]}" if missing else "", f"unexpected tensors {extra[:5]}" if extra else ""]
    problems += [f"tensor {k!r}: checkpoint shape {list(state[k].shape)}, model expects {list(params[k].shape)}"
                 for k in sorted(want & set(state)) if state[k].shape != params[k].shape]
    problems = [p for p in problems if p]
    if problems:
        detach_mixlora(base_model)  # leave the base model as it came
        raise LorahubValueError(
            f"{wpath} does not fit {type(base_model).__name__} with {CONFIG_FILE}: " + "; ".join(problems[:5])
            + ". Was it saved from another base model?"
        )
    with torch.no_grad():
        for k in want:
            params[k].copy_(state[k].to(params[k].device, params[k].dtype))
    return config


# -----------------------------------------------------------------------------
# prediction


def is_mixlora_folder(folder: str | os.PathLike) -> bool:
    """True for a folder written by :func:`save_mixlora` (it has ``mixlora_config.json``)."""
    return (Path(folder) / CONFIG_FILE).is_file()


@contextlib.contextmanager
def mixlora_attached(model: nn.Module, folder: str | os.PathLike, *, impl: str | None = None) -> Iterator[MixLoraConfig]:
    """``with mixlora_attached(model, folder) as config:`` the saved MixLoRA model runs inside the block
    (eval mode); afterwards ``model`` is the plain base again, in its previous train/eval mode."""
    was_training = model.training
    config = load_mixlora(model, folder, impl=impl)
    model.eval()
    try:
        yield config
    finally:
        detach_mixlora(model)
        model.train(was_training)


def predict_mixlora(model: nn.Module, tokenizer: Any, folder: str | os.PathLike, inputs: list[str] | str, *,
                    max_new_tokens: int = 32, batch_size: int = 16, progress: bool = False) -> list[str]:
    """Greedy answers (batched, left padding + attention mask, cut at the first newline) of a saved MixLoRA model.

    The experts stay unmerged (routing is per token); the base model is left as it came.
    """
    from .generate import generate

    if isinstance(inputs, str):
        inputs = [inputs]
    with mixlora_attached(model, folder):
        return generate(model, tokenizer, list(inputs), max_new_tokens=max_new_tokens, batch_size=batch_size,
                        progress=progress)


@dataclass
class MixLoraPredictor:
    """A saved MixLoRA model over a loaded base, with the ``predict`` surface of :class:`lorahub.api.Composition`."""

    model: Any
    tokenizer: Any
    folder: str

    def predict(self, inputs: list[str] | str, *, max_new_tokens: int = 32, batch_size: int = 16,
                progress: bool = False) -> list[str]:
        return predict_mixlora(self.model, self.tokenizer, self.folder, inputs, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, progress=progress)

    def merge(self) -> Any:
        raise LorahubValueError(f"{self.folder} {NOT_MERGEABLE}")
