"""The module store: where LoRA modules come from, whether they fit, and their stacked tensors.

A module is a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, or a
legacy ``adapter_model.bin`` read with ``torch.load(weights_only=True)``). Modules are registered
from local folders, Hugging Face hub ids (through ``huggingface_hub``, cached) or manifests in
``hub_index/``. For composition the chosen modules are loaded once into stacked tensors per LoRA
layer: A as [N, r, in], B as [N, out, r].
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ._io import hub_snapshot, sha256_file
from .errors import LorahubFileError, LorahubIntegrityError, LorahubValueError

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
LEGACY_WEIGHTS = "adapter_model.bin"
HUB_PREFIX = "hf://"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")
_UNSUPPORTED = ("use_dora", "use_rslora_if_needed")


def hub_index_dirs() -> list[Path]:
    """Folders searched for ``NAME.json`` manifests: ``$LORAHUB_HUB_INDEX`` (os.pathsep-separated), then the repo's."""
    dirs = [Path(p) for p in os.environ.get("LORAHUB_HUB_INDEX", "").split(os.pathsep) if p]
    return dirs + [Path(__file__).resolve().parent.parent / "hub_index"]


def norm_base_name(name: str | None) -> str | None:
    """Compare base models by their last path component: 'google/flan-t5-large' == '/models/flan-t5-large'."""
    if not name:
        return None
    return Path(str(name).rstrip("/")).name.lower()


@dataclass
class ModuleSpec:
    """A module as the store knows it before loading: where it is and what it claims to be."""

    name: str
    location: str  # local folder, or "hf://owner/repo"
    task: str | None = None
    base_model: str | None = None
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] | None = None
    sha256: str | None = None  # of the weights file
    extra: dict[str, Any] = field(default_factory=dict)  # quality figures, data source, licence...

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        d.update(self.extra)
        return d


@dataclass
class LoraModule:
    """One loaded module: its PEFT config and per-layer (A [r, in], B [out, r]) tensors."""

    name: str
    config: dict[str, Any]
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer path -> (A, B)

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", self.rank))

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5 if self.config.get("use_rslora") else self.rank)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def seq2seq(self) -> bool:
        return self.config.get("task_type") == "SEQ_2_SEQ_LM"


@dataclass
class StackedModules:
    """N compatible modules stacked per layer, on the evaluation device: A [N, r, in], B [N, out, r]."""

    names: list[str]
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    scaling: float
    config: dict[str, Any]  # adapter_config of the composed adapter

    @property
    def layers(self) -> list[str]:
        return list(self.A)

    def __len__(self) -> int:
        return len(self.names)


