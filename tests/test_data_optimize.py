"""Examples, prompt formatting, JSONL errors, and the nevergrad search loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorahub.data import as_examples, encode, format_example, read_jsonl
from lorahub.errors import LorahubValueError
from lorahub.metrics import exact_match
from lorahub.optimize import search


def test_format_moves_trailing_space_to_answer():
    assert format_example("Q: x\nA: ", "yes", seq2seq=False) == ("Q: x\nA:", " yes")
    assert format_example("Q: x\nA:\n", "yes", seq2seq=False) == ("Q: x\nA:\n", "yes")
    assert format_example("in ", "out", seq2seq=True) == ("in ", "out")


def test_encode_masks_prompt_and_padding(tokenizer):
    ex = as_examples([("Q: 1+1?\nA:", "2"), ("Q: a much longer question here?\nA:", "no idea")])
    b = encode(tokenizer, ex, seq2seq=False)
    for i, e in enumerate(ex):
        target = tokenizer(" " + e.output, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        assert b.labels[i][b.labels[i] != -100].tolist() == target
    assert (b.labels[b.attention_mask == 0] == -100).all()


def test_read_jsonl_names_bad_line(tmp_path):
    f = tmp_path / "ex.jsonl"
    f.write_text('{"input": "a", "output": "b"}\n{"input": "c", "output": ""}\n')
    with pytest.raises(LorahubValueError, match=r"ex.jsonl:2: 'output' is empty"):
        read_jsonl(f)
    f.write_text('{"input": "a", "output": "b"}\nnot json\n')
    with pytest.raises(LorahubValueError, match=r"ex.jsonl:2: not valid JSON"):
        read_jsonl(f)


def test_exact_match_normalisation():
    assert exact_match([" Yes.", "no"], ["yes", "No"]) == 100.0
    assert exact_match(["a"], ["b"]) == 0.0


def _quadratic(target):
    return lambda W: ((W - target) ** 2).sum(axis=1)


def test_cma_finds_a_quadratic_minimum_and_is_seeded():
    target = np.array([0.7, -0.4, 0.0, 1.1])
    r1 = search(_quadratic(target), 4, optimizer="cma", budget=400, population=8, l1=0.0, seed=3)
    r2 = search(_quadratic(target), 4, optimizer="cma", budget=400, population=8, l1=0.0, seed=3)
    assert np.allclose(r1.weights, target, atol=0.05)
    assert np.array_equal(r1.weights, r2.weights)
    assert r1.optimizer == "cma:ParametrizedCMA(popsize=8)"
    assert [h["evaluation"] for h in r1.history] == list(range(1, 401))
    assert all(a["best"] >= b["best"] for a, b in zip(r1.history, r1.history[1:]))


def test_ngopt_is_cobyla_sequential():
    calls = []
    r = search(lambda W: calls.append(len(W)) or _quadratic(np.zeros(3))(W), 3, budget=10, optimizer="ngopt")
    assert "Cobyla" in r.optimizer and set(calls) == {1} and len(calls) == 10


def test_nevergrad_registry_optimizers_by_name():
    target = np.array([0.5, -0.3, 0.2])
    calls = []
    score = lambda W: calls.append(len(W)) or _quadratic(target)(W)  # noqa: E731
    r = search(score, 3, budget=300, optimizer="ng:TwoPointsDE", population=6, l1=0.0, seed=1)
    assert r.optimizer == "ng:TwoPointsDE:TwoPointsDE" and set(calls) == {6} and len(calls) == 50
    assert np.allclose(r.weights, target, atol=0.1)
    calls.clear()
    r = search(score, 3, budget=12, optimizer="ng:Cobyla", l1=0.0)  # population 1 by default
    assert set(calls) == {1} and len(calls) == 12
    with pytest.raises(LorahubValueError, match="one candidate at a time; use population=1"):
        search(score, 3, budget=12, optimizer="ng:Cobyla", population=4)
    with pytest.raises(LorahubValueError, match=r"unknown optimizer 'ng:NoSuch'.*ng:NAME"):
        search(score, 3, budget=12, optimizer="ng:NoSuch")


def test_cobyla_starts_at_the_best_probe_and_never_rescores_a_point():
    """The default search: Cobyla from the best single module. Its first ask is its start, scored as a probe
    already: told from the cache, so all 8 evaluations left after the 4 probes go to new points."""
    target = np.array([0.0, 1.0, 0.0, 0.2])
    seen = []

    def score(W):
        seen.append(W.copy())
        return ((W - target) ** 2).sum(axis=1)

    r = search(score, 4, budget=12, l1=0.0, probes=np.eye(4), seed=0)
    points = np.concatenate(seen)
    assert r.optimizer == "cobyla:Cobyla" and r.population == 1 and r.start == "best-probe"
    assert [len(W) for W in seen] == [4] + [1] * 8 and len(r.history) == 12
    assert len(np.unique(points, axis=0)) == 12  # the start, e_2, is not scored twice
    steps = points[4:8] - np.eye(4)[1]  # then its simplex: the start plus one step on each weight in turn
    assert np.allclose(steps, np.diag(np.diag(steps))) and (np.abs(np.diag(steps)) > 0).all()
    assert r.objective <= 0.04 + 1e-12
    ngopt = []
    search(lambda W: ngopt.append(W.copy()) or ((W - target) ** 2).sum(axis=1), 4, budget=12, l1=0.0,
           probes=np.eye(4), optimizer="ngopt", start="best-probe", seed=0)
    assert np.array_equal(np.concatenate(ngopt), points)  # NGOpt resolves to the same Cobyla
    with pytest.raises(LorahubValueError, match="'cobyla' scores one candidate at a time; use population=1"):
        search(score, 4, budget=12, population=4)


def test_l1_and_bounds():
    r = search(lambda W: np.zeros(len(W)), 3, optimizer="cma", budget=24, population=8, l1=0.05)
    assert r.objective == pytest.approx(0.05 * np.abs(r.weights).mean())
    assert (np.abs(r.weights) <= 1.5).all()
    with pytest.raises(LorahubValueError, match="contain the start w=0"):
        search(lambda W: np.zeros(len(W)), 3, bounds=(0.1, 1.0))
    with pytest.raises(LorahubValueError, match="unknown optimizer 'adam'. Available: cma, cobyla, ngopt"):
        search(lambda W: np.zeros(len(W)), 3, optimizer="adam")


def test_nan_candidates_score_inf_and_search_goes_on():
    def score(W):
        out = (W ** 2).sum(axis=1)
        out[W[:, 0] > 0] = np.nan
        return out

    r = search(score, 2, optimizer="cma", budget=32, population=8, l1=0.0)
    assert math.isfinite(r.objective) and r.weights[0] <= 0
    assert any(math.isinf(h["objective"]) for h in r.history) and len(r.history) == 32


def test_probes_and_start_at_best_probe():
    target = np.array([0.0, 1.0, 0.0, 0.2])
    seen = []

    def score(W):
        seen.append(W.copy())
        return ((W - target) ** 2).sum(axis=1)

    r = search(score, 4, optimizer="cma", budget=12, population=8, l1=0.0, probes=np.eye(4), start="best-probe", seed=0)
    assert r.start == "best-probe" and search(score, 4, optimizer="cma", budget=8, population=8, start="best-probe").start == "zero"
    assert np.array_equal(seen[0], np.eye(4)) and [h.get("probe", False) for h in r.history][:4] == [True] * 4
    first_generation = seen[1]
    assert np.linalg.norm(first_generation.mean(axis=0) - np.eye(4)[1]) < 0.6  # centred on the best probe, not on 0
    assert r.objective <= 0.04 + 1e-12  # never worse than the best probe (e_2 scores 0.04)
    with pytest.raises(LorahubValueError, match="unknown start 'middle'"):
        search(score, 4, optimizer="cma", budget=12, population=8, probes=np.eye(4), start="middle")


@pytest.mark.parametrize("n", [6, 20])  # nevergrad scales CMA-ES's first step differently below and above 18
@pytest.mark.parametrize("step", [0.05, 0.3])
def test_first_generation_spreads_step_around_the_start(n, step):
    """`step` is CMA-ES's first σ in weight units: the first generation's per-coordinate spread around the start."""
    seen = []

    def score(W):
        seen.append(W.copy())
        return np.abs(W).sum(axis=1)

    probes = np.eye(n)
    search(score, n, optimizer="cma", budget=200 + n, population=200, l1=0.0, probes=probes, start="best-probe", step=step, seed=1)
    first = seen[1]  # after the probes; every probe scores 1, so the start is the first, e_1
    spread = (first - probes[0]).std()
    assert spread == pytest.approx(step, rel=0.1)


def test_probes_are_told_only_when_the_search_starts_at_zero(monkeypatch):
    import nevergrad as ng

    told = []
    real_tell = ng.optimizers.base.Optimizer.tell
    monkeypatch.setattr(ng.optimizers.base.Optimizer, "tell",
                        lambda self, cand, loss, *a, **k: told.append(loss) or real_tell(self, cand, loss, *a, **k))
    score = lambda W: (W ** 2).sum(axis=1) + 1.0  # noqa: E731
    search(score, 4, optimizer="cma", budget=12, population=4, probes=np.eye(4), start="best-probe")
    assert len(told) == 8  # the asked candidates only (the budget of 12 counts the 4 probes)
    told.clear()
    search(score, 4, optimizer="cma", budget=12, population=4, probes=np.eye(4), start="zero")
    assert len(told) == 4 + 8


def test_search_refuses_bad_step_and_single_module_cma():
    score = lambda W: (W ** 2).sum(axis=1)  # noqa: E731
    with pytest.raises(LorahubValueError, match="step must be positive, got 0"):
        search(score, 4, optimizer="cma", step=0)
    with pytest.raises(LorahubValueError, match="CMA-ES needs at least 2 candidate modules, got 1"):
        search(score, 1, optimizer="cma")


def test_default_population_keeps_five_generations_within_the_budget():
    from lorahub.optimize import default_population

    assert default_population("cma", 20) == 12  # CMA-ES's own 4 + 3 ln N
    assert default_population("cma", 20, budget=40) == 8 and default_population("cma", 20, budget=400) == 12
    assert default_population("cma", 20, budget=6) == 2 and default_population("ngopt", 20, budget=40) == 1
    sizes = []
    search(lambda W: sizes.append(len(W)) or (W ** 2).sum(axis=1), 20, optimizer="cma", budget=40, probes=None)
    assert sizes == [8] * 5
    sizes.clear()  # the 20 probes are counted in the budget: 20 left, 5 generations of 4
    search(lambda W: sizes.append(len(W)) or (W ** 2).sum(axis=1), 20, optimizer="cma", budget=40, probes=np.eye(20))
    assert sizes == [20] + [4] * 5


def test_search_config_is_the_one_place_of_the_search_defaults():
    import inspect
    from dataclasses import fields

    from lorahub.api import compose
    from lorahub.config import ComposeConfig
    from lorahub.optimize import DEFAULT_STEP, SearchConfig

    cfg = SearchConfig()
    assert (cfg.num_candidates, cfg.budget, cfg.population, cfg.optimizer, cfg.l1, cfg.bounds, cfg.seed,
            cfg.probe_singles, cfg.start, cfg.step, cfg.max_rows) == (20, 40, None, "cobyla", 0.05, (-1.5, 1.5), 42,
                                                                       None, "best-probe", DEFAULT_STEP, 256)
    assert (cfg.select, cfg.candidate_order, cfg.loss_scale) == ("auto", "sample", "per-example")
    assert all(f.metadata.get("help") for f in fields(SearchConfig))
    for fn in (search, compose):
        params = inspect.signature(fn).parameters
        for f in fields(SearchConfig):
            if f.name in params:
                assert params[f.name].default == f.default, (fn.__name__, f.name)
        assert params["bounds"].default == cfg.bounds
    composed = ComposeConfig(examples="e.jsonl", out="o")
    assert isinstance(composed, SearchConfig) and composed.budget == cfg.budget
    for bad, msg in [({"budget": 0}, "`budget` should be a positive integer"),
                     ({"budget": 4, "population": 8}, r"`budget` \(4\) is smaller than `population` \(8\)"),
                     ({"optimizer": "adam"}, "unknown optimizer 'adam'"), ({"lower": 0.5}, "bounds must contain"),
                     ({"step": 0}, "step must be positive, got 0"), ({"start": "middle"}, "unknown start 'middle'")]:
        with pytest.raises(LorahubValueError, match=msg):
            SearchConfig(**bad)
        with pytest.raises(LorahubValueError, match=msg):
            ComposeConfig(examples="e.jsonl", out="o", **bad)
