"""BIG-bench reader: prompt prefixes, choices, bad lines named by file and line, the held-out split."""

from __future__ import annotations

import json

import pytest

from lorahub.bigbench import list_tasks, read_task, split_examples
from lorahub.data import Example, format_example
from lorahub.errors import LorahubValueError


def write_pool(root, tasks: dict[str, tuple[dict, list]]):
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    (root / "index.json").write_text(json.dumps({n: meta for n, (meta, _) in tasks.items()}))
    for n, (_, rows) in tasks.items():
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        (root / "tasks" / f"{n}.jsonl").write_text("\n".join(lines) + "\n")
    return root


ROW = {"input": "What is 2 plus 3?", "target": "5", "targets": ["5"], "choices": ["4", "5"]}


def test_default_prefixes_and_appended_choices(tmp_path):
    write_pool(tmp_path, {"t": ({"kind": "multiple_choice"}, [ROW])})
    ex = read_task(tmp_path, "t").examples[0]
    # BIG-bench defaults: "\nQ: ", "\n  choice: ", "\nA: "; the leading newline is stripped
    assert ex.input == "Q: What is 2 plus 3?\n  choice: 4\n  choice: 5\nA: "
    assert ex.output == "5"
    prompt, target = format_example(ex.input, ex.output, seq2seq=False)
    assert (prompt, target) == ("Q: What is 2 plus 3?\n  choice: 4\n  choice: 5\nA:", " 5")


def test_custom_prefixes_and_no_choices(tmp_path):
    meta = {
        "task_prefix": "Add the numbers.\n", "example_input_prefix": "\nProblem: ", "example_output_prefix": "\nSum: ",
        "choice_prefix": "\n option: ", "append_choices_to_input": "false",  # a string, as in index.json
    }
    meta2 = {**meta, "append_choices_to_input": True, "task_prefix": "\n\nLead. "}
    write_pool(tmp_path, {"a": (meta, [ROW]), "b": (meta2, [ROW]), "c": ({}, [{**ROW, "choices": None}])})
    assert read_task(tmp_path, "a").examples[0].input == "Add the numbers.\n\nProblem: What is 2 plus 3?\nSum: "
    assert read_task(tmp_path, "b").examples[0].input == (
        "Lead. \nProblem: What is 2 plus 3?\n option: 4\n option: 5\nSum: "
    )
    assert read_task(tmp_path, "c").examples[0].input == "Q: What is 2 plus 3?\nA: "
    assert list(list_tasks(tmp_path)) == ["a", "b", "c"]


def test_bad_line_names_file_and_line(tmp_path):
    write_pool(tmp_path, {"bad": ({}, [ROW, ROW, "{not json"]), "empty": ({}, [ROW, {**ROW, "target": ""}])})
    with pytest.raises(LorahubValueError, match=r"bad\.jsonl:3: not valid JSON"):
        read_task(tmp_path, "bad")
    with pytest.raises(LorahubValueError, match=r"empty\.jsonl:2: 'target'"):
        read_task(tmp_path, "empty")
    with pytest.raises(LorahubValueError, match="unknown task 'nope'"):
        read_task(tmp_path, "nope")


def test_plain_jsonl_folder(tmp_path):
    (tmp_path / "copy.jsonl").write_text(json.dumps({"input": "Say hi\n", "output": "hi"}) + "\n")
    assert list(list_tasks(tmp_path)) == ["copy"]
    assert read_task(tmp_path, "copy").examples == [Example("Say hi\n", "hi")]


def test_split_is_seeded_disjoint_and_keeps_50_out():
    exs = [Example(f"q{i}", f"a{i}") for i in range(120)]
    train, held = split_examples(exs, seed=3)
    assert len(held) >= 50 and len(train) + len(held) == 120
    assert not set(train) & set(held)
    assert split_examples(exs, seed=3) == (train, held)
    assert split_examples(exs, seed=4)[1] != held
    assert len(split_examples([Example(f"q{i}", "a") for i in range(1000)])[1]) == 100  # 10% when larger
    with pytest.raises(LorahubValueError, match="cannot keep 50 held out"):
        split_examples(exs[:50])


def test_shared_pool_reads_when_present():
    from pathlib import Path

    pool = Path(__file__).resolve().parents[2] / "shared" / "bigbench"
    if not (pool / "index.json").is_file():
        pytest.skip("shared BIG-bench pool not on this machine")
    task = read_task(pool, "arithmetic__2_digit_addition")
    assert task.examples[0].input.startswith("Q: What is ") and "\n  choice: " in task.examples[0].input
    assert task.examples[0].input.endswith("\nA: ")
