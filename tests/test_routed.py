"""Routed composition: hook math by hand, uniform gates vs merged sums, training, save/load, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from lorahub import compose, from_weights
from lorahub.compose import delta_weights
from lorahub.data import as_examples, encode
from lorahub.errors import LorahubIntegrityError, LorahubValueError
from lorahub.evaluate import block_losses
from lorahub.generate import generate, merged_into
from lorahub.routed import (
    CONFIG_FILE, WEIGHTS_FILE, RoutedComposition, RoutedConfig, RoutingHooks, load_routed, router_groups,
)
from lorahub.store import ModuleStore, read_module

from conftest import EXAMPLES, make_module


def _store(paths) -> ModuleStore:
    store = ModuleStore()
    for p in paths:
        store.add_path(p)
    return store


def _stacked(model, paths, base_name):
    return _store(paths).stack([p.name for p in paths], model, base_name=base_name)


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


@pytest.fixture()
def small_modules(tiny_llama, tmp_path, tiny_llama_dir):
    """4 modules with small deltas (keeps float32 comparisons tight)."""
    model, _ = tiny_llama
    return [make_module(model, tmp_path / f"m{i}", seed=20 + i, base_name=str(tiny_llama_dir), scale=0.1)
            for i in range(4)]


def test_router_groups_share_qv(tiny_llama, small_modules, tiny_llama_dir):
    model, _ = tiny_llama
    groups = router_groups(model, _stacked(model, small_modules, str(tiny_llama_dir)))
    assert groups == {f"model.layers.{i}.self_attn.router[q_proj+v_proj]":
                      [f"model.layers.{i}.self_attn.q_proj", f"model.layers.{i}.self_attn.v_proj"] for i in range(2)}


@pytest.mark.parametrize("top_k,null", [(1, False), (2, False), (2, True)])
def test_hook_delta_equals_per_token_computation(tiny_llama, small_modules, tiny_llama_dir, top_k, null):
    """(a) The hooks' delta on every adapted layer equals a by-hand loop over tokens (the zero expert, the
    last router output when ``null``, takes part in the top-k and the renormalisation but adds nothing)."""
    model, tok = tiny_llama
    stacked = _stacked(model, small_modules, str(tiny_llama_dir))
    groups = router_groups(model, stacked)
    g = torch.Generator().manual_seed(0)
    routers = {n: torch.randn(len(stacked) + null, 64, generator=g) for n in groups}
    batch = encode(tok, as_examples(EXAMPLES), seq2seq=False)
    named = dict(model.named_modules())
    seen: dict[str, list] = {l: [] for l in stacked.layers}
    pre = [named[l].register_forward_hook(lambda m, i, o, l=l: seen[l].append((i[0].detach(), o.detach())))
           for l in stacked.layers]  # before the routing hooks: input and base output
    try:
        with RoutingHooks(model, stacked, routers, groups, top_k, null_expert=null):
            post = [named[l].register_forward_hook(lambda m, i, o, l=l: seen[l].append(o.detach()))
                    for l in stacked.layers]  # after them: the routed output
            _logits(model, batch)
    finally:
        for h in pre + post:
            h.remove()
    chosen = set()
    for layer in stacked.layers:
        (x, base), routed = seen[layer]
        router = routers[next(n for n, ls in groups.items() if layer in ls)]
        want = torch.zeros_like(base)
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                xt = x[b, t].double()
                p = torch.softmax(router.double() @ xt, 0)
                top = sorted(range(len(p)), key=lambda e: -float(p[e]))[:top_k]
                chosen.add(tuple(sorted(top)))
                w = {e: p[e] / sum(p[j] for j in top) if top_k > 1 else p[e] for e in top}
                want[b, t] = sum(w[e] * stacked.scaling * (stacked.B[layer][e].double() @ (stacked.A[layer][e].double() @ xt))
                                 for e in top if e < len(stacked)).float()
        torch.testing.assert_close(routed - base, want, rtol=1e-5, atol=1e-5)
    assert len(chosen) > 1  # routing really differs between tokens
    if null:
        assert any(len(stacked) in c for c in chosen)  # the zero expert was picked for some tokens


def test_uniform_gates_equal_merged_mean_of_modules(tiny_llama, small_modules, tiny_llama_dir):
    """(b) top_k = N and zero routers (gates 1/N) == merging Σ_e ΔW_e / N; one module == from_weights(w=1).

    Not LoraHub's static weights 1/N: those give ΔW = (Σ B/N)(Σ A/N), cross terms B_i A_j included.
    """
    model, tok = tiny_llama
    batch = encode(tok, as_examples(EXAMPLES), seq2seq=False)
    stacked = _stacked(model, small_modules, str(tiny_llama_dir))
    groups = router_groups(model, stacked)
    n = len(stacked)
    with RoutingHooks(model, stacked, {g: torch.zeros(n, 64) for g in groups}, groups, top_k=n):
        routed = _logits(model, batch)
    deltas: dict[str, torch.Tensor] = {}
    for p in small_modules:  # straight from the files, not from the stacked tensors
        mod = read_module(p)
        for l, d in delta_weights(mod.layers, mod.scaling).items():
            deltas[l] = deltas.get(l, 0) + d / n
    with merged_into(model, deltas):
        mean = _logits(model, batch)
    torch.testing.assert_close(routed, mean, rtol=1e-4, atol=1e-4)
    lorahub_static = from_weights({p.name: 1 / n for p in small_modules}, _store(small_modules), (model, tok))
    assert (_logits(lorahub_static.merge(), batch) - routed).abs().max() > 1e-3  # cross terms differ

    one = _stacked(model, small_modules[:1], str(tiny_llama_dir))
    g1 = router_groups(model, one)
    with RoutingHooks(model, one, {g: torch.zeros(1, 64) for g in g1}, g1, top_k=1):
        routed1 = _logits(model, batch)
    static1 = from_weights({small_modules[0].name: 1.0}, _store(small_modules), (model, tok))
    torch.testing.assert_close(routed1, _logits(static1.merge(), batch), rtol=1e-4, atol=1e-4)


@pytest.fixture()
def trained(tiny_llama, llama_modules):
    model, tok = tiny_llama
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    comp = compose(EXAMPLES, [str(p) for p in llama_modules], (model, tok), method="routed",
                   routed=RoutedConfig(steps=12, lr=0.05, router_init_std=0.1), seed=3, progress=False)
    return comp, base_state


def test_training_lowers_loss_and_touches_only_routers(trained, tiny_llama, llama_modules):
    """(c) The few-shot loss falls; base weights and module tensors are unchanged; same seed, same routers."""
    comp, base_state = trained
    model, tok = tiny_llama
    assert isinstance(comp, RoutedComposition)
    h = comp.history
    assert len(h) == 12 + 1 and comp.record["evaluations"] == 13
    assert comp.loss < h[0]["loss"] - 0.1 and comp.loss == min(r["loss"] for r in h if r["objective"] == comp.objective)
    assert comp.record["method"] == "routed" and comp.record["num_router_params"] == 2 * (4 + 1) * 64  # + zero expert
    assert set(comp.record["module_usage"]) == set(comp.stacked.names) | {"(none)"}
    assert sum(comp.record["module_usage"].values()) == pytest.approx(1.0, abs=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base_state[k]), k
    for p in llama_modules:
        i = comp.stacked.names.index(p.name)  # the candidates in the selector's order (random's draw)
        for l, (a, b) in read_module(p).layers.items():
            assert torch.equal(comp.stacked.A[l][i], a) and torch.equal(comp.stacked.B[l][i], b)
    # the recorded loss is the loss of the kept routers
    batch = encode(tok, as_examples(EXAMPLES), seq2seq=False)
    with comp.routing(), torch.no_grad():
        assert float(block_losses(model, batch, 1, False)[0]) == pytest.approx(comp.loss, rel=1e-5)
    again = compose(EXAMPLES, [str(p) for p in llama_modules], (model, tok), method="routed",
                    routed=RoutedConfig(steps=12, lr=0.05, router_init_std=0.1), seed=3, progress=False)
    assert all(torch.equal(comp.routers[n], again.routers[n]) for n in comp.routers)
    # the same candidates as the static method for a seed
    static = compose(EXAMPLES, [str(p) for p in llama_modules], (model, tok), num_candidates=2, budget=6,
                     population=4, optimizer="cma", seed=5, progress=False)
    routed2 = compose(EXAMPLES, [str(p) for p in llama_modules], (model, tok), num_candidates=2, method="routed",
                      routed=RoutedConfig(steps=1, top_k=1), seed=5, progress=False)
    assert list(static.weights) == routed2.stacked.names


def test_save_and_load_give_identical_outputs(trained, tiny_llama, llama_modules, tmp_path):
    """(d) save -> load_routed: same logits and predictions; the folder holds the documented files."""
    comp, _ = trained
    model, tok = tiny_llama
    out = comp.save(tmp_path / "routed")
    assert {p.name for p in out.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, "README.md"}
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["method"] == "routed" and meta["config"]["top_k"] == 2
    assert [m["name"] for m in meta["modules"]] == comp.stacked.names and all(len(m["sha256"]) == 64 for m in meta["modules"])
    assert meta["routers"]["model.layers.0.self_attn.router[q_proj+v_proj]"]["shape"] == [4 + 1, 64]  # 4 modules + the zero expert
    assert len(meta["record"]["history"]) == 13

    loaded = load_routed(out, base_model=(model, tok))  # modules from the recorded folders
    batch = encode(tok, as_examples(EXAMPLES), seq2seq=False)
    with comp.routing():
        a = _logits(model, batch)
    with loaded.routing():
        b = _logits(model, batch)
    assert torch.equal(a, b) and (a - _logits(model, batch)).abs().max() > 1e-3
    inputs = [e["input"] for e in EXAMPLES]
    assert loaded.predict(inputs, max_new_tokens=4) == comp.predict(inputs, max_new_tokens=4)
    assert loaded.loss == comp.loss and loaded.config == comp.config

    (out / WEIGHTS_FILE).write_bytes((out / WEIGHTS_FILE).read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(LorahubIntegrityError, match="routers.safetensors is corrupted"):
        load_routed(out, [str(p) for p in llama_modules], base_model=(model, tok))


def test_merge_is_refused(trained, tmp_path):
    """(e) Routing is input-dependent: no merge, no merged save."""
    comp, _ = trained
    with pytest.raises(LorahubValueError, match="input-dependent"):
        comp.merge()
    with pytest.raises(LorahubValueError, match="input-dependent.*method='static'"):
        comp.save(tmp_path / "m", merged=True)
    assert not (tmp_path / "m").exists()
    comp.save(tmp_path / "r")  # a saved routed folder given to `lorahub merge` is refused too
    from lorahub.cli import main

    assert main(["merge", str(tmp_path / "r"), "--out", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()


def test_unknown_method_and_bad_settings(tiny_llama, llama_modules):
    """(f) Unknown method names the valid ones; top_k > candidates and routed= with static are clear errors."""
    model, tok = tiny_llama
    with pytest.raises(LorahubValueError, match="unknown compose method 'bogus'. Available: 'static'.*'routed'"):
        compose(EXAMPLES, [str(p) for p in llama_modules], (model, tok), method="bogus")
    with pytest.raises(LorahubValueError, match="pass method='routed'"):
        compose(EXAMPLES, [str(p) for p in llama_modules], (model, tok), routed=RoutedConfig())
    with pytest.raises(LorahubValueError, match=r"`top_k`=4 is larger than the 3 experts \(2 candidate module\(s\) \+ the zero"):
        compose(EXAMPLES, [str(p) for p in llama_modules], (model, tok), num_candidates=2, method="routed",
                routed=RoutedConfig(top_k=4), progress=False)
    with pytest.raises(LorahubValueError, match=r"`top_k`=3 is larger than the 2 experts \(2 candidate module\(s\)\)"):
        compose(EXAMPLES, [str(p) for p in llama_modules], (model, tok), num_candidates=2, method="routed",
                routed=RoutedConfig(top_k=3, null_expert=False), progress=False)
    with pytest.raises(LorahubValueError, match="`steps` should be a positive integer"):
        RoutedConfig(steps=0)


def test_predict_batched_equals_one_by_one(trained, tiny_llama):
    """(g) Left padding does not change any real token's routing: batched == one at a time."""
    comp, _ = trained
    model, tok = tiny_llama
    inputs = [e["input"] for e in EXAMPLES] + ["Q: A much longer question that pads the others a lot?\nA:"]
    batched = comp.predict(inputs, max_new_tokens=5, batch_size=6)
    single = [comp.predict(x, max_new_tokens=5)[0] for x in inputs]
    assert batched == single
    assert batched != generate(model, tok, inputs, max_new_tokens=5)  # the routing does change the model


