"""BBH harness: the protocol (split, prompts, normalisation), the vendored data, resumable runs, Ray = in process."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from lorahub.bench import bbh
from lorahub.bench.methods import get_method
from lorahub.bench.runner import BBHConfig, read_results, run_bbh
from lorahub.cli import main
from lorahub.errors import LorahubValueError
from lorahub.metrics import exact_match

VENDORED = Path(__file__).resolve().parents[1] / "lorahub" / "bench" / "data"


# -- protocol -------------------------------------------------------------------------------------


def test_split_is_seeded_and_golden():
    learn, test = bbh.split_indices(250, 5, 42)
    assert learn == [163, 28, 6, 189, 70]  # random.Random(42).sample(range(250), 5): pinned
    assert sorted(learn + test) == list(range(250)) and test == sorted(test)
    assert bbh.split_indices(250, 5, 42) == (learn, test)
    assert bbh.split_indices(250, 5, 43)[0] != learn
    with pytest.raises(LorahubValueError, match="shots"):
        bbh.split_indices(5, 5, 42)


def test_vendored_task_prompts_and_limit():
    task = bbh.load_task("boolean_expressions")
    assert task.learn_indices == (163, 28, 6, 189, 70) and len(task.test) == 245 and task.num_examples == 250
    assert task.test[0].input == "not ( True ) and ( True ) is" and task.test[0].output == "False"
    desc = "Evaluate the result of a random Boolean expression."
    assert task.description == desc
    assert task.test_prompts[0] == f"{desc}\n\nQ: not ( True ) and ( True ) is\nA:"
    assert task.learning_examples()[0] == {"input": f"{desc}\n\nQ: not not True and True and not True is\nA:",
                                          "output": "False"}
    icl = task.icl_prompt("True is")
    blocks = icl.split("\n\n")
    assert blocks[0] == desc and blocks[-1] == "Q: True is\nA:" and len(blocks) == 7
    assert blocks[1] == "Q: not not True and True and not True is\nA: False"
    short = bbh.load_task("boolean_expressions", limit=10)
    assert short.test == task.test[:10] and short.learn == task.learn
    with pytest.raises(LorahubValueError, match="unknown BBH task 'nope'.*boolean_expressions"):
        bbh.load_task("nope")


def test_exact_match_normalisation():
    assert exact_match(["True.", " false ", "(A)", "Yes"], ["true", "False", "(a)", "no"]) == 75.0
    assert exact_match(["valid"], ["invalid"]) == 0.0


def test_vendored_data_is_complete_with_licence():
    names = bbh.task_names()
    assert len(names) == 27
    assert (VENDORED / "LICENSE.BIG-Bench-Hard").read_text().startswith("MIT")
    counts = dict(line.split("\t")[:2] for line in (VENDORED / "counts.tsv").read_text().splitlines()[1:])
    for t in names:
        assert len(json.loads((VENDORED / f"{t}.json").read_text())["examples"]) == int(counts[t])


def test_majority_answer_and_top_answer_share():
    from lorahub.bench.methods import majority_answer
    from lorahub.bench.report import top_answer_share

    assert majority_answer(["(B)", "(A)", "(B)", "(C)"]) == "(B)"
    assert majority_answer(["(C)", "(A)", "(A)", "(C)", "(B)"]) == "(C)"  # a tie goes to the first drawn
    assert top_answer_share(["(A)", "(a).", " (B)", "(A)"]) == 75.0  # compared as the metric compares
    assert top_answer_share(["yes", "no"]) == 50.0


def test_a_spec_from_before_the_budget_counted_the_probes_is_refused():
    from lorahub.bench.methods import METHODS

    spec = dict(METHODS["lorahub-default"].spec)
    assert spec["probes_in_budget"] and spec["probe_singles"]
    del spec["probes_in_budget"]  # as in the config.json of runs made before December 2026
    with pytest.raises(LorahubValueError, match="probes the single modules on top of its budget"):
        METHODS["lorahub-default"].prepare(None, None, 1, spec)  # refused before it touches the model or the task


def test_unknown_method_lists_available():
    with pytest.raises(LorahubValueError, match="unknown method 'lorahub'.*zero-shot.*lorahub-default"):
        get_method("lorahub")


# -- runs on a tiny model and hub -------------------------------------------------------------------


@pytest.fixture()
def tiny_bbh(tmp_path) -> Path:
    """Two small BBH-format tasks (12 examples each)."""
    d = tmp_path / "bbh"
    d.mkdir()
    words = ["True", "False"]
    for k, name in enumerate(["alpha", "beta"]):
        ex = [{"input": f"not {words[(i + k) % 2]} and {words[i % 2]} is", "target": words[(i * 7 + k) % 2]} for i in range(12)]
        (d / f"{name}.json").write_text(json.dumps({"canary": "x", "examples": ex}))
    (d / "task_prefixes.json").write_text(json.dumps({"alpha": "Evaluate it.", "beta": "Evaluate it again."}))
    return d


def _argv(out, data, base, modules, *extra):
    return ["bbh", "--out", str(out), "--data-dir", str(data), "--base-model", str(base), "--modules",
            *map(str, modules), "--limit", "3", "--no-progress", *extra]


def test_run_outputs_resume_and_refusals(tiny_bbh, tiny_llama_dir, llama_modules, tmp_path, capsys, monkeypatch):
    import lorahub.models

    loads = []
    load_base = lorahub.models.load_base
    monkeypatch.setattr(lorahub.models, "load_base", lambda *a, **k: loads.append(a) or load_base(*a, **k))
    out = tmp_path / "run"
    argv = _argv(out, tiny_bbh, tiny_llama_dir, llama_modules, "--seeds", "1,2", "--budget", "8",
                 "--adapter", str(llama_modules[0]))
    assert main(argv) == 0
    assert len(loads) == 1  # the base model loads once per process, not per task, method or seed
    rows = read_results(out / "results.jsonl")
    # 2 tasks x (majority, zero-shot, icl, best-single, adapter + 2 seeds x 2 lorahub methods)
    assert len(rows) == 2 * (5 + 2 * 2)
    keys = {(r["task"], r["method"], r["seed"]) for r in rows}
    assert ("alpha", "zero-shot", None) in keys and ("beta", "lorahub-reference", 2) in keys
    assert ("alpha", "adapter:mod0", None) in keys
    by = {(r["task"], r["method"], r["seed"]): r for r in rows}
    ref, default = by[("alpha", "lorahub-reference", 1)], by[("alpha", "lorahub-default", 1)]
    best = by[("alpha", "best-single", None)]
    assert ref["optimizer"] != default["optimizer"] and ref["evals"] == 40
    assert default["evals"] == 8 and default["probe_singles"]  # the budget: the 4 single modules probed, 4 searched
    assert len(ref["weights"]) == 4 and best["evals"] == 4 and list(best["weights"].values()) == [1.0]
    # the reference's objective and draw order; the selection is in every lorahub row
    assert (ref["loss_scale"], ref["candidate_order"], default["loss_scale"]) == ("per-example", "sample", "per-example")
    assert ref["selection"]["selector"] == "random" and default["selection"]["selector"] == "auto"
    assert default["selection"]["ran"] == "random" and default["optimizer"] == "cobyla:Cobyla"  # folders: no embeddings
    assert list(ref["weights"]) == ref["selection"]["modules"] and ref["objective"] < ref["loss"]
    # majority: the learning examples' most common answer to every question, scored against the test targets
    task = bbh.load_task("alpha", tiny_bbh, limit=3)
    learnt = [ex.output for ex in task.learn]
    answer = max(learnt, key=learnt.count)
    maj = by[("alpha", "majority", None)]
    assert maj["predictions"] == [answer] * 3 and maj["answer"] == answer and maj["tokens_per_example"] == 0
    assert maj["em"] == pytest.approx(100 * sum(ex.output == answer for ex in task.test) / 3)
    for r in rows:
        assert r["n_test"] == 3 and len(r["predictions"]) == 3 and r["n_learn"] == 5 and 0 <= r["em"] <= 100
        assert (r["tokens_per_example"] > 0) == (r["method"] != "majority") and r["eval_seconds"] >= 0 and r["config"]
        assert r["machine"].endswith(" threads")  # the CPU's model and torch's thread count
    assert by[("alpha", "icl", None)]["tokens_per_example"] > 3 * by[("alpha", "zero-shot", None)]["tokens_per_example"]
    summary = (out / "summary.md").read_text()
    assert "| Zero-shot |" in summary and "| avg |" in summary and "| best |" in summary and "FLAN-T5-large" in summary
    assert "eval examples/s" in summary and "compose evals/s" in summary and "| alpha | 3 |" in summary
    assert "| Majority answer of the 5 examples (no model) |  |" in summary and "top answer %" in summary
    job_h = sum(r["compose_seconds"] + r["eval_seconds"] for r in rows) / 3600
    assert f"Job time, summed over the {len(rows)} finished jobs that ran: {job_h:.2f} h" in summary
    assert f"Machines: {rows[0]['machine']}." in summary
    pairs = [(by[(t, "lorahub-default", s)]["loss"], by[(t, "lorahub-reference", s)]["loss"])
             for t in ("alpha", "beta") for s in (1, 2)]
    assert (f"reached a lower few-shot loss than `lorahub-reference` on {sum(x < y for x, y in pairs)} of 4 (task, seed)"
            in summary)
    assert (out / "per_task.png").stat().st_size > 1000
    config = json.loads((out / "config.json").read_text())
    assert config["protocol"]["limit"] == 3 and config["methods"]["lorahub-default"]["budget"] == 8

    # rerun: nothing to do; a partial last line (crash mid-write) is dropped; a lost line is rerun
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:-1]) + lines[-1][:40])
    capsys.readouterr()
    assert main(argv) == 0
    assert "1 to run" in capsys.readouterr().out
    again = read_results(out / "results.jsonl")
    assert len(again) == len(rows) and again[:-1] == rows[:-1]
    assert main(argv) == 0 and "0 to run" in capsys.readouterr().out

    # more seeds: only the new jobs run
    assert main(argv[:-6] + ["--seeds", "1,2,3", "--budget", "8"]) == 0
    assert "4 to run" in capsys.readouterr().out

    # a changed configuration is refused, nothing written
    before = (out / "results.jsonl").read_bytes()
    assert main(_argv(out, tiny_bbh, tiny_llama_dir, llama_modules, "--limit", "4", "--methods", "zero-shot")) == 2
    assert "different configuration (limit: 3 -> 4)" in capsys.readouterr().err
    assert main(_argv(out, tiny_bbh, tiny_llama_dir, llama_modules, "--methods", "lorahub-default", "--budget", "16")) == 2
    assert "method 'lorahub-default' already has results with other settings (budget: 8 -> 16)" in capsys.readouterr().err
    assert main(_argv(out, tiny_bbh, tiny_llama_dir, llama_modules[:3], "--methods", "best-single")) == 2
    assert "'best-single' already has results with other settings (hub:" in capsys.readouterr().err
    assert (out / "results.jsonl").read_bytes() == before


def test_reuse_from_copies_hub_independent_rows(tiny_bbh, tiny_llama_dir, llama_modules, tmp_path, capsys):
    """--reuse-from: the rows of methods that do not use the hub come from the earlier run, as they were; the
    hub's methods run; a different protocol is refused before anything is written."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(_argv(first, tiny_bbh, tiny_llama_dir, llama_modules, "--methods", "zero-shot,best-single")) == 0
    old = {(r["task"], r["method"]): r for r in read_results(first / "results.jsonl")}
    capsys.readouterr()
    argv = _argv(second, tiny_bbh, tiny_llama_dir, llama_modules[:3], "--methods", "zero-shot,best-single",
                 "--reuse-from", str(first))
    assert main(argv) == 0
    assert "2 rows reused from" in capsys.readouterr().out
    rows = read_results(second / "results.jsonl")
    reused = [r for r in rows if r.get("reused_from")]
    assert sorted(r["method"] for r in rows) == ["best-single"] * 2 + ["zero-shot"] * 2
    assert {r["method"] for r in reused} == {"zero-shot"}  # best-single uses the hub (another one here): rerun
    for r in reused:
        assert {k: v for k, v in r.items() if k != "reused_from"} == old[(r["task"], "zero-shot")]
    assert main(argv) == 0 and len(read_results(second / "results.jsonl")) == 4  # nothing copied twice
    third = tmp_path / "third"
    assert main(_argv(third, tiny_bbh, tiny_llama_dir, llama_modules, "--methods", "zero-shot", "--limit", "2",
                      "--reuse-from", str(first))) == 2
    assert "a different protocol (limit: 3 vs 2)" in capsys.readouterr().err
    assert not (third / "results.jsonl").exists()


