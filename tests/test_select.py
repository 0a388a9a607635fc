"""Candidate selection (lorahub/select.py): the registry, each selector, determinism, and what gets recorded."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import EXAMPLES
from lorahub.api import compose
from lorahub.data import as_examples
from lorahub.errors import LorahubValueError
from lorahub.evaluate import PopulationEvaluator
from lorahub.optimize import SearchConfig
from lorahub.select import SELECTORS, SelectionTask, cached_embedder, get_selector, probe_losses, select_candidates
from lorahub.store import ModuleStore, write_manifest

# four clearly different tasks: (training inputs a module's embedding is made of, new examples of the task)
TASKS = {
    "past_tense": (["Today I walk. Yesterday I", "Today I jump. Yesterday I", "Today they play. Yesterday they",
                    "Today we cook. Yesterday we", "Today she talks. Yesterday she", "Today I dance. Yesterday I"],
                   [("Today I climb. Yesterday I", "climbed"), ("Today he paints. Yesterday he", "painted"),
                    ("Today we laugh. Yesterday we", "laughed")]),
    "arithmetic": (["What is 3 plus 4?", "What is 12 minus 5?", "What is 7 times 6?", "What is 20 divided by 4?",
                    "What is 9 plus 8?", "What is 15 minus 9?"],
                   [("What is 2 plus 2?", "4"), ("What is 11 minus 3?", "8"), ("What is 5 times 3?", "15")]),
    "colors": (["What color is the sky on a clear day?", "What color is fresh grass?", "What color is a ripe banana?",
                "What color is snow?", "What color is a ripe tomato?", "What color is coal?"],
               [("What color are most leaves in summer?", "green"), ("What color is milk?", "white"),
                ("What color is a lemon?", "yellow")]),
    "sentiment": (["Review: I loved every minute of this film. Sentiment:", "Review: Terrible, a waste of money. Sentiment:",
                   "Review: The food was delicious and the staff friendly. Sentiment:",
                   "Review: I will never come back here. Sentiment:", "Review: An absolute masterpiece. Sentiment:",
                   "Review: Boring and far too long. Sentiment:"],
                  [("Review: What a wonderful, moving story. Sentiment:", "positive"),
                   ("Review: The worst service I have ever had. Sentiment:", "negative"),
                   ("Review: Great value, I recommend it. Sentiment:", "positive")]),
}


@pytest.fixture()
def store(llama_modules) -> ModuleStore:
    s = ModuleStore()
    for p in llama_modules:
        s.add_path(p)
    return s


@pytest.fixture()
def embedded_hub(llama_modules, tiny_llama_dir, tmp_path) -> ModuleStore:
    """A manifest of the 4 tiny modules, one per task of TASKS, with real task embeddings (all-MiniLM-L6-v2)."""
    from lorahub.embed import DEFAULT_EMBEDDER, task_embedding, write_embeddings

    manifest = tmp_path / "tiny-hub.json"
    data = {"name": "tiny-hub", "base_model": str(tiny_llama_dir),
            "modules": [{"name": task, "location": str(path), "task": task} for task, path in zip(TASKS, llama_modules)]}
    embedder = cached_embedder(DEFAULT_EMBEDDER)
    vectors = {task: task_embedding(embedder, train) for task, (train, _) in TASKS.items()}
    write_embeddings(data, manifest, vectors, {t: len(TASKS[t][0]) for t in TASKS}, DEFAULT_EMBEDDER)
    write_manifest(manifest, data)
    return ModuleStore.from_manifest(manifest)


def examples_of(task: str) -> list[dict]:
    return [{"input": i, "output": o} for i, o in TASKS[task][1]]


def test_registry_and_unknown_names():
    assert list(SELECTORS) == ["random", "retrieve", "probe", "retrieve+probe", "format+retrieve", "auto"]
    with pytest.raises(LorahubValueError, match=r"unknown selector 'nope'. Available: random, retrieve, probe, "
                                                r"retrieve\+probe, format\+retrieve, auto"):
        get_selector("nope")
    with pytest.raises(LorahubValueError, match="unknown selector 'nope'"):
        SearchConfig(select="nope")
    with pytest.raises(LorahubValueError, match="unknown candidate order 'x'. Available: store, sample"):
        SearchConfig(candidate_order="x")
    with pytest.raises(LorahubValueError, match="unknown loss_scale 'x'. Available: token-mean, per-example"):
        SearchConfig(loss_scale="x")
    # compose refuses before it loads anything (this hub does not exist)
    with pytest.raises(LorahubValueError, match="unknown selector"):
        compose(EXAMPLES, "no-such-hub", select="nope")


def test_random_is_lorahubs_draw(store):
    task = SelectionTask(as_examples(EXAMPLES))
    a, b = (select_candidates("random", store, 2, 7, task) for _ in range(2))
    assert a.names == b.names == random.Random(7).sample(store.names, 2)  # same seed, same draw, in draw order
    assert a.ordered("store", store) == store.select(2, 7) and a.ordered("sample", store) == a.names
    assert len({tuple(select_candidates("random", store, 2, s, task).names) for s in range(10)}) > 1
    assert sorted(select_candidates("random", store, 10, 0, task).names) == sorted(store.names)  # k >= N: all
    with pytest.raises(LorahubValueError, match="num_candidates must be a positive integer"):
        select_candidates("random", store, 0, 0, task)


def test_probe_keeps_the_lowest_single_module_losses(store, tiny_llama):
    model, tok = tiny_llama
    examples = as_examples(EXAMPLES)
    with PopulationEvaluator(model, tok, store.stack(store.names, model), examples) as ev:
        alone = dict(zip(store.names, ev.score(torch.eye(len(store))).tolist()))
    task = SelectionTask(examples, model, tok)
    sel = select_candidates("probe", store, 2, 0, task)
    assert sel.names == sorted(alone, key=alone.get)[:2] and sel.evaluations == 4
    assert sel.scores["probe_loss"] == pytest.approx(alone, abs=1e-6)
    assert probe_losses(store, store.names, task, chunk=1) == pytest.approx(alone, abs=1e-6)  # stacked in chunks
    assert select_candidates("probe", store, 2, 5, task).names == sel.names  # deterministic


def test_retrieve_ranks_a_tasks_module_first(embedded_hub):
    for task in TASKS:
        sel = select_candidates("retrieve", embedded_hub, 1, 0, SelectionTask(as_examples(examples_of(task))))
        sims = sel.scores["similarity"]
        assert sel.names == [task], sims
        assert sims[task] > max(v for n, v in sims.items() if n != task) + 0.3  # measured: 0.82-0.89 vs <= 0.19
        assert sel.info["embedder"].endswith("all-MiniLM-L6-v2")


def test_format_retrieve_puts_the_answer_format_first(embedded_hub):
    from lorahub.bigbench import answer_format

    assert answer_format(["(A)", " (C) ", "(K)"]) == "letters"
    assert answer_format(["(A)", "yes"]) == answer_format(["A"]) == answer_format([]) == "native"  # half: native
    # one written-out target among letters (BBH movie_recommendation's few-shot draw) leaves the format letters
    assert answer_format(["Monsters, Inc", "(D)", "(C)", "(B)", "(D)"]) == "letters"
    assert answer_format(["(A)", "yes", "no"]) == "native"
    embedded_hub.specs["colors"].extra["format"] = "letters"  # as a TASK--letters module's manifest entry says
    lettered = [{"input": i, "output": o} for i, o in [("What is 2 plus 2?\nOptions:\n(A) 4\n(B) 5", "(A)"),
                                                      ("What is 5 times 3?\nOptions:\n(A) 8\n(B) 15", "(B)")]]
    task = SelectionTask(as_examples(lettered))
    sel = select_candidates("format+retrieve", embedded_hub, 2, 0, task)
    plain = select_candidates("retrieve", embedded_hub, 4, 0, task)
    assert plain.names[0] == "arithmetic" and plain.names.index("colors") > 0  # by similarity alone
    assert sel.names == ["colors", "arithmetic"]  # the one letters module first, then by similarity
    assert sel.info["answer_format"] == "letters" and sel.info["in_format"] == 1
    native = select_candidates("format+retrieve", embedded_hub, 4, 0, SelectionTask(as_examples(examples_of("colors"))))
    assert native.info["answer_format"] == "native" and native.names[-1] == "colors"  # out of format: last


def test_auto_retrieves_where_it_can_and_draws_where_it_cannot(embedded_hub, store):
    """auto = format+retrieve on a hub with module embeddings, LoraHub's random draw on plain module folders;
    the record names the selector that ran."""
    task = SelectionTask(as_examples(examples_of("arithmetic")))
    on_hub = select_candidates("auto", embedded_hub, 2, 0, task)
    assert on_hub.selector == "auto" and on_hub.info["ran"] == "format+retrieve"
    assert on_hub.names == select_candidates("format+retrieve", embedded_hub, 2, 0, task).names
    assert on_hub.names[0] == "arithmetic" and on_hub.record()["ran"] == "format+retrieve"
    on_folders = select_candidates("auto", store, 2, 7, task)
    assert on_folders.info["ran"] == "random" and on_folders.names == random.Random(7).sample(store.names, 2)


def test_compose_records_the_selection(embedded_hub, tiny_llama, tmp_path):
    pair = tiny_llama
    settings = dict(num_candidates=2, budget=4, population=2, optimizer="cma", progress=False, seed=3)
    comp = compose(examples_of("colors"), embedded_hub, pair, select="retrieve", **settings)
    sel = comp.record["selection"]
    assert sel["selector"] == "retrieve" and sel["modules"][0] == "colors" and len(sel["scores"]["similarity"]) == 4
    assert comp.record["modules"] == sel["modules"]  # the selector's order (default), most similar first
    again = compose(examples_of("colors"), embedded_hub, pair, select="retrieve", **settings)
    assert again.record["selection"] == {**sel, "seconds": again.record["selection"]["seconds"]}
    assert again.weights == comp.weights  # same seed: same selection, same weights
    stored = compose(examples_of("colors"), embedded_hub, pair, select="retrieve", candidate_order="store", **settings)
    assert stored.record["modules"] == [n for n in embedded_hub.names if n in sel["modules"]]
    assert stored.record["candidate_order"] == "store"
    saved = json.loads((comp.save(tmp_path / "out") / "lorahub.json").read_text())
    assert saved["selection"]["scores"]["similarity"] == pytest.approx(sel["scores"]["similarity"])
    assert saved["loss_scale"] == "per-example" and saved["candidate_order"] == "sample"

    both = compose(examples_of("colors"), embedded_hub, pair, select="retrieve+probe", num_candidates=1,
                   budget=2, population=2, optimizer="ngopt", progress=False)
    sel = both.record["selection"]
    pool = sel["scores"]["probe_loss"]
    assert len(pool) == 2 and sel["evaluations"] == 2 and sel["pool"] == 2  # retrieve 2k, probe them, keep k
    assert set(pool) == set(sorted(sel["scores"]["similarity"], key=lambda n: -sel["scores"]["similarity"][n])[:2])
    assert sel["modules"] == [min(pool, key=pool.get)] == both.record["modules"]


def test_retrieve_needs_embeddings(store, embedded_hub, tmp_path):
    task = SelectionTask(as_examples(EXAMPLES))
    with pytest.raises(LorahubValueError, match="needs a hub manifest with module embeddings"):
        select_candidates("retrieve", store, 2, 0, task)  # module folders, no manifest
    bare = tmp_path / "bare.json"
    write_manifest(bare, {"name": "bare", "modules": [{"name": "a", "location": str(tmp_path)}]})
    with pytest.raises(LorahubValueError, match="has no module embeddings; add them with `lorahub hub embed bare`"):
        select_candidates("retrieve", ModuleStore.from_manifest(bare), 1, 0, task)
    data = dict(embedded_hub.manifest_data)
    data["modules"] = data["modules"] + [{"name": "new", "location": str(tmp_path)}]
    grown = tmp_path / "tiny-hub.json"  # a module added after the embeddings were computed
    write_manifest(grown, data)
    with pytest.raises(LorahubValueError, match="1 module\\(s\\) have no embedding \\(e.g. new\\)"):
        select_candidates("retrieve", ModuleStore.from_manifest(grown), 1, 0, task)


def test_cli_flags(capsys):
    from lorahub.cli import main

    with pytest.raises(SystemExit):
        main(["compose", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--select" in text and "--candidate-order" in text and "--loss-scale" in text
    assert "(default: auto)" in text and "(default: per-example)" in text and "(default: cobyla)" in text