def test_routed_seq2seq(tiny_t5, t5_modules, tmp_path):
    model, tok = tiny_t5
    comp = compose(EXAMPLES, [str(p) for p in t5_modules], (model, tok), method="routed",
                   routed=RoutedConfig(steps=4, lr=0.05), progress=False)
    assert comp.history[-1]["loss"] < comp.history[0]["loss"]
    assert any(".EncDecAttention.router[q+v]" in n for n in comp.routers)
    preds = comp.predict([e["input"] for e in EXAMPLES], max_new_tokens=3)
    loaded = load_routed(comp.save(tmp_path / "t5"), base_model=(model, tok))
    assert loaded.predict([e["input"] for e in EXAMPLES], max_new_tokens=3) == preds


def test_cli_routed_compose_and_merged_refusal(tmp_path, llama_modules, tiny_llama_dir, capsys):
    from lorahub.cli import main

    ex = tmp_path / "ex.jsonl"
    ex.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    base = ["compose", "--examples", str(ex), "--modules", *map(str, llama_modules), "--base-model", str(tiny_llama_dir),
            "--method", "routed", "--routed-steps", "3", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "m"), "--merged"]) == 2
    assert "input-dependent" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert main(base + ["--out", str(tmp_path / "r"), "--eval-examples", str(ex)]) == 0
    text = capsys.readouterr().out
    assert "640 router parameters over 4 modules + the zero expert, top-2, 3 steps" in text and "held-out exact match (5 examples)" in text
    meta = json.loads((tmp_path / "r" / CONFIG_FILE).read_text())
    assert meta["record"]["command"].startswith("lorahub compose --examples") and "held_out" in meta["record"]
    assert main(["compose", "--examples", str(ex), "--out", str(tmp_path / "b"), "--method", "bogus"]) == 2
    assert "unknown method 'bogus'. Available: static, routed" in capsys.readouterr().err


