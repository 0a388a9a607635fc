"""Shared set-up for benchmark scripts: a base model (real or config-only random init) and N modules."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch

from lorahub.models import load_base, resolve_base
from lorahub.store import ModuleStore

RANDOM_CONFIGS = {
    # flan-t5-large's shape (783M parameters)
    "flan-t5-large": dict(model_type="t5", d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24,
                          num_heads=16, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def base_model(random_init: str | None, device: str) -> tuple[Any, Any]:
    """The default base, or a randomly initialised model of a named/JSON config (same FLOPs, no weights needed).

    Random-init models use the SmolLM2 tokenizer, so their vocabulary is SmolLM2's (49,152) rather than the
    config's: this changes only the embedding and LM-head sizes.
    """
    if not random_init:
        return load_base(None, device=device)
    import json

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_base(None))
    spec = dict(RANDOM_CONFIGS.get(random_init) or json.loads(Path(random_init).read_text()))
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **spec, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = cls.from_config(cfg).to(device, dtype).eval().requires_grad_(False)
    model.lorahub_base_name = f"random-init:{random_init}"
    return model, tok


def random_modules(model: Any, n: int, *, r: int = 16, alpha: int = 32, scale: float = 0.02) -> ModuleStore:
    """n PEFT LoRA modules with random A and B (written by PEFT), for timing where no library exists."""
    from peft import LoraConfig, TaskType, get_peft_model

    seq2seq = bool(model.config.is_encoder_decoder)
    targets = ["q", "v"] if seq2seq else ["q_proj", "v_proj"]
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                     task_type=TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM)
    peft_model = get_peft_model(copy.deepcopy(model).float().cpu(), cfg)
    lora = [p for name, p in peft_model.named_parameters() if "lora_" in name]
    root = Path(tempfile.mkdtemp(prefix="lorahub-bench-"))
    store = ModuleStore()
    for i in range(n):
        torch.manual_seed(i)
        with torch.no_grad():
            for p in lora:
                p.copy_(torch.randn_like(p) * scale)
        peft_model.save_pretrained(root / f"random{i:02d}")
        store.add_path(root / f"random{i:02d}")
    return store
