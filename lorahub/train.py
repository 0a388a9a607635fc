"""Train LoRA (or MoSLoRA) modules, several tasks per step, and save them as plain PEFT adapters.

One readable loop (nanoGPT's ``train.py`` shape): :func:`train_modules` samples a batch of each task,
runs them through the frozen base in ONE forward pass where each task's rows go through that task's
own adapter, and takes one AdamW step for all adapters. The loss is on answer tokens only
(:func:`lorahub.data.encode`), per task: :func:`lorahub.evaluate.block_losses`, the evaluator's loss.

Why our own LoRA layers rather than PEFT's: PEFT holds many adapters per model, but its mixed batch
(``adapter_names=`` / ``_mixed_batch_forward``) is an inference path, and during training only the
active adapter gets gradients. :class:`MultiLoraLinear` keeps the adapters of M tasks stacked,
A as [M, r, in] and B as [M, out, r], and applies them to the M row blocks of the batch with one
``bmm`` (the multi-LoRA batching of MixLoRA / S-LoRA), so autograd gives every adapter the gradient
of its own task's loss. The total loss is the sum of the per-task mean losses, adapters share no
parameters, AdamW is element-wise and gradients are clipped per adapter, so a step over M tasks is
exactly M single-task steps done at once (``tests/test_train.py`` checks it).

MoSLoRA (``mixer=True``, Wu et al. 2024, arXiv 2406.11909) puts a learnable r x r mixer M between A
and B: ΔW = B·M·A·scaling. M is trained with A and B and folded at save time (A ← M·A), so the saved
module is a plain PEFT LoRA of the same rank and the composer never knows.

Modules are saved in PEFT's format: ``adapter_config.json`` (written by ``peft.LoraConfig``) and
fp16 ``adapter_model.safetensors`` with keys ``base_model.model.<layer>.lora_{A,B}.weight``;
``PeftModel.from_pretrained`` and :func:`lorahub.store.read_module` load them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .compose import delta_weights as layers_delta_weights
from .compose import peft_state_dict
from .data import Example, encode
from .errors import LorahubValueError
from .evaluate import block_losses
from .models import is_seq2seq
from .store import ADAPTER_CONFIG, LEGACY_WEIGHTS, SAFETENSORS_WEIGHTS

TRAIN_REPORT = "lorahub_train.json"  # config snapshot + quality report, saved beside the adapter


@dataclass
class TrainConfig:
    """How modules are trained.

    Args:
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by alpha / r.
        dropout: Dropout on the adapter's input (LoraHub: 0.1).
        target_modules: Names of the nn.Linear layers that get an adapter (Llama: q_proj, v_proj; T5: q, v).
        steps: Optimizer steps per module.
        lr: Peak AdamW learning rate (linear warm-up, then cosine decay to lr / 10).
        warmup_steps: Steps of linear warm-up.
        weight_decay: AdamW weight decay on the adapter weights.
        grad_clip: Clip each module's gradient norm to this (0 disables).
        batch_size: Examples of each task per step.
        modules_per_step: Tasks trained together, each with its own adapter, in one forward/backward.
        max_length: Tokens per example; longer prompts are cut from the left.
        mixer: Train MoSLoRA (a learnable r x r mixer between A and B), folded into A at save time.
        seed: Seed of initialisation, data order and dropout.
    """

    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the adapter input (LoraHub: 0.1)"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "names of the nn.Linear layers that get an adapter (Llama: q_proj,v_proj; T5: q,v)"},
    )
    steps: int = field(default=50, metadata={"help": "optimizer steps per module"})
    lr: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate (warm-up, then cosine to lr/10)"})
    warmup_steps: int = field(default=5, metadata={"help": "steps of linear learning-rate warm-up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on adapter weights"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip each module's gradient norm to this; 0 disables"})
    batch_size: int = field(default=8, metadata={"help": "examples of each task per step"})
    modules_per_step: int = field(default=1, metadata={"help": "tasks trained together, one adapter per task, per step"})
    max_length: int = field(default=256, metadata={"help": "tokens per example; longer prompts are cut from the left"})
    mixer: bool = field(default=False, metadata={"help": "MoSLoRA: learnable r x r mixer between A and B, folded at save"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and dropout"})

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        for name in ("rank", "steps", "batch_size", "modules_per_step", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise LorahubValueError(f"`{name}` should be a positive integer value but the value passed is {value!r}")
        if self.alpha <= 0:
            raise LorahubValueError(f"`alpha` should be positive but the value passed is {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise LorahubValueError(f"`dropout` should be in [0, 1) but the value passed is {self.dropout}")
        if not self.lr > 0:
            raise LorahubValueError(f"`lr` should be positive but the value passed is {self.lr}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise LorahubValueError("`warmup_steps`, `grad_clip` and `weight_decay` should be >= 0")
        if not self.target_modules:
            raise LorahubValueError("`target_modules` is empty; name at least one layer, e.g. q_proj,v_proj")
        if self.max_length < 16:
            raise LorahubValueError(f"`max_length`={self.max_length} leaves no room for a prompt; use >= 16")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -----------------------------------------------------------------------------
# per-layer math


class MultiLoraLinear(nn.Module):
    """A frozen nn.Linear plus M stacked adapters, applied to M equal row blocks of the batch.

    Row block m of the input (rows ``m*b .. (m+1)*b``) goes through adapter m:
    ``y = x W^T + scaling * dropout(x) A_m^T [M_m^T] B_m^T``, i.e. ΔW_m = B_m·M_m·A_m·scaling.
    """

    def __init__(self, base: nn.Linear, n: int, config: TrainConfig):
        super().__init__()
        self.base = base
        r = config.rank
        self.lora_A = nn.Parameter(torch.zeros(n, r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(n, base.out_features, r, device=base.weight.device))
        self.lora_M = nn.Parameter(torch.zeros(n, r, r, device=base.weight.device)) if config.mixer else None
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        n = self.lora_A.shape[0]
        shape = x.shape  # (N, T, in) with N = n * b
        if shape[0] % n:
            raise LorahubValueError(f"batch of {shape[0]} rows does not split into {n} equal adapter blocks")
        h = self.dropout(x).to(self.lora_A.dtype).reshape(n, -1, shape[-1])  # (n, b*T, in); fp32 adapters on a bf16 base
        h = torch.bmm(h, self.lora_A.transpose(1, 2))  # (n, b*T, r)
        if self.lora_M is not None:
            h = torch.bmm(h, self.lora_M.transpose(1, 2))  # (n, b*T, r)
        h = torch.bmm(h, self.lora_B.transpose(1, 2))  # (n, b*T, out)
        return y + h.reshape(*shape[:-1], -1).to(y.dtype) * self.scaling

    def folded(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter i as plain LoRA (A [r, in], B [out, r]) with the mixer folded in: A ← M·A."""
        a, b = self.lora_A[i].detach(), self.lora_B[i].detach()
        if self.lora_M is not None:
            a = self.lora_M[i].detach() @ a  # (r, r) @ (r, in)
        return a.clone(), b.clone()


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from names (hashlib, not ``hash``): the same in every process, whatever else is trained."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") % (2**63)