def read_module(path: str | os.PathLike, name: str | None = None, sha256: str | None = None) -> LoraModule:
    """Read a PEFT LoRA folder; check its sha256 if given. Errors name the folder and the tensor."""
    path = Path(path)
    name = name or path.name
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file() and (path / "mixlora_config.json").is_file():
        from .mixlora import NOT_MERGEABLE

        raise LorahubValueError(f"module {name!r}: {path} {NOT_MERGEABLE}; the composer takes plain LoRA modules only")
    if not cfg_file.is_file():
        raise LorahubFileError(f"module {name!r}: {cfg_file} is missing (a PEFT LoRA folder needs {ADAPTER_CONFIG})")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LorahubValueError(f"module {name!r}: {cfg_file} is not valid JSON ({e.msg})") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA" or "r" not in config:
        raise LorahubValueError(f"module {name!r}: {cfg_file} is not a LoRA config (peft_type={config.get('peft_type')})")
    for key in _UNSUPPORTED:
        if config.get(key):
            raise LorahubValueError(f"module {name!r}: {key}=True is not supported; lorahub composes plain LoRA")
    weights = path / SAFETENSORS_WEIGHTS
    if not weights.is_file():
        weights = path / LEGACY_WEIGHTS
    if not weights.is_file():
        raise LorahubFileError(f"module {name!r}: no {SAFETENSORS_WEIGHTS} or {LEGACY_WEIGHTS} in {path}")
    if sha256 and (got := sha256_file(weights)) != sha256:
        raise LorahubIntegrityError(
            f"module {name!r}: sha256 of {weights} is {got}, the manifest says {sha256}; "
            "the file is corrupted or was changed (re-download or rebuild it)"
        )
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors/torch raise several types for a damaged file
        raise LorahubIntegrityError(f"module {name!r}: cannot read {weights} ({type(e).__name__}: {e})") from None
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _KEY.match(key)
        if not m:
            raise LorahubValueError(
                f"module {name!r}: tensor {key!r} in {weights.name} is not a LoRA A/B matrix; "
                "lorahub composes modules that hold only lora_A/lora_B weights"
            )
        halves.setdefault(m["path"], {})[m["ab"]] = tensor.float()
    layers = {}
    r = int(config["r"])
    for layer, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise LorahubValueError(f"module {name!r}: layer {layer!r} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise LorahubValueError(
                f"module {name!r}: tensor {layer}.lora_A/B has shapes {tuple(a.shape)}/{tuple(b.shape)}, "
                f"expected [r, in]/[out, r] with r={r} from {ADAPTER_CONFIG}"
            )
        layers[layer] = (a, b)
    if not layers:
        raise LorahubValueError(f"module {name!r}: {weights} holds no LoRA tensors")
    return LoraModule(name, config, layers)


def check_compatible(modules: Sequence[LoraModule], base_model: Any | None = None, base_name: str | None = None) -> None:
    """Raise a clear error unless the modules share rank, scaling, layers and base model, and fit ``base_model``."""
    if not modules:
        raise LorahubValueError("no modules to compose; give at least one")
    ref = modules[0]
    for m in modules[1:]:
        if m.rank != ref.rank:
            raise LorahubValueError(f"module {m.name!r} has rank r={m.rank}, but {ref.name!r} has r={ref.rank}; composed modules need one rank")
        if abs(m.scaling - ref.scaling) > 1e-9:
            raise LorahubValueError(
                f"module {m.name!r} has scaling alpha/r={m.scaling:g}, but {ref.name!r} has {ref.scaling:g}; composed modules need one lora_alpha"
            )
        if set(m.layers) != set(ref.layers):
            diff = sorted(set(m.layers) ^ set(ref.layers))[:3]
            raise LorahubValueError(
                f"module {m.name!r} targets other layers than {ref.name!r} (e.g. {diff}); "
                f"target_modules {m.config.get('target_modules')} vs {ref.config.get('target_modules')}"
            )
        for layer, (a, b) in m.layers.items():
            ra, rb = ref.layers[layer]
            if a.shape != ra.shape or b.shape != rb.shape:
                raise LorahubValueError(
                    f"module {m.name!r}: tensor {layer}.lora_A/B has shapes {tuple(a.shape)}/{tuple(b.shape)}, "
                    f"but {ref.name!r} has {tuple(ra.shape)}/{tuple(rb.shape)}"
                )
        if m.base_model and ref.base_model and norm_base_name(m.base_model) != norm_base_name(ref.base_model):
            raise LorahubValueError(
                f"module {m.name!r} was trained on base model {m.base_model!r}, but {ref.name!r} on {ref.base_model!r}"
            )
    if base_name is not None:
        for m in modules:
            if m.base_model and norm_base_name(m.base_model) != norm_base_name(base_name):
                raise LorahubValueError(
                    f"module {m.name!r} was trained on base model {m.base_model!r}, not on {base_name!r}; "
                    "choose modules of this base model or pass base_model=" + repr(m.base_model)
                )
    if base_model is not None:
        named = dict(base_model.named_modules())
        for layer, (a, b) in ref.layers.items():
            target = named.get(layer)
            if target is None:
                raise LorahubValueError(
                    f"module {ref.name!r}: layer {layer!r} does not exist in the base model "
                    f"({type(base_model).__name__}); the module was made for another architecture"
                )
            if not isinstance(target, torch.nn.Linear):
                raise LorahubValueError(f"module {ref.name!r}: layer {layer!r} is a {type(target).__name__}, lorahub composes LoRA on nn.Linear only")
            if (target.in_features, target.out_features) != (a.shape[1], b.shape[0]):
                raise LorahubValueError(
                    f"module {ref.name!r}: tensor {layer}.lora_A/B maps {a.shape[1]}->{b.shape[0]}, but the base "
                    f"model's {layer} maps {target.in_features}->{target.out_features}"
                )


