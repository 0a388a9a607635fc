"""Task examples and how they become tokens.

One function, :func:`format_example`, decides what a model sees for an (input, output) pair. The
composer, the trainer and the benchmark all go through it, so a module sees at composition time
exactly what it saw in training.

lorahub feeds ``input`` to the model verbatim (as LoraHub does): instructions and ``Q:``/``A:``
markers belong in the input (:func:`qa_prompt` builds the usual ones). For a causal LM the answer
follows the prompt; a prompt's trailing spaces move to the answer, because SmolLM2-style BPE
tokenizers put a word's leading space in the word's token (a prompt ending in ``"A: "`` wrecks
generation).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from .errors import LorahubFileError, LorahubValueError

DEFAULT_MAX_LENGTH = 1024  # tokens of one example (prompt + answer), unless a caller sets another limit
logger = logging.getLogger("lorahub")


@dataclass(frozen=True)
class Example:
    """One example of a task: the prompt text and the expected output text.

    ``source`` says where it came from (``file.jsonl:7``, ``task_examples[3]``), so that a warning or an
    error about it can name it; it takes no part in equality.
    """

    input: str
    output: str
    source: str | None = field(default=None, compare=False, repr=False)


def qa_prompt(question: str, description: str | None = None) -> str:
    """LoraHub's BBH prompt: ``"{description}\\n\\nQ: {question}\\nA:"`` (description optional)."""
    head = f"{description.strip()}\n\n" if description else ""
    return f"{head}Q: {question}\nA:"


def format_example(input: str, output: str | None, *, seq2seq: bool) -> tuple[str, str]:
    """Return (prompt, target) as the model sees them.

    Seq2seq models take ``input`` and ``output`` unchanged. For causal LMs the prompt loses its
    trailing spaces and the target starts with one space (unless the prompt ends a line), so the
    answer's first token carries its leading space as in natural text.
    """
    output = "" if output is None else output
    if seq2seq:
        return input, output
    prompt = input.rstrip(" \t")
    target = output.strip()
    if prompt and not prompt.endswith("\n"):
        target = " " + target
    return prompt, target


