"""Hub build: resumes after a kill without retraining, skips bad tasks, rejects weak modules, reports quality."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import tiny_model_and_tokenizer
import torch

from lorahub import hub as hub_mod
from lorahub.hub import BUILD_LOG, build_hub, flan_t5_large_manifest, format_table, hub_report
from lorahub.store import PACKAGE_HUB_DIR, ModuleStore
from lorahub.train import TrainConfig

REPO = Path(__file__).resolve().parent.parent


def save_tiny_base(folder: Path) -> Path:
    """The tiny random Llama + BPE tokenizer, saved so that ``load_base(folder)`` reads it."""
    model, tok = tiny_model_and_tokenizer()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_pool(root: Path, names, n: int = 60, bad: dict | None = None) -> Path:
    words = ["red", "green", "blue", "yes", "no"]
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    index = {}
    for k, name in enumerate(names):
        index[name] = {"kind": "multiple_choice", "source": "test"}
        rows = [json.dumps({"input": f"{name} {i}?", "target": words[(i + k) % 5], "targets": None, "choices": words})
                for i in range(n)]
        if bad and name in bad:
            rows[bad[name] - 1] = "{broken"
        (root / "tasks" / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    (root / "index.json").write_text(json.dumps(index))
    return root


def events(out: Path) -> list[dict]:
    f = out / BUILD_LOG
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


FAST = dict(rank=4, alpha=8, steps=3, batch_size=2, max_length=64)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("tiny_base"))


def test_build_resumes_after_kill_without_retraining(base_dir, tmp_path):
    pool = write_pool(tmp_path / "pool", [f"task{i}" for i in range(6)])
    out = tmp_path / "hub" / "tiny"
    script = tmp_path / "build.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from lorahub.hub import build_hub
        from lorahub.train import TrainConfig
        build_hub({str(pool)!r}, {str(base_dir)!r}, {str(out)!r},
                  TrainConfig(rank=4, alpha=8, steps=40, batch_size=4, max_length=64),
                  eval_examples=8, require_improvement=False, progress=False)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not any(e["event"] == "saved" for e in events(out)):
            if proc.poll() is not None:
                pytest.fail(f"build subprocess ended early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.02)
    finally:
        proc.kill()  # SIGKILL: no cleanup, like a crash
        proc.wait()
    before = events(out)
    saved_before = {e["task"] for e in before if e["event"] == "saved"}
    assert saved_before, "no module was written before the kill"
    assert len(saved_before) < 6, "the build finished before the kill; nothing was resumed"
    manifest = out.parent / "tiny.json"
    json.loads(manifest.read_text())  # never half-written
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name and p.is_file()]

    build_hub(pool, str(base_dir), out, TrainConfig(rank=4, alpha=8, steps=40, batch_size=4, max_length=64),
              eval_examples=8, require_improvement=False, progress=False)
    after = events(out)[len(before):]
    retrained = {t for e in after if e["event"] == "train_start" for t in e["tasks"]} & saved_before
    assert not retrained, f"finished modules were trained again: {retrained}"
    saves = [e["task"] for e in events(out) if e["event"] in ("saved", "adopted")]
    assert sorted(saves) == [f"task{i}" for i in range(6)]  # each exactly once
    store = ModuleStore.from_manifest(manifest)
    assert len(store) == 6
    assert all(err is None for _, err in store.verify()), store.verify()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_bad_task_is_skipped_and_build_goes_on_then_nothing_to_redo(base_dir, tmp_path):
    pool = write_pool(tmp_path / "pool", ["good1", "broken", "good2"], bad={"broken": 7})
    out = tmp_path / "hub" / "h"
    config = TrainConfig(**FAST)
    manifest = build_hub(pool, str(base_dir), out, config, eval_examples=4, require_improvement=False, progress=False)
    log = events(out)
    skipped = [e for e in log if e["event"] == "skipped"]
    assert len(skipped) == 1 and skipped[0]["task"] == "broken" and "broken.jsonl:7" in skipped[0]["error"]
    data = json.loads(manifest.read_text())
    assert [m["name"] for m in data["modules"]] == ["good1", "good2"]
    m = data["modules"][0]
    assert m["location"] == "h/good1" and len(m["sha256"]) == 64
    for key in ("train_loss", "base_em", "module_em", "eval_examples", "train_examples", "heldout_examples"):
        assert key in m
    assert m["heldout_examples"] >= 50 and m["train_examples"] == 10

    rows = hub_report(manifest)
    assert [r["module"] for r in rows] == ["good1", "good2"]
    table = format_table(rows)
    assert "good2" in table and "module_em" in table and "mean of 2" in table

    # a module folder renamed into place just before a kill, but missing from the manifest, is adopted
    data["modules"] = data["modules"][:1]
    manifest.write_text(json.dumps(data))
    n = len(log)
    build_hub(pool, str(base_dir), out, config, eval_examples=4, require_improvement=False, progress=False)
    new = [e["event"] for e in events(out)[n:]]
    assert "train_start" not in [e for e in new if e != "skipped"] and new.count("adopted") == 1
    assert len(ModuleStore.from_manifest(manifest)) == 2


def test_weak_module_is_rejected_and_not_retrained(base_dir, tmp_path, monkeypatch):
    pool = write_pool(tmp_path / "pool", ["flat"])
    out = tmp_path / "hub" / "r"
    monkeypatch.setattr(hub_mod, "heldout_em", lambda *a, **k: 0.5)  # module never beats the base
    manifest = build_hub(pool, str(base_dir), out, TrainConfig(**FAST), eval_examples=4, progress=False)
    data = json.loads(manifest.read_text())
    assert data["modules"] == [] and [r["task"] for r in data["rejected"]] == ["flat"]
    assert not (out / "flat").exists()
    n = len(events(out))
    build_hub(pool, str(base_dir), out, TrainConfig(**FAST), eval_examples=4, progress=False)
    assert len(events(out)) == n
    assert [r["status"] for r in hub_report(manifest)] == ["rejected"]


def test_flan_t5_manifest_parses(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("lorahub/flan_t5_large-ag_news_subset\nlorahub/flan_t5_large-quoref_Guess_Answer\n")
    path = flan_t5_large_manifest(ids, tmp_path / "flan.json")
    store = ModuleStore.from_manifest(path)
    spec = store.specs["flan_t5_large-ag_news_subset"]
    assert spec.location == "hf://lorahub/flan_t5_large-ag_news_subset"
    assert (spec.base_model, spec.rank, spec.alpha, spec.target_modules) == ("google/flan-t5-large", 16, 32, ["q", "v"])
    shipped = PACKAGE_HUB_DIR / "lorahub-flan-t5-large.json"
    store = ModuleStore.from_manifest("lorahub-flan-t5-large")  # found by name on the hub path
    assert len(store) == 196 and json.loads(shipped.read_text())["model_type"] == "seq2seq"


def test_save_module_rewrites_a_shipped_module_byte_for_byte(tmp_path):
    """The hub build resumes with the current code: a module saved from a shipped module's own tensors,
    config and record must have the same bytes (and the sha256 its manifest entry recorded)."""
    import hashlib

    from safetensors.torch import load_file

    from lorahub.compose import parse_lora_key
    from lorahub.store import read_manifest
    from lorahub.train import TrainedModule, save_module

    manifest = PACKAGE_HUB_DIR / "smollm2-135m-bigbench.json"
    entry = read_manifest(manifest)["modules"][0]
    src = manifest.parent / entry["location"]
    shipped_cfg = json.loads((src / "adapter_config.json").read_text())
    import peft

    if shipped_cfg.get("peft_version") != peft.__version__:
        pytest.skip(f"the hub was saved with peft {shipped_cfg.get('peft_version')}, this is {peft.__version__}")
    record = json.loads((src / "lorahub_train.json").read_text())
    halves: dict = {}
    for key, t in load_file(str(src / "adapter_model.safetensors")).items():
        assert t.dtype == torch.float16
        layer, half = parse_lora_key(key)
        halves.setdefault(layer, {})[half] = t.float()  # fp16 -> fp32 -> fp16 is exact
    module = TrainedModule(record["task"], {l: (ab["A"], ab["B"]) for l, ab in halves.items()}, record["losses"], 0.0)
    report = {k: v for k, v in record.items() if k not in ("task", "config", "base_model", "losses")}
    weights = save_module(tmp_path / "m", module, TrainConfig(**record["config"]), base_model_name=record["base_model"],
                          seq2seq=False, report=report)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == entry["sha256"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "lorahub_train.json"):
        assert (tmp_path / "m" / name).read_bytes() == (src / name).read_bytes(), name
    keys = sorted(load_file(str(weights)))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" and len(keys) == 2 * len(halves)


def test_build_renders_letters_and_stores_task_embeddings(base_dir, tmp_path):
    """A `task:letters` unit trains on lettered options and is recorded so; every module gets its task embedding,
    equal to an independent computation: the mean of the normalised MiniLM embeddings of its training inputs."""
    from sentence_transformers import SentenceTransformer

    from lorahub.bigbench import read_task, split_examples
    from lorahub.embed import embedder_path, embeddings_file, read_embeddings
    from lorahub.store import read_manifest

    pool = write_pool(tmp_path / "pool", ["colors", "answers"])
    out = tmp_path / "hub" / "tiny"
    mpath = build_hub(pool, str(base_dir), out, TrainConfig(**FAST), only=["colors", "colors:letters", "answers"],
                      eval_examples=4, require_improvement=False, progress=False)
    data = read_manifest(mpath)
    assert [(e["name"], e["format"]) for e in data["modules"]] == [
        ("colors", "native"), ("colors--letters", "letters"), ("answers", "native")]
    rows = hub_report(mpath)
    assert [r["format"] for r in rows] == ["native", "letters", "native"] and "format" in format_table(rows)
    letters = json.loads((out / "colors--letters" / "lorahub_train.json").read_text())["manifest_entry"]["examples"][0]
    assert "\nOptions:\n(A) " in letters["input"] and letters["output"] in [f"({c})" for c in "ABCDE"]

    info = data["embeddings"]
    assert info["dim"] == 384 and info["embedder"] == "sentence-transformers/all-MiniLM-L6-v2"
    vectors = read_embeddings(mpath, data)  # checks the recorded sha256
    assert set(vectors) == {"colors", "colors--letters", "answers"} and embeddings_file(mpath).is_file()
    st = SentenceTransformer(embedder_path())
    for name, task, fmt in [("colors", "colors", "native"), ("colors--letters", "colors", "letters")]:
        train, _ = split_examples(read_task(pool, task, None, fmt).examples, seed=0, heldout=50)
        want = torch.nn.functional.normalize(torch.as_tensor(st.encode([e.input for e in train])), dim=-1).mean(0)
        torch.testing.assert_close(vectors[name], want, rtol=1e-4, atol=1e-5)
        assert next(e for e in data["modules"] if e["name"] == name)["embedding_inputs"] == len(train)
    assert not torch.allclose(vectors["colors"], vectors["colors--letters"])

    # `lorahub hub embed` recomputes the same vectors for an existing hub (here: from the task folder)
    from lorahub.cli import main

    before = {k: v.clone() for k, v in vectors.items()}
    del data["embeddings"]
    mpath.write_text(json.dumps(data))
    assert main(["hub", "embed", str(mpath), "--tasks", str(pool), "--no-progress"]) == 0
    again = read_embeddings(mpath, read_manifest(mpath))
    for k in before:
        torch.testing.assert_close(again[k], before[k], rtol=1e-5, atol=1e-6)


def test_hub_embed_without_task_data_names_the_module(tmp_path):
    from lorahub.cli import main

    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"name": "m", "modules": [{"name": "mod0", "location": "mod0", "task": "t"}]}))
    assert main(["hub", "embed", str(manifest), "--no-progress"]) == 2
