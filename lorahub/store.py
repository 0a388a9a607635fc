"""The module store: where LoRA modules come from, whether they fit, and their stacked tensors.

A module is a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, or a
legacy ``adapter_model.bin`` read with ``torch.load(weights_only=True)``). Modules are registered
from local folders, Hugging Face hub ids (through ``huggingface_hub``, cached) or manifests
(``NAME.json``, found on :func:`hub_dirs`). For composition the chosen modules are loaded once into
stacked tensors per LoRA layer: A as [N, r, in], B as [N, out, r].

This module is also the one place that reads and writes manifests (:func:`read_manifest`,
:func:`write_manifest`, :func:`upsert_entry`, :func:`add_to_manifest`) and finds a folder's weights file
(:func:`weights_file`).
"""

from __future__ import annotations

import os
import pickle
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .files import atomic_write_json, hub_snapshot, read_json, sha256_file
from .compose import parse_lora_key
from .errors import LorahubFileError, LorahubIntegrityError, LorahubValueError

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
LEGACY_WEIGHTS = "adapter_model.bin"
HUB_PREFIX = "hf://"
_UNSUPPORTED = ("use_dora", "use_rslora_if_needed")


PACKAGE_HUB_DIR = Path(__file__).resolve().parent / "hubs"  # the hubs shipped inside the package
HUB_PATH_ENV = "LORAHUB_HUB_PATH"
OLD_HUB_PATH_ENV = "LORAHUB_HUB_INDEX"  # the variable's former name, still read


def hub_dirs() -> list[Path]:
    """Folders searched for ``NAME.json`` manifests: ``$LORAHUB_HUB_PATH`` (os.pathsep-separated; else the
    former ``$LORAHUB_HUB_INDEX``), then the package's own ``lorahub/hubs/``."""
    env = os.environ.get(HUB_PATH_ENV) or os.environ.get(OLD_HUB_PATH_ENV, "")
    return [Path(p) for p in env.split(os.pathsep) if p] + [PACKAGE_HUB_DIR]