def _uniform_(t: torch.Tensor, bound: float, gen: torch.Generator) -> None:
    t.copy_((torch.rand(t.shape, generator=gen) * 2 - 1).mul_(bound).to(t.device, t.dtype))


def attach_adapters(model: nn.Module, names: Sequence[str], config: TrainConfig) -> dict[str, MultiLoraLinear]:
    """Wrap every target nn.Linear of ``model`` in a :class:`MultiLoraLinear` holding len(names) adapters.

    Adapter i is initialised from a generator seeded by (config.seed, names[i]) only, so a task gets
    the same start whichever tasks share its step: A and M Kaiming-uniform (PEFT's a=sqrt(5), i.e.
    U(±1/sqrt(fan_in))), B zero.
    """
    targets = [
        (path, mod) for path, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and path.rsplit(".", 1)[-1] in config.target_modules
    ]
    if not targets:
        found = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise LorahubValueError(
            f"target_modules {config.target_modules} match no nn.Linear layer of {type(model).__name__}; "
            f"its linear layers are named {found[:12]}"
        )
    layers: dict[str, MultiLoraLinear] = {}
    for path, mod in targets:
        layer = MultiLoraLinear(mod, len(names), config)
        model.set_submodule(path, layer)
        layers[path] = layer
    with torch.no_grad():
        for i, name in enumerate(names):
            gen = torch.Generator().manual_seed(stable_seed(config.seed, name, "init"))
            for layer in layers.values():  # fixed layer order: model order
                _uniform_(layer.lora_A[i], 1 / math.sqrt(layer.lora_A.shape[-1]), gen)
                if layer.lora_M is not None:
                    _uniform_(layer.lora_M[i], 1 / math.sqrt(config.rank), gen)
    return layers


