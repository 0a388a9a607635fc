"""Module store: loading, validation errors that name the culprit, sha256, manifests, offline hub ids."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from lorahub.errors import LorahubFileError, LorahubIntegrityError, LorahubValueError
from lorahub.store import ModuleStore, add_to_manifest, read_module

from conftest import make_module


def _store(*paths):
    s = ModuleStore()
    for p in paths:
        s.add_path(p)
    return s


def test_stack_shapes(tiny_llama, llama_modules):
    model, _ = tiny_llama
    st = _store(*llama_modules).stack([p.name for p in llama_modules], model)
    layer = "model.layers.0.self_attn.v_proj"
    assert st.A[layer].shape == (4, 4, 64)  # [N, r, in]
    assert st.B[layer].shape == (4, 32, 4)  # [N, out, r] (2 kv heads x 16)
    assert st.scaling == 2.0 and len(st.layers) == 4
    mod = read_module(llama_modules[1])
    torch.testing.assert_close(st.A[layer][1], mod.layers[layer][0])


def test_rank_mismatch_names_module(tiny_llama, llama_modules, tmp_path):
    model, _ = tiny_llama
    odd = make_module(model, tmp_path / "rank8", seed=5, r=8, alpha=16)
    with pytest.raises(LorahubValueError, match=r"module 'rank8' has rank r=8, but 'mod0' has r=4"):
        _store(llama_modules[0], odd).stack(["mod0", "rank8"], model)


def test_target_mismatch(tiny_llama, llama_modules, tmp_path):
    model, _ = tiny_llama
    odd = make_module(model, tmp_path / "qk", seed=5, targets=("q_proj", "k_proj"))
    with pytest.raises(LorahubValueError, match=r"module 'qk' targets other layers than 'mod0'"):
        _store(llama_modules[0], odd).stack(["mod0", "qk"], model)


def test_base_model_mismatch(tiny_llama, llama_modules, tmp_path):
    model, _ = tiny_llama
    other = make_module(model, tmp_path / "other", seed=5, base_name="some-org/other-model")
    with pytest.raises(LorahubValueError, match=r"'other' was trained on base model 'some-org/other-model'"):
        _store(llama_modules[0], other).stack(["mod0", "other"], model)
    with pytest.raises(LorahubValueError, match="not on 'google/flan-t5-large'"):
        _store(llama_modules[0]).stack(["mod0"], model, base_name="google/flan-t5-large")


def test_shape_mismatch_with_base(tiny_llama, tiny_t5, llama_modules):
    t5, _ = tiny_t5
    with pytest.raises(LorahubValueError, match=r"layer 'model.layers.0.self_attn.q_proj' does not exist in the base model"):
        _store(llama_modules[0]).stack(["mod0"], t5)


def test_missing_and_corrupted_weights(llama_modules, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_modules[0], broken)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(LorahubFileError, match=r"module 'broken': no adapter_model.safetensors or adapter_model.bin"):
        read_module(broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(LorahubIntegrityError, match=r"module 'broken': cannot read .*adapter_model.safetensors"):
        read_module(broken)


def test_sha256_mismatch_via_manifest(llama_modules, tmp_path):
    manifest = tmp_path / "hub.json"
    entry = add_to_manifest(manifest, str(llama_modules[0]), task="t0")
    store = ModuleStore.from_manifest(manifest)
    assert store.verify() == [("mod0", None)]
    data = json.loads(manifest.read_text())
    data["modules"][0]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(data))
    with pytest.raises(LorahubIntegrityError, match=r"module 'mod0': sha256 of .* is " + entry["sha256"]):
        ModuleStore.from_manifest(manifest).load("mod0")


def test_legacy_bin_loads_like_safetensors(llama_modules, tmp_path):
    from safetensors.torch import load_file

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(llama_modules[0] / "adapter_config.json", legacy)
    torch.save(load_file(str(llama_modules[0] / "adapter_model.safetensors")), legacy / "adapter_model.bin")
    a, b = read_module(llama_modules[0]), read_module(legacy)
    assert a.layers.keys() == b.layers.keys()
    for k in a.layers:
        torch.testing.assert_close(a.layers[k][0], b.layers[k][0])


def test_unknown_module_and_hub_list_names(llama_modules):
    store = _store(*llama_modules)
    with pytest.raises(LorahubValueError, match=r"unknown module 'nope'. Available: mod0, mod1"):
        store.load("nope")
    with pytest.raises(LorahubFileError, match=r"unknown hub 'no-such-hub'.*Available:"):
        ModuleStore.from_manifest("no-such-hub")


def test_hub_id_offline_fails_fast_and_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import time otherwise
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    store = ModuleStore()
    store.add_path("hf://lorahub/flan_t5_large-ag_news_subset")
    with pytest.raises(LorahubFileError, match=r"module .flan_t5_large-ag_news_subset. .*hub repo .lorahub/flan_t5_large-ag_news_subset. is not in the local Hugging Face cache"):
        store.load("flan_t5_large-ag_news_subset")


def test_select_is_seeded(llama_modules):
    store = _store(*llama_modules)
    assert store.select(2, 1) == store.select(2, 1)
    assert len({tuple(store.select(2, s)) for s in range(10)}) > 1
    assert store.select(10, 0) == store.names
    with pytest.raises(LorahubValueError, match="positive"):
        store.select(0, 0)


def test_bad_manifest(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LorahubValueError, match=r"manifest .*bad.json is not valid JSON"):
        ModuleStore.from_manifest(bad)
    bad.write_text(json.dumps({"modules": [{"name": "x"}]}))
    with pytest.raises(LorahubValueError, match=r"modules\[0\] needs 'name' and 'location'"):
        ModuleStore.from_manifest(bad)


def test_hub_path_env_then_package(monkeypatch, tmp_path):
    from lorahub.store import PACKAGE_HUB_DIR, hub_dirs, resolve_manifest

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    (tmp_path / "b" / "mine.json").write_text(json.dumps({"name": "mine", "modules": []}))
    monkeypatch.delenv("LORAHUB_HUB_INDEX", raising=False)
    monkeypatch.setenv("LORAHUB_HUB_PATH", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    assert hub_dirs() == [tmp_path / "a", tmp_path / "b", PACKAGE_HUB_DIR]
    assert resolve_manifest("mine") == tmp_path / "b" / "mine.json"
    assert resolve_manifest("smollm2-135m-bigbench") == PACKAGE_HUB_DIR / "smollm2-135m-bigbench.json"
    monkeypatch.delenv("LORAHUB_HUB_PATH")
    monkeypatch.setenv("LORAHUB_HUB_INDEX", str(tmp_path / "b"))  # the former name still works
    assert resolve_manifest("mine") == tmp_path / "b" / "mine.json"
    monkeypatch.delenv("LORAHUB_HUB_INDEX")
    assert hub_dirs() == [PACKAGE_HUB_DIR]
    with pytest.raises(LorahubFileError, match=r"unknown hub 'mine'.*LORAHUB_HUB_PATH.*Available: .*smollm2-135m-bigbench"):
        resolve_manifest("mine")


def test_weights_file_prefers_safetensors_and_names_the_folder(llama_modules, tmp_path):
    from lorahub.store import weights_file

    folder = tmp_path / "m"
    shutil.copytree(llama_modules[0], folder)
    assert weights_file(folder) == folder / "adapter_model.safetensors"
    (folder / "adapter_model.bin").write_bytes(b"x")
    assert weights_file(folder) == folder / "adapter_model.safetensors"
    (folder / "adapter_model.safetensors").unlink()
    assert weights_file(folder) == folder / "adapter_model.bin"
    (folder / "adapter_model.bin").unlink()
    with pytest.raises(LorahubFileError, match=f"no adapter_model.safetensors or adapter_model.bin in {folder}"):
        weights_file(folder)


def test_manifest_read_write_upsert(llama_modules, tmp_path):
    from lorahub.files import sha256_file
    from lorahub.store import read_manifest, upsert_entry

    path = tmp_path / "hubs" / "h.json"
    with pytest.raises(LorahubFileError, match=r"manifest .*h.json not found"):
        read_manifest(path)
    upsert_entry(path, {"name": "a", "location": "x"}, base_model="b")
    upsert_entry(path, {"name": "c", "location": "y"}, base_model="other")  # header keys only fill what is unset
    upsert_entry(path, {"name": "a", "location": "z"})
    data = read_manifest(path)
    assert data["name"] == "h" and data["base_model"] == "b"
    assert [(m["name"], m["location"]) for m in data["modules"]] == [("c", "y"), ("a", "z")]
    path.write_text('{"modules": [\n  {"name": "a",}\n]}')
    with pytest.raises(LorahubValueError, match=r"manifest .*h.json is not valid JSON \(.* at line 2\)"):
        read_manifest(path)
    entry = add_to_manifest(tmp_path / "m.json", str(llama_modules[1]))
    store = ModuleStore.from_manifest(tmp_path / "m.json")
    assert store.weights_sha256("mod1") == entry["sha256"] == sha256_file(llama_modules[1] / "adapter_model.safetensors")
    assert _store(llama_modules[1]).weights_sha256("mod1") == entry["sha256"]  # no manifest: hashed