def test_seeds_that_change_nothing_are_copied_not_rerun(tiny_bbh, tiny_llama_dir, llama_modules, tmp_path, capsys):
    """lorahub-probe (candidates by probe loss, Cobyla) uses no randomness: seed 1 runs, seeds 2-3 copy its rows,
    and a run of seed 3 alone computes the same result; the reference (random draw) runs every seed."""
    out, alone = tmp_path / "copied", tmp_path / "alone"
    argv = _argv(out, tiny_bbh, tiny_llama_dir, llama_modules, "--methods", "lorahub-probe,lorahub-reference",
                 "--seeds", "1,2,3", "--tasks", "alpha")
    assert main(argv) == 0
    assert "lorahub-probe: the seed changes nothing here" in capsys.readouterr().out
    rows = {(r["method"], r["seed"]): r for r in read_results(out / "results.jsonl")}
    assert len(rows) == 6 and all(rows[("lorahub-reference", s)].get("same_as_seed") is None for s in (1, 2, 3))
    assert rows[("lorahub-probe", 1)].get("same_as_seed") is None
    for s in (2, 3):
        assert rows[("lorahub-probe", s)]["same_as_seed"] == 1
        assert rows[("lorahub-probe", s)]["weights"] == rows[("lorahub-probe", 1)]["weights"]
    assert main(_argv(alone, tiny_bbh, tiny_llama_dir, llama_modules, "--methods", "lorahub-probe", "--seeds", "3",
                      "--tasks", "alpha")) == 0
    real = read_results(alone / "results.jsonl")[0]
    assert real["weights"] == rows[("lorahub-probe", 3)]["weights"]
    assert real["predictions"] == rows[("lorahub-probe", 3)]["predictions"]
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)  # a copy lost in a crash is made again
    (out / "results.jsonl").write_text("".join(l for l in lines if '"same_as_seed": 1' not in l or '"seed": 2,' not in l))
    assert len(read_results(out / "results.jsonl")) == 5
    summary = (out / "summary.md").read_text()  # the copies cost nothing: out of the job time, in every table
    assert "4 finished jobs that ran (2 more rows are copies of a seed that changes nothing)" in summary
    probe = rows[("lorahub-probe", 1)]
    assert f"| {probe['compose_seconds']:.1f} | {probe['compose_seconds']:.1f} | {probe['eval_seconds']:.1f} |" in summary
    assert main(argv) == 0 and len(read_results(out / "results.jsonl")) == 6


