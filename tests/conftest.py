"""Shared fixtures: tiny random Llama and T5 models (built from configs), the SmolLM2 tokenizer, random modules."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lorahub.models import resolve_base

torch.set_num_threads(1)  # tiny models: one thread is as fast, and CI may share its cores


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The cached plain copy of the default base (built from the shipped GGUF on first use)."""
    return Path(resolve_base(None))


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


def _tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def _tiny_t5(tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )
    return T5ForConditionalGeneration(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    _tiny_llama(tokenizer).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, tokenizer) -> Path:
    d = tmp_path_factory.mktemp("tiny-t5")
    _tiny_t5(tokenizer).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture()
def tiny_llama(tiny_llama_dir):
    from lorahub.models import load_base

    return load_base(str(tiny_llama_dir), device="cpu")


@pytest.fixture()
def tiny_t5(tiny_t5_dir):
    from lorahub.models import load_base

    return load_base(str(tiny_t5_dir), device="cpu")


def make_module(model, out: Path, *, seed: int, r: int = 4, alpha: int = 8, targets=("q_proj", "v_proj"),
                base_name: str | None = None, scale: float = 0.5) -> Path:
    """A PEFT LoRA folder with random non-zero A and B (written by PEFT itself)."""
    from peft import LoraConfig, TaskType, get_peft_model

    seq2seq = bool(model.config.is_encoder_decoder)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                     task_type=TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * scale)
    peft_model.peft_config["default"].base_model_name_or_path = base_name or model.config.name_or_path
    peft_model.save_pretrained(out)
    return out


@pytest.fixture()
def llama_modules(tiny_llama, tmp_path, tiny_llama_dir):
    model, _ = tiny_llama
    return [make_module(model, tmp_path / f"mod{i}", seed=i, base_name=str(tiny_llama_dir)) for i in range(4)]


@pytest.fixture()
def t5_modules(tiny_t5, tmp_path, tiny_t5_dir):
    model, _ = tiny_t5
    return [make_module(model, tmp_path / f"t5mod{i}", seed=10 + i, targets=("q", "v"), base_name=str(tiny_t5_dir))
            for i in range(3)]


def tiny_model_and_tokenizer(seed: int = 0):
    """A 2-layer random Llama and a byte-level BPE tokenizer trained on a few lines (no files needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(["Q: what is the colour of the sky?\nA: blue", "choice: yes no red green 0123456789"] * 10, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model, tok


from faults import EXAMPLES  # noqa: E402  (the few-shot examples every test composes on; defined once, there)
