"""Train MixLoRA (and a parameter-matched plain LoRA beside it) on a mixture of tasks; resumable.

One loop in nanoGPT's shape (:func:`train_mixlora`). What is particular:

- Task-mixed batches. Each row of a step's batch draws a task uniformly at random (a seeded
  ``random.Random``), then takes that task's next example from endless seeded epochs
  (:class:`lorahub.train.EpochSampler`). The loss is on answer tokens only, with the LM head run at the
  answer positions only (:func:`lorahub.evaluate.block_losses`, the evaluator's loss).
- Several models, one frozen base, one batch (MixLoRA's multi-model batching, the row-block idea of
  :class:`lorahub.train.MultiLoraLinear`). With M models the batch is the step's examples repeated M
  times; row block m goes through model m only (:class:`RowBlocks` puts M branches over each frozen
  layer). Models share no parameters, each has its own loss (cross-entropy + its load-balance loss times
  its coefficient), gradients are clipped per model and AdamW is element-wise, so training M models
  together is exactly training each alone on the same data (``tests/test_mixlora_train.py``).
- A plain LoRA is a MixLoRA config with ``num_experts=1, top_k=1``: Switch routing over one expert gives
  weight softmax(x)=1, the load-balance loss is the constant 1 (its coefficient is set to 0), so it is
  LoRA on gate/up/down plus the attention LoRA, through the same code path and saved in the same format.
  Its rank is by default the one whose trainable parameter count is closest to the MixLoRA model's
  (:func:`matched_lora_rank`).
- Resumable: ``OUT/checkpoint/`` (adapter weights, AdamW state, step, torch/python RNG states, sampler
  state, expert usage, losses) is written atomically every ``save_every`` steps and at the end; a rerun
  with the same ``OUT`` and the same settings resumes from it, other settings are refused
  (``OUT/train_config.json``), and a finished run is not trained again.

Output folder::

    OUT/train_config.json        what the run trains (models, tasks and their data hashes, optimisation)
    OUT/train_log.jsonl          one line per step (losses, load balance, lr, tokens, rows per task)
    OUT/checkpoint/              the resume point
    OUT/<method>/                save_mixlora's folder (load it with lorahub.mixlora.load_mixlora)
    OUT/<method>/expert_usage.json  {FFN layer: [token assignments per expert]} over the whole training
    OUT/quality.json, quality.md held-out exact match per task: base and each model (:func:`evaluate_models`)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .files import append_line, atomic_dir, atomic_write_json, atomic_write_text, locked_output, read_json, sha256_file
from .bigbench import list_tasks, read_task, split_examples
from .data import Example, encode
from .errors import LorahubIntegrityError, LorahubValueError
from .tables import markdown_table, text_table
from .evaluate import block_losses
from .mixlora import (
    CONFIG_FILE, MixLoraConfig, MixLoraFFN, attach_mixlora, check_llama_ffn, detach_mixlora, is_adapter_param,
    layers_balance_loss, save_mixlora,
)
from .train import EpochSampler, MultiLoraLinear, get_lr, stable_seed

METHODS = ("mixlora", "lora")
RUN_CONFIG = "train_config.json"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINT = "checkpoint"
USAGE_FILE = "expert_usage.json"
QUALITY_JSON, QUALITY_MD = "quality.json", "quality.md"


@dataclass
class MixTrainConfig:
    """What ``lorahub train`` trains and how.

    Args:
        methods: Models trained together in every step: ``mixlora`` and/or ``lora``.
        num_experts, top_k, rank, alpha: The MixLoRA model (see :class:`lorahub.mixlora.MixLoraConfig`).
        lora_rank: Rank of the ``lora`` model; None: the rank closest in trainable parameters to MixLoRA.
        lora_alpha: Alpha of the ``lora`` model; None: keep MixLoRA's scaling alpha / rank.
        dropout: Dropout on every LoRA input.
        router_aux_loss_coef: Load-balance loss coefficient of the MixLoRA model.
        attn_targets: Attention projections that get a plain LoRA, in every model.
        steps, lr, warmup_steps, weight_decay, grad_clip: AdamW with lorahub.train.get_lr's schedule.
        batch_size: Examples per step (task-mixed); every model sees the same ones.
        max_length: Tokens per example; longer prompts are cut from the left.
        seed: Seed of initialisation, data order and dropout.
        impl: MixLoRA FFN forward, ``shared`` or ``naive`` (same results; not part of the resume check).
    """

    methods: list[str] = field(default_factory=lambda: ["mixlora"], metadata={
        "help": f"models trained together, one row block each: {' and/or '.join(METHODS)}"})
    num_experts: int = field(default=8, metadata={"help": "MixLoRA experts per FFN"})
    top_k: int = field(default=2, metadata={"help": "experts per token"})
    rank: int = field(default=8, metadata={"help": "MixLoRA LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "MixLoRA LoRA alpha"})
    lora_rank: int | None = field(default=None, metadata={
        "help": "rank of the lora model, or auto: the rank closest to MixLoRA in trainable parameters (default: auto)"})
    lora_alpha: float | None = field(default=None, metadata={
        "help": "alpha of the lora model (default: MixLoRA's alpha/rank times the lora rank)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on LoRA inputs"})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "MixLoRA load-balance loss coefficient"})
    attn_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], metadata={
        "help": "attention projections with a plain LoRA in every model"})
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate, warm-up then cosine to lr/10"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip each model's gradient norm to this; 0 disables"})
    batch_size: int = field(default=8, metadata={
        "help": "examples per step, each row from a task drawn uniformly; every model sees the same"})
    max_length: int = field(default=256, metadata={"help": "tokens per example; longer prompts are cut from the left"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, split, data order and dropout"})
    impl: str = field(default="shared", metadata={"help": "MixLoRA FFN forward: shared (fast) or naive (reference)"})

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        self.methods = list(self.methods)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods or len(set(self.methods)) != len(self.methods):
            raise LorahubValueError(
                f"`methods` should be distinct names among {METHODS}, but the value passed is {self.methods!r}"
            )
        if isinstance(self.attn_targets, str):
            self.attn_targets = [t.strip() for t in self.attn_targets.split(",") if t.strip()]
        for name in ("steps", "batch_size", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LorahubValueError(f"`{name}` should be a positive integer but the value passed is {value!r}")
        if self.lora_rank is not None and (not isinstance(self.lora_rank, int) or self.lora_rank < 1):
            raise LorahubValueError(f"`lora_rank` should be a positive integer or None (auto), got {self.lora_rank!r}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise LorahubValueError(f"`lora_alpha` should be positive, got {self.lora_alpha!r}")
        if not self.lr > 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise LorahubValueError("`lr` should be > 0 and `warmup_steps`, `weight_decay`, `grad_clip` >= 0")
        if self.max_length < 16:
            raise LorahubValueError(f"`max_length`={self.max_length} leaves no room for a prompt; use >= 16")
        self.mixlora_config()  # num_experts, top_k, rank, alpha, dropout: checked by MixLoraConfig

    def mixlora_config(self) -> MixLoraConfig:
        return MixLoraConfig(
            num_experts=self.num_experts, top_k=self.top_k, r=self.rank, alpha=self.alpha, dropout=self.dropout,
            router_aux_loss_coef=self.router_aux_loss_coef, attn_targets=list(self.attn_targets), impl=self.impl,
        )

    def lora_config(self, rank: int) -> MixLoraConfig:
        """Plain LoRA as a one-expert MixLoRA (weight 1 on the single expert; its aux loss is constant)."""
        alpha = self.lora_alpha if self.lora_alpha is not None else self.alpha / self.rank * rank
        return MixLoraConfig(num_experts=1, top_k=1, r=rank, alpha=alpha, dropout=self.dropout,
                             router_aux_loss_coef=0.0, attn_targets=list(self.attn_targets), impl=self.impl)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -----------------------------------------------------------------------------
# parameter counts


def trainable_params(config: MixLoraConfig, model: nn.Module) -> int:
    """Parameters :func:`lorahub.mixlora.attach_mixlora` would train on ``model`` (counted from shapes).

    Per FFN: router N·hidden + N·r·(hidden+inter) for each of gate, up and down; per attention target:
    r·(in+out). A one-expert model's router (hidden weights that get no gradient) is counted too.
    """
    n, r, total = config.num_experts, config.r, 0
    for path, mod in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if leaf == "mlp":
            check_llama_ffn(mod, path)
            hidden, inter = mod.gate_proj.in_features, mod.gate_proj.out_features
            total += n * hidden + 3 * n * r * (hidden + inter)
        elif isinstance(mod, nn.Linear) and leaf in config.attn_targets:
            total += r * (mod.in_features + mod.out_features)
    return total


def matched_lora_rank(config: MixTrainConfig, model: nn.Module) -> int:
    """The plain-LoRA rank whose trainable parameter count is closest to the MixLoRA model's."""
    target = trainable_params(config.mixlora_config(), model)
    one = trainable_params(config.lora_config(1), model)
    per_rank = trainable_params(config.lora_config(2), model) - one
    fixed = one - per_rank  # the one-expert router, whatever the rank
    lo = max(1, (target - fixed) // per_rank)
    return min((lo, lo + 1), key=lambda r: (abs(fixed + r * per_rank - target), r))


def model_configs(config: MixTrainConfig, model: nn.Module) -> dict[str, MixLoraConfig]:
    """method -> its MixLoraConfig, the ``lora`` rank resolved."""
    out: dict[str, MixLoraConfig] = {}
    for m in config.methods:
        if m == "mixlora":
            out[m] = config.mixlora_config()
        else:
            out[m] = config.lora_config(config.lora_rank or matched_lora_rank(config, model))
    return out


# -----------------------------------------------------------------------------
# data


def load_tasks(
    tasks_dir: str | Path, names: Sequence[str] | None = None, *, heldout: int = 50, seed: int = 0
) -> dict[str, tuple[list[Example], list[Example]]]:
    """task -> (train, held-out) examples, split as ``lorahub hub build`` splits them.

    ``tasks_dir``: a BIG-bench pool (index.json + tasks/*.jsonl) or a folder of plain ``<task>.jsonl``
    files (``input``/``output``); ``names``: the tasks to take (None: every task of the folder).
    """
    index = list_tasks(tasks_dir)
    if names is None:
        names = list(index)
    names = list(dict.fromkeys(names))
    unknown = [t for t in names if t not in index]
    if unknown:
        avail = ", ".join(list(index)[:10]) + (" ..." if len(index) > 10 else "")
        raise LorahubValueError(f"unknown task(s) {unknown[:5]} in {tasks_dir}. Available: {avail or '(none)'}")
    if not names:
        raise LorahubValueError(f"no tasks in {tasks_dir}: give a BIG-bench pool or a folder of <task>.jsonl files")
    out = {}
    for name in names:
        examples = read_task(tasks_dir, name, index[name]).examples
        try:
            out[name] = split_examples(examples, seed=seed, heldout=heldout)
        except LorahubValueError as e:
            raise LorahubValueError(f"task {name!r} ({tasks_dir}): {e}") from None
    return out


class TaskMixer:
    """Task-mixed rows: each row draws a task uniformly (seeded), then takes that task's next example."""

    def __init__(self, tasks: Mapping[str, Sequence[Example]], seed: int):
        self.names = list(tasks)
        self.rng = random.Random(stable_seed(seed, "task-mix"))
        self.samplers = {n: EpochSampler(tasks[n], seed, n) for n in self.names}

    def take(self, k: int) -> list[tuple[str, Example]]:
        picks = [self.names[self.rng.randrange(len(self.names))] for _ in range(k)]
        return [(t, self.samplers[t].take(1)[0]) for t in picks]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(),
                "samplers": {n: {"rng": s.rng.getstate(), "order": list(s.order)} for n, s in self.samplers.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rng.setstate(_as_rng_state(state["rng"]))
        for n, s in self.samplers.items():
            s.rng.setstate(_as_rng_state(state["samplers"][n]["rng"]))
            s.order = list(state["samplers"][n]["order"])


def _as_rng_state(state: Any) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


# -----------------------------------------------------------------------------
# several models over one frozen base


class RowBlocks(nn.Module):
    """M branches over one frozen layer: row block m of the batch (M equal blocks) goes through branch m."""

    def __init__(self, branches: Sequence[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = len(self.branches)
        if x.shape[0] % m:
            raise LorahubValueError(f"batch of {x.shape[0]} rows does not split into {m} equal model blocks")
        return torch.cat([b(part) for b, part in zip(self.branches, x.chunk(m, dim=0))], dim=0)


@dataclass
class Attached:
    """M MixLoRA models wired into one base: each model's own layers, named as a lone model names them."""

    configs: dict[str, MixLoraConfig]
    views: dict[str, dict[str, nn.Module]]  # method -> {layer path: its MixLoraFFN / MultiLoraLinear}
    originals: dict[str, nn.Module]  # layer path -> the frozen layer it wraps
    params: dict[str, dict[str, nn.Parameter]]  # method -> {name as in save_mixlora: parameter}

    def ffns(self, method: str) -> dict[str, MixLoraFFN]:
        return {p: m for p, m in self.views[method].items() if isinstance(m, MixLoraFFN)}


def attach_models(model: nn.Module, configs: Mapping[str, MixLoraConfig], seed: int) -> Attached:
    """Attach one MixLoRA model per config to ``model``; with M > 1, row block m runs model m.

    Model m is built by :func:`lorahub.mixlora.attach_mixlora` under a torch seed that depends on
    (seed, its name) only, so it starts the same whichever models train beside it. One model keeps
    attach_mixlora's structure exactly; M > 1 put a :class:`RowBlocks` at every wrapped layer.
    """
    views: dict[str, dict[str, nn.Module]] = {}
    originals: dict[str, nn.Module] = {}
    params: dict[str, dict[str, nn.Parameter]] = {}
    for name, cfg in configs.items():
        torch.manual_seed(stable_seed(seed, name, "init"))
        attach_mixlora(model, cfg)
        params[name] = {n: p for n, p in model.named_parameters() if is_adapter_param(n)}
        views[name] = {p: m for p, m in model.named_modules() if isinstance(m, (MixLoraFFN, MultiLoraLinear))}
        originals.update({p: m.base for p, m in views[name].items()})
        detach_mixlora(model)
    for path, base in originals.items():
        branches = [views[n].get(path, base) for n in configs]
        model.set_submodule(path, branches[0] if len(branches) == 1 else RowBlocks(branches))
    return Attached(dict(configs), views, originals, params)


def detach_models(model: nn.Module, attached: Attached) -> None:
    """Put the frozen layers back; ``model`` is the plain base model again."""
    for path, base in attached.originals.items():
        model.set_submodule(path, base)


@contextlib.contextmanager
def model_view(model: nn.Module, attached: Attached, method: str) -> Iterator[nn.Module]:
    """Inside the block ``model`` is exactly what attach_mixlora gives for ``method`` alone (e.g. to save it)."""
    current = {p: model.get_submodule(p) for p in attached.originals}
    try:
        for path, base in attached.originals.items():
            model.set_submodule(path, attached.views[method].get(path, base))
        yield model
    finally:
        for path, mod in current.items():
            model.set_submodule(path, mod)


# -----------------------------------------------------------------------------
# the run: config check, checkpoints


def _data_hash(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input, e.output]).encode())
    return h.hexdigest()[:16]


def run_fingerprint(config: MixTrainConfig, configs: Mapping[str, MixLoraConfig],
                    tasks: Mapping[str, Sequence[Example]], base_model: str) -> dict[str, Any]:
    """Everything that decides the trained weights (not save_every, eval settings or impl)."""
    train = {k: v for k, v in config.to_dict().items() if k != "impl"}
    return {
        "base_model": base_model, "train": train,
        "models": {m: {k: v for k, v in c.to_dict().items() if k != "impl"} for m, c in configs.items()},
        "tasks": {t: {"train_examples": len(exs), "sha256": _data_hash(exs)} for t, exs in tasks.items()},
    }


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_run_config(out: Path, fingerprint: dict[str, Any]) -> None:
    """Write ``OUT/train_config.json``, or raise if it holds another run's settings."""
    path = out / RUN_CONFIG
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LorahubIntegrityError(f"{path} is corrupted ({e.msg} at line {e.lineno}); use another --out") from None
        if saved != json.loads(json.dumps(fingerprint)):
            a, b = _flat(saved), _flat(json.loads(json.dumps(fingerprint)))
            diff = [f"{k}: {a.get(k, '(absent)')!r} there, {b.get(k, '(absent)')!r} now"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            raise LorahubValueError(
                f"{out} holds a run with other settings ({'; '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}). "
                "Use another --out, or the same settings to resume that run."
            )
        return
    atomic_write_json(path, fingerprint)


def _checkpoint_step(out: Path) -> int | None:
    path = out / CHECKPOINT / "checkpoint.json"
    return read_json(path, "training checkpoint")["step"] if path.is_file() else None


def read_checkpoint(out: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The saved training state, checked against its sha256 and this run's settings (None: no checkpoint)."""
    folder = out / CHECKPOINT
    if not (folder / "checkpoint.json").is_file():
        return None
    meta = read_json(folder / "checkpoint.json", "training checkpoint")
    state_file = folder / "state.pt"
    if not state_file.is_file() or sha256_file(state_file) != meta["sha256"]:
        raise LorahubIntegrityError(f"{state_file} is missing or corrupted (sha256 differs from checkpoint.json); "
                                    f"delete {folder} to restart the run from scratch")
    if meta["config"] != json.loads(json.dumps(fingerprint)):
        raise LorahubValueError(f"{folder} was written by a run with other settings; use another --out")
    try:
        return torch.load(state_file, map_location="cpu", weights_only=True)  # tensors and plain containers only
    except Exception as e:  # noqa: BLE001  # a pickled object, or a damaged file: never unpickled
        raise LorahubIntegrityError(f"refused: {state_file} cannot be read as plain tensors ({type(e).__name__}); "
                                    f"lorahub never unpickles Python objects. Delete {folder} to restart the run") from None


def write_checkpoint(out: Path, state: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    with atomic_dir(out / CHECKPOINT) as tmp:
        torch.save(state, tmp / "state.pt")
        atomic_write_json(tmp / "checkpoint.json",
                          {"step": state["step"], "sha256": sha256_file(tmp / "state.pt"), "config": fingerprint})


def _is_finished(out: Path, methods: Sequence[str], steps: int) -> bool:
    return _checkpoint_step(out) == steps and all(
        (out / m / CONFIG_FILE).is_file() and (out / m / USAGE_FILE).is_file() for m in methods)


def _keep_log(out: Path, before_step: int) -> None:
    """Drop log lines of steps that the resumed run will do again (done after the last checkpoint)."""
    path = out / TRAIN_LOG
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    whole = text.splitlines()[: text.count("\n")]  # a line cut by a kill has no newline: dropped
    lines = [ln for ln in whole if ln.strip() and json.loads(ln).get("step", -1) < before_step]
    atomic_write_text(path, "".join(ln + "\n" for ln in lines))


# -----------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    """What a run left in ``out``: the models' configs, parameter counts, losses and expert usage."""

    out: Path
    configs: dict[str, MixLoraConfig]
    params: dict[str, int]
    losses: dict[str, list[float]]  # method -> cross-entropy per step, all steps of the run
    usage: dict[str, dict[str, list[int]]]  # method -> {FFN layer: token assignments per expert}
    resumed_from: int  # step the checkpoint held when this call started (0: fresh)
    steps_run: int  # steps trained by this call (0: the run was already finished)

    def folder(self, method: str) -> Path:
        return self.out / method


@locked_output("out")
def train_mixlora(
    model: nn.Module,
    tokenizer: Any,
    tasks: Mapping[str, Sequence[Example]],
    config: MixTrainConfig,
    out: str | Path,
    *,
    save_every: int = 20,
    base_model: str | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train every model of ``config.methods`` together on task-mixed batches of ``tasks`` (train examples);
    save each to ``out/<method>/``. Resumes from ``out/checkpoint/``; ``model`` is left as it came. The call
    holds ``out``'s lock (:func:`lorahub.files.output_lock`): a second run into ``out`` is refused.

    ``on_step(steps_done)`` is called after each step (after its checkpoint, if one is due).
    """
    if getattr(model.config, "is_encoder_decoder", False):
        raise LorahubValueError("MixLoRA training needs a Llama-family causal LM, not an encoder-decoder model")
    bad = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if bad:
        raise LorahubValueError(f"MixLoRA training needs an fp32 base model, got {', '.join(bad)} weights "
                                "(the adapter layers are fp32); load it with dtype=torch.float32")
    if save_every < 0:
        raise LorahubValueError(f"save_every should be >= 0 (0: only at the end), got {save_every}")
    for name, exs in tasks.items():
        if not exs:
            raise LorahubValueError(f"task {name!r} has no training examples")
    if not tasks:
        raise LorahubValueError("train_mixlora: no tasks given")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(config.methods)
    configs = model_configs(config, model)
    params_count = {m: trainable_params(c, model) for m, c in configs.items()}
    base_name = base_model or getattr(model, "lorahub_base_name", None) or model.config.name_or_path
    fingerprint = run_fingerprint(config, configs, tasks, base_name)
    check_run_config(out, fingerprint)
    ckpt = read_checkpoint(out, fingerprint)
    if ckpt is not None and _is_finished(out, methods, config.steps):
        return TrainResult(out, configs, params_count, ckpt["losses"], _usage_lists(ckpt["usage"]), config.steps, 0)

    device = next(model.parameters()).device
    was_training = model.training
    attached = attach_models(model, configs, config.seed)
    try:
        groups = [list(attached.params[m].values()) for m in methods]
        opt = torch.optim.AdamW([{"params": g} for g in groups], lr=config.lr,
                                weight_decay=config.weight_decay, betas=(0.9, 0.999))
        mixer = TaskMixer(tasks, config.seed)
        usage = {m: {p: torch.zeros(c.num_experts, dtype=torch.long) for p in attached.ffns(m)}
                 for m, c in configs.items()}
        losses: dict[str, list[float]] = {m: [] for m in methods}
        torch.manual_seed(stable_seed(config.seed, "dropout"))
        start = 0
        if ckpt is not None:
            start = _restore(ckpt, attached, opt, mixer, usage, losses)
        _keep_log(out, start)

        def state(step: int) -> dict[str, Any]:
            return {
                "step": step, "adapters": {m: {n: p.detach().cpu().clone() for n, p in attached.params[m].items()}
                                           for m in methods},
                "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python_rng": random.getstate(), "sampler": mixer.state_dict(),
                "usage": {m: dict(u) for m, u in usage.items()}, "losses": losses,
            }

        model.train()
        bar = None
        if progress and start < config.steps:
            from .progress import progress_bar

            bar = progress_bar(config.steps, "train " + "+".join(methods), initial=start, unit="step")
        t0 = time.time()
        try:
            for step in range(start, config.steps):
                lr = get_lr(step, config)  # type: ignore[arg-type]  # reads lr, warmup_steps, steps
                for g in opt.param_groups:
                    g["lr"] = lr
                picks = mixer.take(config.batch_size)
                batch = encode(tokenizer, [ex for _, ex in picks], seq2seq=False, max_length=config.max_length)
                mask = batch.attention_mask  # (B, T), the same for every model's block
                ce = block_losses(model, batch.repeat(len(methods)).to(device), len(methods), False)  # (M,)
                # each model's load-balance loss, over its own block's routing
                balance = [layers_balance_loss(attached.ffns(m).values(), mask.to(device)) for m in methods]
                aux = torch.stack([lb * configs[m].router_aux_loss_coef for m, lb in zip(methods, balance)])
                loss = (ce + aux).sum()  # models share nothing: d(sum)/d(model m) = d(loss_m)/d(model m)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    for g in groups:  # each model clipped on its own, as if trained alone
                        torch.nn.utils.clip_grad_norm_(g, config.grad_clip)
                opt.step()
                keep = mask.bool()
                for m in methods:
                    for p, f in attached.ffns(m).items():
                        chosen = f.router_topk.detach().cpu()[keep]  # (real tokens, k)
                        usage[m][p] += torch.bincount(chosen.flatten(), minlength=f.num_experts)
                ce_list = ce.detach().tolist()
                for m, v in zip(methods, ce_list):
                    losses[m].append(v)
                done = step + 1
                record: dict[str, Any] = {
                    "step": step, "lr": lr, "loss": dict(zip(methods, ce_list)),
                    "balance": {m: b.item() for m, b in zip(methods, balance)},
                    "tokens": int(keep.sum()), "rows": _counts(t for t, _ in picks),
                    "seconds": round(time.time() - t0, 3),
                }
                due = done == config.steps or (save_every and done % save_every == 0)
                if due:
                    record["expert_usage"] = {m: {p: c.tolist() for p, c in u.items()}
                                              for m, u in usage.items() if configs[m].num_experts > 1}
                append_line(out / TRAIN_LOG, json.dumps(record))  # one write: a kill never splits a line
                if due:
                    write_checkpoint(out, state(done), fingerprint)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({m: f"{v:.3f}" for m, v in zip(methods, ce_list)})
                if on_step is not None:
                    on_step(done)
        finally:
            if bar is not None:
                bar.close()
        for m in methods:  # the final models, each exactly as a lone attach_mixlora model saves it
            with model_view(model, attached, m):
                save_mixlora(model, configs[m], out / m)
            atomic_write_json(out / m / USAGE_FILE, {p: c.tolist() for p, c in usage[m].items()})
        return TrainResult(out, configs, params_count, losses, _usage_lists(usage), start, config.steps - start)
    finally:
        detach_models(model, attached)
        model.train(was_training)


def _counts(names: Iterator[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return out


def _usage_lists(usage: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, list[int]]]:
    return {m: {p: [int(x) for x in c] for p, c in u.items()} for m, u in usage.items()}


def _restore(ckpt: dict[str, Any], attached: Attached, opt: torch.optim.Optimizer, mixer: TaskMixer,
             usage: dict[str, dict[str, torch.Tensor]], losses: dict[str, list[float]]) -> int:
    with torch.no_grad():
        for m, params in attached.params.items():
            for n, p in params.items():
                p.copy_(ckpt["adapters"][m][n].to(p.device, p.dtype))
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["torch_rng"])
    if ckpt["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    random.setstate(_as_rng_state(ckpt["python_rng"]))
    mixer.load_state_dict(ckpt["sampler"])
    for m in usage:
        for p in usage[m]:
            usage[m][p].copy_(ckpt["usage"][m][p])
        losses[m][:] = ckpt["losses"][m]
    return int(ckpt["step"])


# -----------------------------------------------------------------------------
# reports


def usage_summary(usage: Mapping[str, Mapping[str, Sequence[int]]]) -> str:
    """Per model and FFN layer: each expert's share of the token assignments (%), min and max."""
    lines = []
    for m, layers in usage.items():
        if not layers or len(next(iter(layers.values()))) < 2:
            continue
        lines.append(f"expert usage of {m} (share of token assignments per expert, %):")
        for path, counts in layers.items():
            total = max(1, sum(counts))
            shares = [100.0 * c / total for c in counts]
            lines.append(f"  {path:24s} min {min(shares):5.1f}  max {max(shares):5.1f}  |"
                         + " ".join(f"{s:4.1f}" for s in shares))
    return "\n".join(lines)


@locked_output("out")
def evaluate_models(
    model: nn.Module,
    tokenizer: Any,
    heldout: Mapping[str, Sequence[Example]],
    out: str | Path,
    methods: Sequence[str],
    *,
    eval_examples: int = 50,
    command: str | None = None,
    params: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Held-out exact match (%) per task of the base and of each saved model ``out/<method>/``.

    Greedy batched generation (lorahub.hub.heldout_em) with the MixLoRA model attached (unmerged).
    Writes ``out/quality.json`` and ``out/quality.md``; returns the quality record.
    """
    from .hub import heldout_em
    from .mixlora import mixlora_attached

    out = Path(out)
    held = {t: list(exs[:eval_examples]) for t, exs in heldout.items()}
    empty = [t for t, exs in held.items() if not exs]
    if empty:
        raise LorahubValueError(f"tasks {empty[:5]} have no held-out examples to evaluate; raise --heldout")
    cols = ["base", *methods]
    scores: dict[str, dict[str, float]] = {t: {} for t in held}
    for t, exs in held.items():
        scores[t]["base"] = 100.0 * heldout_em(model, tokenizer, exs)
    for m in methods:
        with mixlora_attached(model, out / m):
            for t, exs in held.items():
                scores[t][m] = 100.0 * heldout_em(model, tokenizer, exs)
    average = {c: sum(scores[t][c] for t in held) / len(held) for c in cols}
    record = {
        "command": command, "metric": "exact match (%), greedy, first line", "columns": cols,
        "eval_examples": eval_examples,
        "tasks": {t: {"n": len(held[t]), **{c: round(scores[t][c], 2) for c in cols}} for t in held},
        "average": {c: round(v, 2) for c, v in average.items()},
        "trainable_params": dict(params or {}),
    }
    atomic_write_json(out / QUALITY_JSON, record)
    atomic_write_text(out / QUALITY_MD, quality_markdown(record))
    return record


def quality_table(record: Mapping[str, Any]) -> str:
    """Plain-text table: task x (n, base, each model), plus the average."""
    cols = record["columns"]
    rows = [[t, str(r["n"]), *(f"{r[c]:.1f}" for c in cols)] for t, r in record["tasks"].items()]
    rows.append(["average", "", *(f"{record['average'][c]:.1f}" for c in cols)])
    return text_table(["task", "n", *cols], rows)


def quality_markdown(record: Mapping[str, Any]) -> str:
    cols = record["columns"]
    lines = []
    if record.get("command"):
        lines += ["```", record["command"], "```", ""]
    if record.get("trainable_params"):
        lines += ["Trainable parameters: " + ", ".join(f"{m} {n:,}" for m, n in record["trainable_params"].items()), ""]
    rows = [[t, r["n"], *(f"{r[c]:.1f}" for c in cols)] for t, r in record["tasks"].items()]
    rows.append(["**average**", "", *(f"**{record['average'][c]:.1f}**" for c in cols)])
    lines += [f"Held-out {record['metric']}.", "", markdown_table(["task", "n", *cols], rows)]
    return "\n".join(lines) + "\n"