def detach_adapters(model: nn.Module, layers: Mapping[str, MultiLoraLinear]) -> None:
    """Put the original nn.Linear layers back; ``model`` is the plain base model again."""
    for path, layer in layers.items():
        model.set_submodule(path, layer.base)


@contextlib.contextmanager
def adapters_disabled(layers: Mapping[str, MultiLoraLinear]) -> Iterator[None]:
    for layer in layers.values():
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers.values():
            layer.enabled = True


def get_lr(step: int, config: TrainConfig) -> float:
    """nanoGPT's schedule: 1) linear warm-up, 2) cosine decay to lr/10 at the last step."""
    if step < config.warmup_steps:  # 1) warm-up
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    span = max(1, config.steps - config.warmup_steps)
    ratio = min(1.0, (step - config.warmup_steps) / span)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 2) cosine, 1 -> 0
    return config.lr / 10 + coeff * (config.lr - config.lr / 10)


class EpochSampler:
    """Endless seeded epochs over one task's examples; the stream depends only on (seed, task)."""

    def __init__(self, examples: Sequence[Example], seed: int, name: str):
        self.examples, self.rng, self.order = list(examples), random.Random(stable_seed(seed, name, "data")), []

    def take(self, k: int) -> list[Example]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(len(self.examples)))
                self.rng.shuffle(self.order)
            out.append(self.examples[self.order.pop()])
        return out


# -----------------------------------------------------------------------------
# the loop