def as_examples(task_examples: Any, *, where: str = "task_examples", need_output: bool = True) -> list[Example]:
    """Normalise dicts ``{"input", "output"}``, ``(input, output)`` pairs or a ``datasets.Dataset``.

    Raises a :class:`LorahubValueError` naming the offending example when one is malformed.
    """
    if task_examples is None:
        raise LorahubValueError(f"{where}: no examples given; pass a list of {{'input': ..., 'output': ...}} dicts")
    if hasattr(task_examples, "column_names") and hasattr(task_examples, "to_list"):  # datasets.Dataset
        missing = {"input", "output"} - set(task_examples.column_names)
        if missing:
            raise LorahubValueError(
                f"{where}: the dataset has columns {task_examples.column_names}, but needs 'input' and 'output'"
            )
        task_examples = task_examples.to_list()
    if isinstance(task_examples, (str, bytes)) or not isinstance(task_examples, Iterable):
        raise LorahubValueError(f"{where}: expected a list of examples, got {type(task_examples).__name__}")
    out: list[Example] = []
    for i, ex in enumerate(task_examples):
        if isinstance(ex, dict):
            if "input" not in ex or (need_output and "output" not in ex):
                raise LorahubValueError(
                    f"{where}[{i}]: an example needs keys 'input' and 'output', got keys {sorted(ex)}"
                )
            inp, outp = ex["input"], ex.get("output", "")
        elif isinstance(ex, (tuple, list)) and len(ex) == 2:
            inp, outp = ex
        else:
            raise LorahubValueError(
                f"{where}[{i}]: expected a dict with 'input'/'output' or an (input, output) pair, got {ex!r:.80}"
            )
        if not isinstance(inp, str) or not isinstance(outp, str):
            raise LorahubValueError(
                f"{where}[{i}]: 'input' and 'output' must be strings, got {type(inp).__name__} and {type(outp).__name__}"
            )
        if not inp.strip():
            raise LorahubValueError(f"{where}[{i}]: 'input' is empty")
        if need_output and not outp.strip():
            raise LorahubValueError(f"{where}[{i}]: 'output' is empty; every example needs an expected output")
        out.append(Example(inp, outp, f"{where}[{i}]"))
    if not out:
        raise LorahubValueError(f"{where}: no examples given; at least one is needed")
    return out


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-empty line; a bad line raises an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise LorahubFileError(f"file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LorahubValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise LorahubValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_jsonl(path: str | os.PathLike, *, need_output: bool = True) -> list[Example]:
    """Read ``{"input", "output"}`` lines (``target`` is taken for ``output``); errors name file and line."""
    rows = []
    for lineno, row in iter_jsonl(path):
        if "output" not in row and "target" in row:
            row = {**row, "output": row["target"]}
        try:
            rows.extend(replace(e, source=f"{path}:{lineno}")
                        for e in as_examples([row], where=f"{path}:{lineno}", need_output=need_output))
        except LorahubValueError as e:
            raise LorahubValueError(str(e).replace(f"{path}:{lineno}[0]", f"{path}:{lineno}")) from None
    if not rows:
        raise LorahubValueError(f"{path}: contains no examples")
    return rows


@dataclass
class Batch:
    """Token tensors for the loss: labels are -100 outside the target tokens.

    Causal LMs: ``input_ids``/``attention_mask``/``labels`` are [B, T], right-padded, labels aligned
    with input_ids (the model shifts). Seq2seq: ``labels`` and ``decoder_attention_mask`` are [B, L].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    decoder_attention_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.labels), move(self.decoder_attention_mask))

    def repeat(self, times: int) -> "Batch":
        """The batch repeated ``times`` times, block after block (row ``p*B + q`` is example q)."""
        rep = lambda t: None if t is None else t.repeat(times, *([1] * (t.dim() - 1)))  # noqa: E731
        return Batch(rep(self.input_ids), rep(self.attention_mask), rep(self.labels), rep(self.decoder_attention_mask))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def encode(
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    seq2seq: bool,
    max_length: int = DEFAULT_MAX_LENGTH,
    add_eos: bool = True,
) -> Batch:
    """Tokenize examples for a teacher-forced loss on the target tokens only.

    Causal LMs: prompt and target are tokenized apart (so the target's first token keeps its
    leading space) and EOS ends the target. An example over ``max_length`` tokens keeps its answer whole:
    its prompt is cut from the left (seq2seq: the source is cut at the right, as the tokenizer does), with
    one warning line naming it (:func:`warn_too_long`). An answer that alone exceeds the limit is an error
    naming the example: cutting it would train or score a different answer.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    too_long: list[tuple[str, int]] = []
    if seq2seq:
        srcs, tgts = [], []
        for i, ex in enumerate(examples):
            p, t = format_example(ex.input, ex.output, seq2seq=True)
            src = tokenizer(p).input_ids
            tgt = tokenizer(t).input_ids
            if len(tgt) > max_length:
                raise answer_too_long(ex, i, len(tgt), max_length)
            if len(src) > max_length:
                too_long.append((example_name(ex, i), len(src)))
            srcs.append(tokenizer(p, truncation=True, max_length=max_length).input_ids if len(src) > max_length else src)
            tgts.append(tgt)
        warn_too_long(too_long, max_length, "the source is cut at the right")
        ids, mask = pad_rows(srcs, pad_id)
        lab, dmask = pad_rows(tgts, pad_id)
        lab = lab.masked_fill(dmask == 0, -100)
        return Batch(ids, mask, lab, dmask)
    seqs, labs = [], []
    for i, ex in enumerate(examples):
        p, t = format_example(ex.input, ex.output, seq2seq=False)
        p_ids = tokenizer(p, add_special_tokens=True).input_ids
        t_ids = tokenizer(t, add_special_tokens=False).input_ids + eos
        if len(t_ids) > max_length - 1:  # one prompt token at least: the first answer token is predicted from it
            raise answer_too_long(ex, i, len(t_ids), max_length)
        if len(p_ids) + len(t_ids) > max_length:
            too_long.append((example_name(ex, i), len(p_ids) + len(t_ids)))
            p_ids = p_ids[-(max_length - len(t_ids)) :]
        seqs.append(p_ids + t_ids)
        labs.append([-100] * len(p_ids) + t_ids)
    warn_too_long(too_long, max_length, "the prompt is cut from the left, the answer kept whole")
    ids, mask = pad_rows(seqs, pad_id)
    lab, _ = pad_rows(labs, -100)
    return Batch(ids, mask, lab)


def example_name(ex: Example, index: int) -> str:
    """Where an example came from (``file.jsonl:7``), else its index in the batch."""
    return ex.source or f"example {index}"


def answer_too_long(ex: Example, index: int, tokens: int, max_length: int) -> LorahubValueError:
    return LorahubValueError(
        f"{example_name(ex, index)}: the answer alone is {tokens} tokens, over the {max_length}-token limit of one "
        "example; shorten it or raise max_length (--max-length)"
    )


_warned_too_long: set[tuple[str, int, int]] = set()  # (example, its tokens, limit) warned about in this process


def warn_too_long(found: Sequence[tuple[str, int]], max_length: int, how: str) -> None:
    """One warning line (logger ``lorahub``) for the examples over the limit not warned about before.

    Why once: the trainer encodes the same examples at every step; one line per example is enough.
    """
    new = [(name, n) for name, n in found if (name, n, max_length) not in _warned_too_long]
    if not new:
        return
    _warned_too_long.update((name, n, max_length) for name, n in new)
    shown = ", ".join(f"{name} ({n} tokens)" for name, n in new[:3]) + (f" and {len(new) - 3} more" if len(new) > 3 else "")
    logger.warning("lorahub: warning: %s over the %d-token limit of one example (%s): %s",
                   "an example is" if len(new) == 1 else f"{len(new)} examples are", max_length, how, shown)


def pad_rows(rows: Sequence[Sequence[int]], value: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded with ``value`` to the longest (on the right, or the left for generation) and their mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def shared_prefix_length(rows: Sequence[Sequence[int]], *, min_length: int = 4) -> int:
    """Tokens that every row starts with (each row keeps at least one of its own); 0 if fewer than ``min_length``."""
    if len(rows) < 2:
        return 0
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return n if n >= min_length else 0