def test_bbh_lorahub_routed_method(tmp_path, llama_modules, tiny_llama_dir):
    """The BBH row: registered, seeded, not a default; draws the same candidates as lorahub-default."""
    from lorahub.bench.methods import DEFAULT_METHODS, get_method
    from lorahub.cli import main

    m = get_method("lorahub-routed")
    assert m.seeded and m.uses_hub and "lorahub-routed" not in DEFAULT_METHODS
    d = tmp_path / "bbh"
    d.mkdir()
    ex = [{"input": f"not {['True', 'False'][i % 2]} is", "target": ["False", "True"][i % 2]} for i in range(9)]
    (d / "alpha.json").write_text(json.dumps({"canary": "x", "examples": ex}))
    (d / "task_prefixes.json").write_text(json.dumps({"alpha": "Evaluate it."}))
    out = tmp_path / "run"
    assert main(["bbh", "--out", str(out), "--data-dir", str(d), "--base-model", str(tiny_llama_dir), "--modules",
                 *map(str, llama_modules), "--limit", "3", "--no-progress", "--methods", "lorahub-routed",
                 "--seeds", "1"]) == 0
    row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert row["method"] == "lorahub-routed" and row["n_test"] == 3 and row["num_router_params"] == 640  # 2 routers x (4 modules + zero expert) x 64
    assert row["evals"] == 41 and row["loss"] <= row["initial_loss"]