@dataclass
class TrainedModule:
    """One trained module: plain-LoRA layers (mixer folded), fp32 on CPU, and its training record."""

    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer path -> (A [r, in], B [out, r])
    losses: list[float]
    seconds: float  # wall time of the group it was trained in, divided by the group's size

    @property
    def train_loss(self) -> float:
        """Mean loss over the last 10% of steps (at least 1)."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return float(sum(tail) / len(tail))


def train_modules(
    model: nn.Module,
    tokenizer: Any,
    tasks: Mapping[str, Sequence[Example]],
    config: TrainConfig,
    *,
    progress: bool = True,
    log: Any = None,
) -> dict[str, TrainedModule]:
    """Train one adapter per task, all tasks together (one row block each per step); return them.

    ``model`` is left as it came (adapters detached). ``log``, if given, is called with a dict per step.
    """
    names = list(tasks)
    if not names:
        raise LorahubValueError("train_modules: no tasks given")
    for name, exs in tasks.items():
        if not exs:
            raise LorahubValueError(f"task {name!r} has no training examples")
    seq2seq = is_seq2seq(model)
    device = next(model.parameters()).device
    n = len(names)
    torch.manual_seed(stable_seed(config.seed, *names, "dropout"))
    model.requires_grad_(False)
    layers = attach_adapters(model, names, config)
    params = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B, layer.lora_M) if p is not None]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999))
    samplers = [EpochSampler(tasks[nm], config.seed, nm) for nm in names]
    losses: list[list[float]] = [[] for _ in names]
    was_training = model.training
    model.train()
    t0 = time.time()
    bar = None
    if progress:
        from .progress import progress_bar

        bar = progress_bar(config.steps, f"train {names[0]}" + (f" +{n - 1}" if n > 1 else ""), unit="step")
    try:
        for step in range(config.steps):
            lr = get_lr(step, config)
            for g in opt.param_groups:
                g["lr"] = lr
            rows = [ex for s in samplers for ex in s.take(config.batch_size)]  # block m = task m
            batch = encode(tokenizer, rows, seq2seq=seq2seq, max_length=config.max_length).to(device)
            per_task = block_losses(model, batch, n, seq2seq)  # (n,)
            loss = per_task.sum()  # adapters share nothing: d(sum)/d(adapter m) = d(loss_m)/d(adapter m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:  # clip each module on its own, as if trained alone
                sq = sum(p.grad.detach().pow(2).flatten(1).sum(1) for p in params)  # (n,)
                coef = (config.grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
                for p in params:
                    p.grad.mul_(coef.view(-1, *([1] * (p.dim() - 1))))
            opt.step()
            for i, v in enumerate(per_task.detach().tolist()):
                losses[i].append(v)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sum(l[-1] for l in losses) / n:.3f}", lr=f"{lr:.1e}")
            if log is not None:
                log({"step": step, "lr": lr, "losses": dict(zip(names, per_task.detach().tolist()))})
        seconds = (time.time() - t0) / n
        return {
            nm: TrainedModule(nm, {p: layer.folded(i) for p, layer in layers.items()}, losses[i], seconds)
            for i, nm in enumerate(names)
        }
    finally:
        if bar is not None:
            bar.close()
        detach_adapters(model, layers)
        model.train(was_training)


# -----------------------------------------------------------------------------
# saving


SAVE_DTYPE = torch.float16  # modules are saved in fp16


def delta_weights(module: TrainedModule, config: TrainConfig) -> dict[str, torch.Tensor]:
    """ΔW = B·A·scaling per layer, from the fp16-rounded tensors that :func:`save_module` writes."""
    return layers_delta_weights(module.layers, config.scaling, dtype=SAVE_DTYPE)


def peft_config_dict(config: TrainConfig, base_model_name: str, seq2seq: bool) -> dict[str, Any]:
    """The module's full PEFT LoraConfig dict, as ``LoraConfig.save_pretrained`` writes it."""
    from .export import lora_config, task_type

    fields = {"r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
              "target_modules": list(config.target_modules)}
    return lora_config(fields, complete=True, task_type=task_type(seq2seq), base_model_name_or_path=base_model_name)


def save_module(
    folder: str | os.PathLike,
    module: TrainedModule,
    config: TrainConfig,
    *,
    base_model_name: str,
    seq2seq: bool,
    report: Mapping[str, Any] | None = None,
    legacy_bin: bool = False,
) -> Path:
    """Write ``folder`` as a PEFT LoRA adapter (fp16) plus ``lorahub_train.json``; return the weights file.

    ``legacy_bin=True`` writes ``adapter_model.bin`` (``torch.save`` of the state dict) instead of
    safetensors, as old PEFT versions did.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = peft_state_dict(module.layers, dtype=SAVE_DTYPE, device="cpu")
    (folder / ADAPTER_CONFIG).write_text(
        json.dumps(peft_config_dict(config, base_model_name, seq2seq), indent=2) + "\n", encoding="utf-8"
    )
    if legacy_bin:
        weights = folder / LEGACY_WEIGHTS
        torch.save(state, weights)
    else:
        from safetensors.torch import save_file

        weights = folder / SAFETENSORS_WEIGHTS
        save_file(state, str(weights), metadata={"format": "pt"})
    snapshot = {"task": module.name, "config": config.to_dict(), "base_model": base_model_name,
                "losses": [round(v, 5) for v in module.losses], **(report or {})}
    (folder / TRAIN_REPORT).write_text(json.dumps(snapshot, indent=2) + "\n", encoding="utf-8")
    return weights