def stack_modules(
    modules: Sequence[LoraModule], *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> StackedModules:
    """Stack compatible modules per layer: A [N, r, in], B [N, out, r] (call :func:`check_compatible` first)."""
    ref = modules[0]
    A = {l: torch.stack([m.layers[l][0] for m in modules]).to(device, dtype) for l in ref.layers}
    B = {l: torch.stack([m.layers[l][1] for m in modules]).to(device, dtype) for l in ref.layers}
    config = {k: v for k, v in ref.config.items() if not k.startswith("lorahub")}
    config.setdefault("peft_type", "LORA")
    config.setdefault("lora_alpha", ref.alpha)
    # PEFT's LoraConfig wants the module names, not paths; modules agree on layers, so take theirs.
    config.setdefault("target_modules", sorted({l.rsplit(".", 1)[-1] for l in ref.layers}))
    return StackedModules([m.name for m in modules], A, B, ref.scaling, config)


class ModuleStore:
    """A named collection of modules; loads lazily and caches what it loaded."""

    def __init__(self, specs: Iterable[ModuleSpec] = (), *, base_model: str | None = None, name: str | None = None):
        self.specs: dict[str, ModuleSpec] = {}
        self.base_model = base_model
        self.name = name
        self._loaded: dict[str, LoraModule] = {}
        for s in specs:
            self.add(s)

    def __len__(self) -> int:
        return len(self.specs)

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def add(self, spec: ModuleSpec) -> ModuleSpec:
        if spec.name in self.specs:
            raise LorahubValueError(f"module name {spec.name!r} is registered twice (locations {self.specs[spec.name].location!r} and {spec.location!r})")
        self.specs[spec.name] = spec
        return spec

    def add_path(self, location: str | os.PathLike, name: str | None = None) -> ModuleSpec:
        """Register a local PEFT folder or a hub id (``owner/repo`` or ``hf://owner/repo``)."""
        loc = str(location)
        if Path(loc).is_dir():
            return self.add(ModuleSpec(name or Path(loc).resolve().name, str(Path(loc).resolve())))
        repo = loc[len(HUB_PREFIX):] if loc.startswith(HUB_PREFIX) else loc
        if re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo) and not Path(loc).exists():
            return self.add(ModuleSpec(name or repo.split("/")[-1], HUB_PREFIX + repo))
        raise LorahubFileError(f"module location {loc!r} is neither a folder nor a hub id of the form owner/name")

    @classmethod
    def from_manifest(cls, manifest: str | os.PathLike) -> "ModuleStore":
        """Load a manifest file, or a hub name looked up as ``NAME.json`` in :func:`hub_index_dirs`."""
        path = resolve_manifest(manifest)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LorahubValueError(f"manifest {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict) or not isinstance(data.get("modules"), list):
            raise LorahubValueError(f"manifest {path} needs a 'modules' list")
        defaults = {k: data.get(k) for k in ("base_model", "rank", "alpha", "target_modules")}
        store = cls(base_model=data.get("base_model"), name=data.get("name", path.stem))
        known = {"name", "location", "task", "base_model", "rank", "alpha", "target_modules", "sha256"}
        for i, entry in enumerate(data["modules"]):
            if not isinstance(entry, dict) or "name" not in entry or "location" not in entry:
                raise LorahubValueError(f"manifest {path}: modules[{i}] needs 'name' and 'location'")
            loc = str(entry["location"])
            if not loc.startswith(HUB_PREFIX) and not os.path.isabs(loc):
                loc = str((path.parent / loc).resolve())
            spec = ModuleSpec(
                name=entry["name"], location=loc, task=entry.get("task"), sha256=entry.get("sha256"),
                **{k: entry.get(k, defaults[k]) for k in ("base_model", "rank", "alpha", "target_modules")},
                extra={k: v for k, v in entry.items() if k not in known},
            )
            store.add(spec)
        return store

    def local_path(self, name: str) -> Path:
        """The module's local folder, downloading a hub module into the HF cache if needed."""
        spec = self._spec(name)
        if not spec.location.startswith(HUB_PREFIX):
            return Path(spec.location)
        repo = spec.location[len(HUB_PREFIX):]
        hint = f" (no local folder {repo!r} exists either)" if not Path(repo).exists() else ""
        return _download(repo, repr(name) + hint)

    def load(self, name: str) -> LoraModule:
        if name not in self._loaded:
            spec = self._spec(name)
            module = read_module(self.local_path(name), name, spec.sha256)
            for key, want, got in (("rank", spec.rank, module.rank), ("alpha", spec.alpha, module.alpha)):
                if want is not None and float(want) != float(got):
                    raise LorahubValueError(f"module {name!r}: the manifest says {key}={want}, its adapter_config says {got}")
            if spec.base_model and not module.config.get("base_model_name_or_path"):
                module.config["base_model_name_or_path"] = spec.base_model
            self._loaded[name] = module
        return self._loaded[name]

    def verify(self, names: Sequence[str] | None = None) -> list[tuple[str, str | None]]:
        """Load each module (checking sha256 and shapes); return (name, error message or None)."""
        out = []
        for n in names or self.names:
            self._loaded.pop(n, None)
            try:
                self.load(n)
                out.append((n, None))
            except Exception as e:  # report every module, fail none silently
                out.append((n, f"{type(e).__name__}: {e}"))
        return out

    def select(self, k: int, seed: int) -> list[str]:
        """k module names drawn at random with ``seed`` (all of them if k >= len(store)), in store order."""
        if k <= 0:
            raise LorahubValueError(f"num_candidates must be a positive integer, got {k}")
        if k >= len(self.names):
            return list(self.names)
        chosen = set(random.Random(seed).sample(self.names, k))
        return [n for n in self.names if n in chosen]

    def stack(self, names: Sequence[str], base_model: Any | None = None, *, base_name: str | None = None,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> StackedModules:
        modules = [self.load(n) for n in names]
        check_compatible(modules, base_model, base_name)
        return stack_modules(modules, device=device, dtype=dtype)

    def _spec(self, name: str) -> ModuleSpec:
        if name not in self.specs:
            avail = ", ".join(self.names[:10]) + (" ..." if len(self.names) > 10 else "")
            raise LorahubValueError(f"unknown module {name!r}. Available: {avail or '(store is empty)'}")
        return self.specs[name]


def resolve_manifest(manifest: str | os.PathLike) -> Path:
    p = Path(manifest)
    if p.is_file():
        return p
    for d in hub_index_dirs():
        if (d / f"{manifest}.json").is_file():
            return d / f"{manifest}.json"
    names = sorted({f.stem for d in hub_index_dirs() if d.is_dir() for f in d.glob("*.json")})
    raise LorahubFileError(f"unknown hub {str(manifest)!r}: no such manifest file, and no {manifest}.json in hub_index. Available: {', '.join(names) or '(none)'}")


def _download(repo_id: str, what: str) -> Path:
    """Fetch a module's adapter files through huggingface_hub (cached; fails fast offline)."""
    return hub_snapshot(repo_id, [ADAPTER_CONFIG, SAFETENSORS_WEIGHTS, LEGACY_WEIGHTS], f"module {what}")