def test_ray_results_equal_in_process(tiny_bbh, tiny_llama_dir, llama_modules, tmp_path):
    import ray  # noqa: F401  (in the test extra: this test must run in CI, never skip)
    common = dict(tasks=None, methods=["zero-shot", "best-single", "lorahub-default"], seeds=[1, 2], limit=3,
                  base_model=str(tiny_llama_dir), hub=[str(m) for m in llama_modules], budget=8,
                  data_dir=str(tiny_bbh), device="cpu", threads=1, progress=False)
    local = run_bbh(BBHConfig(out=str(tmp_path / "local"), **common), log=lambda s: None)
    remote = run_bbh(BBHConfig(out=str(tmp_path / "ray"), ray=True, ray_actors=1, **common), log=lambda s: None)
    key = lambda r: (r["task"], r["method"], str(r["seed"]))  # noqa: E731
    assert len(local) == len(remote) == 2 * (2 + 2)
    for a, b in zip(sorted(local, key=key), sorted(remote, key=key)):
        assert key(a) == key(b)
        assert a["predictions"] == b["predictions"] and a["em"] == b["em"] and a["evals"] == b["evals"]
        assert a.get("weights", {}).keys() == b.get("weights", {}).keys()
        for n, w in a.get("weights", {}).items():
            assert b["weights"][n] == pytest.approx(w, rel=1e-4, abs=1e-6)
    assert json.loads((tmp_path / "ray" / "config.json").read_text())["fingerprint"] == \
        json.loads((tmp_path / "local" / "config.json").read_text())["fingerprint"]