def weights_file(folder: str | os.PathLike) -> Path:
    """The adapter weights of a PEFT folder: ``adapter_model.safetensors``, else the legacy ``adapter_model.bin``."""
    folder = Path(folder)
    for name in (SAFETENSORS_WEIGHTS, LEGACY_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    raise LorahubFileError(f"no {SAFETENSORS_WEIGHTS} or {LEGACY_WEIGHTS} in {folder}")


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
        from .errors import NOT_MERGEABLE

        raise LorahubValueError(f"module {name!r}: {path} {NOT_MERGEABLE}; the composer takes plain LoRA modules only")
    if not cfg_file.is_file():
        raise LorahubFileError(f"module {name!r}: {cfg_file} is missing (a PEFT LoRA folder needs {ADAPTER_CONFIG})")
    config = read_json(cfg_file, f"module {name!r}:")
    if str(config.get("peft_type", "LORA")).upper() != "LORA" or "r" not in config:
        raise LorahubValueError(f"module {name!r}: {cfg_file} is not a LoRA config (peft_type={config.get('peft_type')})")
    for key in _UNSUPPORTED:
        if config.get(key):
            raise LorahubValueError(f"module {name!r}: {key}=True is not supported; lorahub composes plain LoRA")
    try:
        weights = weights_file(path)
    except LorahubFileError as e:
        raise LorahubFileError(f"module {name!r}: {e}") from None
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
            state = torch.load(weights, map_location="cpu", weights_only=True)  # tensors only: no code runs
    except pickle.UnpicklingError:  # weights_only refused a Python object: never load it any other way
        raise LorahubIntegrityError(refused_pickle(weights)) from None
    except Exception as e:  # safetensors/torch raise several types for a damaged file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise LorahubIntegrityError(f"module {name!r}: cannot read {weights} ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise LorahubIntegrityError(refused_pickle(weights))
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LorahubValueError(
                f"module {name!r}: tensor {key!r} in {weights} holds NaN or inf values; the module is broken "
                "(retrain or re-download it), and composing it would make every loss NaN"
            )
        parsed = parse_lora_key(key)
        if parsed is None:
            raise LorahubValueError(
                f"module {name!r}: tensor {key!r} in {weights.name} is not a LoRA A/B matrix; "
                "lorahub composes modules that hold only lora_A/lora_B weights"
            )
        halves.setdefault(parsed[0], {})[parsed[1]] = tensor.float()
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


def refused_pickle(weights: Path) -> str:
    """Why a ``.bin`` that is not plain tensors is refused, and how its owner can convert it (one line).

    The command loads the file with ``weights_only=False``, which runs whatever code it holds: it is for a
    file whose source the user trusts, and lorahub itself never does it.
    """
    out = weights.with_name(SAFETENSORS_WEIGHTS)
    convert = (f"python -c \"import torch, safetensors.torch as st; st.save_file({{k: v.contiguous() for k, v in "
               f"torch.load({str(weights)!r}, weights_only=False).items()}}, {str(out)!r})\"")
    return (f"refused: {weights} holds Python objects, not plain tensors; lorahub never unpickles it. Convert it to "
            f"safetensors where you trust its source (this runs the code the file holds; only for a trusted file): "
            f"{convert}")


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
        # the manifest a hub store was read from (None for module folders): retrieval reads its embeddings
        self.manifest_path: Path | None = None
        self.manifest_data: dict[str, Any] | None = None
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
        """Load a manifest file, or a hub name looked up as ``NAME.json`` in :func:`hub_dirs`."""
        path = resolve_manifest(manifest)
        data = read_manifest(path)
        defaults = {k: data.get(k) for k in ("base_model", "rank", "alpha", "target_modules")}
        store = cls(base_model=data.get("base_model"), name=data.get("name", path.stem))
        store.manifest_path, store.manifest_data = path, data
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

    def weights_sha256(self, name: str) -> str:
        """The module's weights sha256: the manifest's, else hashed from its (possibly downloaded) folder."""
        return self._spec(name).sha256 or sha256_file(weights_file(self.local_path(name)))

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
    """A manifest file as given, else ``NAME.json`` in the first of :func:`hub_dirs` that has it."""
    p = Path(manifest)
    if p.is_file():
        return p
    dirs = hub_dirs()
    for d in dirs:
        if (d / f"{manifest}.json").is_file():
            return d / f"{manifest}.json"
    names = sorted({f.stem for d in dirs if d.is_dir() for f in d.glob("*.json")})
    raise LorahubFileError(
        f"unknown hub {str(manifest)!r}: no such manifest file, and no {manifest}.json in the hub path "
        f"({os.pathsep.join(map(str, dirs))}; ${HUB_PATH_ENV} adds folders). Available: {', '.join(names) or '(none)'}"
    )


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """A manifest's JSON object; errors name the file (and the line of a JSON syntax error)."""
    path = Path(path)
    if not path.is_file():
        raise LorahubFileError(f"manifest {path} not found")
    data = read_json(path, "manifest")
    if not isinstance(data, dict) or not isinstance(data.get("modules"), list):
        raise LorahubValueError(f"manifest {path} needs a 'modules' list")
    return data


def write_manifest(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write a manifest atomically: a kill never leaves half a manifest."""
    atomic_write_json(path, data)


def upsert_entry(path: str | os.PathLike, entry: dict[str, Any], **header: Any) -> None:
    """Add or replace the module entry of the same name; header keys fill the manifest's top level if unset.

    A manifest that does not exist yet is created, named after its file."""
    path = Path(path)
    data = read_manifest(path) if path.is_file() else {"name": path.stem, "modules": []}
    for k, v in header.items():
        data.setdefault(k, v)
    data["modules"] = [m for m in data["modules"] if m.get("name") != entry["name"]] + [entry]
    write_manifest(path, data)


def add_to_manifest(manifest: str | os.PathLike, location: str, *, name: str | None = None,
                    task: str | None = None) -> dict[str, Any]:
    """Describe a local PEFT LoRA folder (rank, alpha, targets, base, sha256), or a hub id, in ``manifest``."""
    manifest = Path(manifest)
    if location.startswith(HUB_PREFIX):
        entry = {"name": name or location.rsplit("/", 1)[-1], "location": location, "task": task}
    else:
        folder = Path(location).resolve()
        module = read_module(folder, name)
        entry = {
            "name": name or folder.name, "location": os.path.relpath(folder, manifest.resolve().parent),
            "task": task, "base_model": module.base_model, "rank": module.rank, "alpha": module.alpha,
            "target_modules": sorted({l.rsplit(".", 1)[-1] for l in module.layers}),
            "sha256": sha256_file(weights_file(folder)),
        }
    upsert_entry(manifest, {k: v for k, v in entry.items() if v is not None})
    return entry


def _download(repo_id: str, what: str) -> Path:
    """Fetch a module's adapter files through huggingface_hub (cached; fails fast offline)."""
    return hub_snapshot(repo_id, [ADAPTER_CONFIG, SAFETENSORS_WEIGHTS, LEGACY_WEIGHTS], f"module {what}")
