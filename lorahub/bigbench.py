"""BIG-bench task pools as lorahub :class:`~lorahub.data.Example` lists, and the seeded train/held-out split.

Layout of a BIG-bench task pool, as :func:`list_tasks` and :func:`read_task` read it::

    index.json            {task: {"task_prefix", "example_input_prefix", "example_output_prefix",
                                  "choice_prefix", "append_choices_to_input", "kind", ...}}
    tasks/<task>.jsonl    {"input", "target", "targets", "choices"} per line

A folder without ``index.json`` is read as plain ``<task>.jsonl`` files of ``{"input", "output"}``
(see :func:`lorahub.data.read_jsonl`).

The prompt follows BIG-bench's own formatting (``bigbench/api/json_task.py``)::

    task_prefix + example_input_prefix + input [+ choice_prefix + choice ...] + example_output_prefix

with leading newlines stripped. The prompt keeps the trailing space of ``"\\nA: "``: moving it into the
answer is :func:`lorahub.data.format_example`'s job, for training and composition alike.

A multiple-choice task can be rendered in one of :data:`FORMATS` (``fmt``):

- ``"native"``: BIG-bench's own, as above; the answer is the choice's text (for a task whose choices are
  yes/no or True/False, that is already the yes/no format);
- ``"letters"``: the choices as lettered options, as BBH and most prompts in the wild write them::

      task_prefix + example_input_prefix + input + "\\nOptions:\\n(A) …\\n(B) …" + example_output_prefix

  with the answer the option's letter in parentheses, ``"(B)"``. The choices are shuffled with a seed made
  of the file name and line number, so the letter carries no prior and a rebuild renders the same prompts.

A hub module is one (task, format) *unit*: ``"task"`` or ``"task:letters"`` (:func:`parse_unit`), named
``task`` for the native format and ``task--letters`` otherwise (:func:`unit_name`).
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from .data import Example, iter_jsonl, read_jsonl
from .errors import LorahubFileError, LorahubValueError

# BIG-bench's defaults for absent prompt fields.
DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "
MIN_HELDOUT = 50  # examples of each task kept out of training, for the module's quality report
FORMATS = ("native", "letters")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


LETTER_ANSWER = re.compile(r"\s*\([A-Z]\)\s*")


def answer_format(outputs: Sequence[str]) -> str:
    """The :data:`FORMATS` name of a task's answers: ``"letters"`` when most of them (more than half) are option
    letters such as ``(B)`` (BBH's multiple-choice tasks, the ``--letters`` modules), else ``"native"``.

    Why most, not all: one mislabelled example must not flip the format. BBH's movie_recommendation has a target
    written out (``Monsters, Inc`` among its ``(A)``-``(E)``), and it is one of that task's 5 few-shot examples
    under the benchmark's split; with "all" its candidates were drawn from the wrong format (docs/results.md)."""
    letters = sum(bool(LETTER_ANSWER.fullmatch(o)) for o in outputs)
    return "letters" if 2 * letters > len(outputs) else "native"


def parse_unit(spec: str) -> tuple[str, str]:
    """``"task"`` -> (task, "native"); ``"task:letters"`` -> (task, "letters"); an unknown format is an error."""
    task, _, fmt = spec.strip().partition(":")
    fmt = fmt or "native"
    if fmt not in FORMATS:
        raise LorahubValueError(f"unknown answer format {fmt!r} in {spec!r}. Available: {', '.join(FORMATS)}")
    return task, fmt


def unit_name(task: str, fmt: str) -> str:
    """The module name of a (task, format) unit: the task itself for the native format."""
    return task if fmt == "native" else f"{task}--{fmt}"


@dataclass
class Task:
    """One task: its name, its examples (prompt text + first acceptable answer) and its index entry."""

    name: str
    examples: list[Example]
    meta: dict[str, Any]
    path: Path

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "generative")


def _as_bool(value: Any, default: bool) -> bool:
    """index.json has both JSON booleans and the strings "true"/"false"."""
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def bigbench_prompt(row: dict[str, Any], meta: dict[str, Any]) -> str:
    """The full prompt of one BIG-bench example, prefixes and (if asked) choices included."""
    inp = meta.get("example_input_prefix", DEFAULT_INPUT_PREFIX) + row["input"]
    choices = row.get("choices") or []
    if choices and _as_bool(meta.get("append_choices_to_input"), True):
        prefix = meta.get("choice_prefix", DEFAULT_CHOICE_PREFIX)
        inp += "".join(prefix + str(c) for c in choices)
    text = (meta.get("task_prefix") or "") + inp + meta.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX)
    return text.lstrip("\n")


def lettered_example(row: dict[str, Any], meta: dict[str, Any], target: str, seed: str) -> Example:
    """The ``"letters"`` rendering of one multiple-choice row (choices shuffled with ``seed``)."""
    choices = [str(c) for c in row["choices"]]
    order = list(range(len(choices)))
    random.Random(seed).shuffle(order)
    shuffled = [choices[i] for i in order]
    options = "\nOptions:" + "".join(f"\n({LETTERS[i]}) {c}" for i, c in enumerate(shuffled))
    text = (meta.get("task_prefix") or "") + meta.get("example_input_prefix", DEFAULT_INPUT_PREFIX) + row["input"]
    text += options + meta.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX)
    return Example(text.lstrip("\n"), f"({LETTERS[shuffled.index(target)]})")