def _mixlora_folder(tiny_llama_dir, out: Path) -> Path:
    """A MixLoRA model (random non-zero experts and routers) saved for the tiny Llama of ``tiny_llama_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorahub.mixlora import MixLoraConfig, attach_mixlora, save_mixlora

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    cfg = MixLoraConfig(num_experts=4, top_k=2, r=4, dropout=0.0)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in attach_mixlora(model, cfg):
            p.copy_(torch.randn_like(p) * 0.3)
    return save_mixlora(model, cfg, out)


def test_mixlora_adapter_row_and_refusals(tiny_bbh, tiny_llama_dir, llama_modules, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorahub.generate import generate
    from lorahub.mixlora import load_mixlora, mixlora_layers, predict_mixlora

    mix = _mixlora_folder(tiny_llama_dir, tmp_path / "mix")
    out = tmp_path / "run"
    assert main(_argv(out, tiny_bbh, tiny_llama_dir, llama_modules, "--methods", "zero-shot", "--adapter", str(mix))) == 0
    rows = {(r["task"], r["method"]): r for r in read_results(out / "results.jsonl")}
    row = rows[("alpha", "adapter:mix")]
    assert row["kind"] == "mixlora" and len(row["predictions"]) == 3

    # independent: the same prompts, one at a time, on a fresh base with the MixLoRA model attached by hand
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = list(bbh.load_task("alpha", tiny_bbh, limit=3).test_prompts)
    with torch.no_grad():
        base_before = model(torch.tensor([[5, 6, 7]])).logits
        batched = predict_mixlora(model, tok, mix, prompts, max_new_tokens=row["max_new_tokens"], batch_size=3)
        assert not mixlora_layers(model)  # the base comes back plain
        assert torch.equal(model(torch.tensor([[5, 6, 7]])).logits, base_before)
        load_mixlora(model, mix)
        single = [generate(model, tok, [p], max_new_tokens=row["max_new_tokens"])[0] for p in prompts]
    assert batched == single == row["predictions"]
    assert row["predictions"] != rows[("alpha", "zero-shot")]["predictions"]  # the experts do change the answers

    # the composer and the merged export refuse a MixLoRA folder, saying why
    capsys.readouterr()
    (tmp_path / "x.jsonl").write_text('{"input": "Q: 1?\\nA:", "output": "1"}\n')
    assert main(["compose", "--examples", str(tmp_path / "x.jsonl"), "--base-model", str(tiny_llama_dir), "--modules", str(mix), "--out", str(tmp_path / "c")]) == 2
    from lorahub.store import read_module

    with pytest.raises(LorahubValueError, match=r"MixLoRA model.*per token.*cannot be folded"):
        read_module(mix)
    assert "MixLoRA model" in capsys.readouterr().err
    assert main(["merge", str(mix), "--out", str(tmp_path / "merged")]) == 2
    assert "MixLoRA model" in capsys.readouterr().err and not (tmp_path / "merged").exists()


def test_merge_cli_writes_the_merged_model(tiny_llama_dir, llama_modules, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert main(["merge", str(llama_modules[0]), "--out", str(tmp_path / "m"), "--base-model", str(tiny_llama_dir),
                 "--device", "cpu"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "merged")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), llama_modules[0]).eval()
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft(ids).logits, atol=1e-4, rtol=1e-4)


def test_partial_run_report_compares_on_complete_tasks_only(tmp_path, capsys):
    """--report-only on a run still in progress: rows average over the tasks every method finished; nothing
    is run and the results file (its unfinished last line included) is left exactly as it is."""
    out = tmp_path / "run"
    out.mkdir()
    protocol = {"benchmark": "bbh", "shots": 5, "split_seed": 42, "limit": None, "base_model": "m", "dtype": "float32"}
    (out / "config.json").write_text(json.dumps({"protocol": protocol, "methods": {}}))
    em = {("a", "zero-shot", None): 10.0, ("a", "lorahub-default", 1): 40.0, ("a", "lorahub-default", 2): 60.0,
          ("b", "zero-shot", None): 30.0, ("b", "lorahub-default", 1): 70.0, ("b", "lorahub-default", 2): 90.0,
          ("c", "zero-shot", None): 0.0, ("c", "lorahub-default", 1): 100.0}  # task c: seed 2 still running
    rows = [{"task": t, "method": m, "seed": s, "em": v, "n_test": 4, "n_learn": 5, "tokens_per_example": 9.0,
             "compose_seconds": 1.0, "eval_seconds": 2.0, "evals": 3} for (t, m, s), v in em.items()]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"task": "c", "meth'  # a line being written
    (out / "results.jsonl").write_text(text)
    assert main(["bbh", "--out", str(out), "--report-only"]) == 0
    assert (out / "results.jsonl").read_text() == text
    summary = (out / "summary.md").read_text()
    assert "**Partial run**: 2 of the 3 tasks" in summary and "every method and seed finished: 2 (BBH has 27)" in summary
    zs = (10.0 + 30.0) / 2
    avg, best = ((40 + 60) / 2 + (70 + 90) / 2) / 2, (60.0 + 90.0) / 2
    assert f"| Zero-shot |  | {zs:.1f} | 2 |" in summary
    assert f"| avg | {avg:.1f} | 2 | 1,2 |" in summary and f"| best | {best:.1f} | 2 | 1,2 |" in summary
    assert "| c | 4 | 0.0 | 100.0 (1 of 2 seeds) |" in summary  # the per-task table shows every finished job
    # --methods: the summary of those methods alone (zero-shot has finished all 3 tasks)
    assert main(["bbh", "--out", str(out), "--report-only", "--methods", "zero-shot"]) == 0
    summary = (out / "summary.md").read_text()
    assert "every method and seed finished: 3 (BBH has 27)" in summary and "**Partial run**" not in summary
    assert f"| Zero-shot |  | {(10.0 + 30.0 + 0.0) / 3:.1f} | 3 |" in summary and "| avg |" not in summary
    assert "Not in this summary (`--report-only --methods`): lorahub-default (5 rows)." in summary
    assert main(["bbh", "--out", str(out), "--report-only", "--methods", "icl"]) == 2
    assert "has no results of icl" in capsys.readouterr().err
    assert (out / "results.jsonl").read_text() == text
    with pytest.raises(LorahubValueError, match="no config.json"):
        from lorahub.bench.runner import report_bbh

        report_bbh(tmp_path / "nothing", log=lambda s: None)


def test_tuning_tasks_are_every_third_task():
    names = sorted(bbh.task_names())
    assert list(bbh.TUNING_TASKS) == names[0::3] and len(names) == 27


def test_search_lines_split_exact_match_by_loss_and_choose_seeds_by_objective():
    from lorahub.bench.report import search_comparison, seed_choice, summary_markdown

    def row(task, method, seed, em, loss, objective=None):
        return {"task": task, "method": method, "seed": seed, "em": em, "loss": loss, "n_test": 10, "n_learn": 5,
                "objective": loss / 5 if objective is None else objective,
                "tokens_per_example": 10.0, "compose_seconds": 1.0, "eval_seconds": 1.0, "evals": 40}
    # (task, seed): default's (em, loss), reference's (em, loss)
    cases = {("navigate", 1): ((60.0, 0.5), (50.0, 0.9)), ("navigate", 2): ((40.0, 0.5), (55.0, 0.4)),
             ("snarks", 1): ((30.0, 0.2), (20.0, 0.3)), ("snarks", 2): ((30.0, 0.2), (10.0, 0.2))}
    rows = [r for (t, s), (d, ref) in cases.items()
            for r in (row(t, "lorahub-default", s, *d), row(t, "lorahub-reference", s, *ref))]
    line = search_comparison(rows)[1]
    # default's loss lower on (navigate, 1) and (snarks, 1): +10 and +10; not lower (a tie counts here): -15, +20
    assert "on 2 of 4 (task, seed) pairs" in line and "mean best loss 0.350 vs 0.450" in line
    assert "where its loss was lower +10.00 (2 pairs); elsewhere +2.50 (2 pairs)" in line
    # the reference's seed of lowest objective (loss / 5): navigate seed 2 (55), snarks seed 2 (10)
    c = seed_choice(rows, "lorahub-reference")
    assert c == {"method": "lorahub-reference", "tasks": 2, "chosen": 32.5, "mean": 33.75, "best": 37.5}
    # the objective decides, not the loss: make navigate seed 1 the lowest objective though its loss is higher
    rows[1] = row("navigate", "lorahub-reference", 1, 50.0, 0.9, objective=0.01)
    assert seed_choice(rows, "lorahub-reference")["chosen"] == 30.0
    # a copied seed (same_as_seed) is not a choice: one seed left per task means nothing to choose from
    copies = [{**r, "same_as_seed": 1} if r["seed"] == 2 else r for r in rows]
    assert seed_choice(copies, "lorahub-reference") is None
    text = summary_markdown(rows, {"base_model": "m", "dtype": "float32", "shots": 5, "split_seed": 42}, {})
    assert "Seeds of `lorahub-reference` chosen by the few-shot objective (the lowest per task, 2 tasks): 30.0" in text


def test_paired_difference_counts_and_intervals():
    from lorahub.bench.report import paired_difference, summary_markdown

    rows, diffs = [], {}
    for i, task in enumerate(["boolean_expressions", "navigate", "snarks", "web_of_lies"]):
        for seed in (1, 2, 3):
            d = [4.0, -2.0, 0.0, 6.0][i] + seed  # per-pair differences, written out below
            diffs[(task, seed)] = d
            for method, em in (("lorahub-default", 50.0 + d), ("lorahub-reference", 50.0)):
                rows.append({"task": task, "method": method, "seed": seed, "em": em, "n_test": 10, "n_learn": 5,
                             "tokens_per_example": 10.0, "compose_seconds": 1.0, "eval_seconds": 1.0, "evals": 40})
    p = paired_difference(rows, "lorahub-default", "lorahub-reference")
    values = sorted(diffs.values())
    assert (p["pairs"], p["tasks"]) == (12, 4)
    assert (p["wins"], p["losses"], p["ties"]) == (sum(v > 0 for v in values), sum(v < 0 for v in values), sum(v == 0 for v in values))
    assert p["mean"] == pytest.approx(sum(values) / 12)
    for lo, hi in (p["ci_pairs"], p["ci_tasks"]):
        assert min(values) <= lo < p["mean"] < hi <= max(values)
    # whole tasks resampled: the task means are 6, 0, 2, 8, so the interval can't reach past them
    assert p["ci_tasks"][0] >= 0.0 and p["ci_tasks"][1] <= 8.0
    assert paired_difference(rows, "lorahub-default", "icl") is None
    text = summary_markdown(rows, {"base_model": "m", "dtype": "float32", "shots": 5, "split_seed": 42}, {})
    assert "## Paired comparison" in text and "wins 10, loses 1, ties 1" in text
    # boolean_expressions is a tuning task (its default: 50 + 4 + seed, mean 56), the other three confirm
    confirm = statistics.mean(50.0 + d for (t, _), d in diffs.items() if t != "boolean_expressions")
    ref, default = (get_method(m).label for m in ("lorahub-reference", "lorahub-default"))
    assert f"| {ref} | avg | 50.0 | 50.0 |" in text and f"| {default} | avg | 56.0 | {confirm:.1f} |" in text
    # in a partial run the split averages over the finished tasks only, as the table does
    unfinished = [r for r in rows if not (r["task"] == "navigate" and r["seed"] == 3 and r["method"] == "lorahub-default")]
    text = summary_markdown(unfinished, {"base_model": "m", "dtype": "float32", "shots": 5, "split_seed": 42}, {})
    confirm = statistics.mean(50.0 + d for (t, _), d in diffs.items() if t in ("snarks", "web_of_lies"))
    assert f"| {default} | avg | 56.0 | {confirm:.1f} |" in text
