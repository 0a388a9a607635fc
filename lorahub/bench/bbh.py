"""BIG-Bench Hard with LoraHub's protocol: the data, the split and the prompts (no model here).

Data layout (``lorahub/bench/data/``, package data, vendored from suzgunmirac/BIG-Bench-Hard, MIT; or ``--data-dir``)::

    <task>.json           {"canary": ..., "examples": [{"input": str, "target": str}, ...]}
    task_prefixes.json    {task: one-line description}

Protocol, per task (LoraHub, arXiv 2307.13269, Section 4):

1. ``shots`` (5) learning examples are drawn with a fixed ``split_seed``; the rest, in file order, are the
   test set (``limit`` keeps its first N). All methods and seeds see the same split.
2. Prompt: ``"{description}\\n\\nQ: {input}\\nA:"`` (:func:`lorahub.data.qa_prompt`); the target as given.
   ICL puts the learning examples, as ``"Q: {input}\\nA: {target}"`` blocks, between the description and
   the question.
3. Exact match after ``strip().lower()`` with "." removed (:func:`lorahub.metrics.exact_match`), ×100.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from ..data import Example, qa_prompt
from ..errors import LorahubFileError, LorahubValueError

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"  # lorahub/bench/data, shipped as package data
PREFIXES_FILE = "task_prefixes.json"
PROTOCOL_VERSION = 1  # bump when the split, the prompts or the metric change: old results are then refused
SHOTS = 5  # LoraHub's learning examples per task
SPLIT_SEED = 42
# The tasks lorahub's defaults are tuned on (benchmarks/search_tuning.py): every third BBH task in alphabetical order,
# from the first, fixed before any tuning result was seen. The other 18 are the confirmation set, reported apart.
TUNING_TASKS = ("boolean_expressions", "disambiguation_qa", "geometric_shapes", "logical_deduction_seven_objects",
                "multistep_arithmetic_two", "penguins_in_a_table", "salient_translation_error_detection",
                "temporal_sequences", "tracking_shuffled_objects_three_objects")


@dataclass(frozen=True)
class TaskSplit:
    """One BBH task, split: the learning examples and the test examples (raw questions and targets)."""

    name: str
    description: str
    learn: tuple[Example, ...]  # Example(input=question, output=target)
    test: tuple[Example, ...]
    learn_indices: tuple[int, ...]  # positions in the task file, for the record
    num_examples: int  # in the task file
    all_targets: tuple[str, ...] = ()  # distinct targets of the whole task (max_new_tokens comes from the longest)

    def prompt(self, question: str) -> str:
        """The zero-shot / LoraHub prompt of a question."""
        return qa_prompt(question, self.description)

    def icl_prompt(self, question: str) -> str:
        """The in-context prompt: description, the learning examples as Q/A blocks, then the question."""
        shots = "\n\n".join(f"Q: {ex.input}\nA: {ex.output}" for ex in self.learn)
        return f"{self.description.strip()}\n\n{shots}\n\nQ: {question}\nA:"

    def learning_examples(self) -> list[dict[str, str]]:
        """The few-shot examples that composition (and best-single) sees: prompt and target."""
        return [{"input": self.prompt(ex.input), "output": ex.output} for ex in self.learn]

    @property
    def test_prompts(self) -> list[str]:
        return [self.prompt(ex.input) for ex in self.test]

    @property
    def test_icl_prompts(self) -> list[str]:
        return [self.icl_prompt(ex.input) for ex in self.test]

    @property
    def references(self) -> list[str]:
        return [ex.output for ex in self.test]


def data_dir_or_default(data_dir: str | os.PathLike | None) -> Path:
    path = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
    if not (path / PREFIXES_FILE).is_file():
        hint = "" if data_dir else " (the vendored copy ships inside the package as lorahub/bench/data; pass --data-dir)"
        raise LorahubFileError(f"BBH data folder {path} has no {PREFIXES_FILE}{hint}")
    return path


def task_names(data_dir: str | os.PathLike | None = None) -> list[str]:
    """The tasks of the data folder: each ``<task>.json`` that has a description, sorted."""
    path = data_dir_or_default(data_dir)
    prefixes = _prefixes(path)
    return sorted(p.stem for p in path.glob("*.json") if p.stem in prefixes)


def split_indices(n: int, shots: int = SHOTS, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """(learning indices in draw order, test indices in file order): ``random.Random(seed).sample``."""
    if not 0 < shots < n:
        raise LorahubValueError(f"shots must be between 1 and {n - 1} for a task of {n} examples, got {shots}")
    learn = random.Random(seed).sample(range(n), shots)
    chosen = set(learn)
    return learn, [i for i in range(n) if i not in chosen]


def load_task(name: str, data_dir: str | os.PathLike | None = None, *, shots: int = SHOTS, seed: int = SPLIT_SEED,
              limit: int | None = None) -> TaskSplit:
    """Read one task and split it (``limit``: keep the first N test examples)."""
    path = data_dir_or_default(data_dir)
    prefixes = _prefixes(path)
    file = path / f"{name}.json"
    if name not in prefixes or not file.is_file():
        raise LorahubValueError(f"unknown BBH task {name!r} in {path}. Available: {', '.join(task_names(path))}")
    try:
        rows = json.loads(file.read_text(encoding="utf-8"))["examples"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LorahubValueError(f"{file}: expected {{'examples': [{{'input', 'target'}}, ...]}} ({e})") from None
    examples = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not isinstance(row.get("target"), str):
            raise LorahubValueError(f"{file}: examples[{i}] needs string 'input' and 'target'")
        examples.append(Example(row["input"], row["target"], f"{file} examples[{i}]"))
    learn, test = split_indices(len(examples), shots, seed)
    if limit is not None:
        if limit < 1:
            raise LorahubValueError(f"limit must be a positive number of test examples, got {limit}")
        test = test[:limit]
    return TaskSplit(name, prefixes[name], tuple(examples[i] for i in learn), tuple(examples[i] for i in test),
                     tuple(learn), len(examples), tuple(sorted({ex.output for ex in examples})))


def data_fingerprint(data_dir: str | os.PathLike | None = None) -> str:
    """sha256 (16 hex) over the task files and the descriptions: a changed copy of the data is a new config."""
    path = data_dir_or_default(data_dir)
    h = hashlib.sha256()
    for name in [PREFIXES_FILE] + [f"{t}.json" for t in task_names(path)]:
        h.update(name.encode() + b"\0" + hashlib.sha256((path / name).read_bytes()).digest())
    return h.hexdigest()[:16]


def _prefixes(path: Path) -> dict[str, str]:
    try:
        data = json.loads((path / PREFIXES_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LorahubValueError(f"{path / PREFIXES_FILE} is not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise LorahubValueError(f"{path / PREFIXES_FILE}: expected {{task: description}}")
    return data