def read_bigbench_task(
    path: str | os.PathLike, meta: dict[str, Any] | None = None, fmt: str = "native"
) -> list[Example]:
    """Read ``tasks/<name>.jsonl`` in answer format ``fmt``; a bad line raises an error naming file and line."""
    meta = meta or {}
    if fmt not in FORMATS:
        raise LorahubValueError(f"unknown answer format {fmt!r}. Available: {', '.join(FORMATS)}")
    out: list[Example] = []
    for lineno, row in iter_jsonl(path):
        target = row.get("target", row.get("output"))
        if target is None and row.get("targets"):
            target = row["targets"][0]
        if not isinstance(row.get("input"), str) or not row["input"].strip():
            raise LorahubValueError(f"{path}:{lineno}: 'input' must be a non-empty string, got {row.get('input')!r:.60}")
        if not isinstance(target, str) or not target.strip():
            raise LorahubValueError(f"{path}:{lineno}: 'target' must be a non-empty string, got {target!r:.60}")
        choices = row.get("choices")
        if choices is not None and not isinstance(choices, list):
            raise LorahubValueError(f"{path}:{lineno}: 'choices' must be a list or null, got {type(choices).__name__}")
        if fmt == "letters":
            if not choices or len(choices) > len(LETTERS):
                raise LorahubValueError(
                    f"{path}:{lineno}: the letters format needs 1 to {len(LETTERS)} choices, got {len(choices or [])}; "
                    "render this task in the native format"
                )
            if target not in [str(c) for c in choices]:
                raise LorahubValueError(f"{path}:{lineno}: target {target!r:.60} is not among the choices")
            out.append(replace(lettered_example(row, meta, target, seed=f"{Path(path).stem}:{lineno}"),
                               source=f"{path}:{lineno}"))
            continue
        out.append(Example(bigbench_prompt(row, meta), target, f"{path}:{lineno}"))
    if not out:
        raise LorahubValueError(f"{path}: contains no examples")
    return out


def list_tasks(tasks_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Task name -> index entry (``{}`` for plain JSONL folders), in the folder's order."""
    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise LorahubFileError(f"tasks folder {tasks_dir} does not exist")
    index = tasks_dir / "index.json"
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LorahubValueError(f"{index}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return {name: dict(meta or {}) for name, meta in data.items()}
    return {p.stem: {} for p in sorted(tasks_dir.glob("*.jsonl"))}


def task_path(tasks_dir: str | os.PathLike, name: str) -> Path:
    tasks_dir = Path(tasks_dir)
    sub = tasks_dir / "tasks" / f"{name}.jsonl"
    return sub if sub.is_file() or (tasks_dir / "index.json").is_file() else tasks_dir / f"{name}.jsonl"


def read_task(
    tasks_dir: str | os.PathLike, name: str, meta: dict[str, Any] | None = None, fmt: str = "native"
) -> Task:
    """Read one task of a BIG-bench-layout folder (in answer format ``fmt``) or of a plain JSONL folder."""
    tasks_dir = Path(tasks_dir)
    if meta is None:
        index = list_tasks(tasks_dir)
        if name not in index:
            avail = ", ".join(list(index)[:10]) + (" ..." if len(index) > 10 else "")
            raise LorahubValueError(f"unknown task {name!r} in {tasks_dir}. Available: {avail or '(none)'}")
        meta = index[name]
    path = task_path(tasks_dir, name)
    if (tasks_dir / "index.json").is_file():
        return Task(name, read_bigbench_task(path, meta, fmt), meta, path)
    if fmt != "native":
        raise LorahubValueError(f"task {name!r} in {tasks_dir} is plain input/output JSONL: only the native format applies")
    return Task(name, read_jsonl(path), meta, path)


def split_examples(
    examples: list[Example], *, seed: int = 0, heldout: int = MIN_HELDOUT, heldout_frac: float = 0.1
) -> tuple[list[Example], list[Example]]:
    """Seeded (train, held-out) split; held-out has ``max(heldout, heldout_frac * n)`` examples.

    Raises when fewer than ``heldout + 1`` examples exist: a task must keep its held-out examples
    out of training and still have something to train on.
    """
    if heldout < 0:
        raise LorahubValueError(f"heldout must be >= 0, got {heldout}")
    n_out = max(heldout, int(heldout_frac * len(examples)))
    if len(examples) <= n_out:
        raise LorahubValueError(
            f"a task with {len(examples)} examples cannot keep {n_out} held out and still train; "
            f"give more examples or lower heldout"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = [examples[i] for i in order[:n_out]]
    train = [examples[i] for i in order[n_out:]]
    return train, held
