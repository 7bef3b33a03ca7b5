"""``kat-timm info``: backend, versions, the registered models with parameters and top-1, and the local-cache column.

Run in-process through ``main([...])``; offline (the ``offline_hub`` / ``released_hub`` fake cache in tmp_path).
"""
from __future__ import annotations

import json

import pytest
import timm
import torch

from kat_timm.cli import info
from kat_timm.cli import main as kat_timm_main
from kat_timm.ops import select_backend

PARAMS = {"tiny": 5_718_328, "small": 22_051_576, "base": 86_568_568}


def _json(capsys, *args) -> dict:
    assert info.main(["--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _models(data: dict) -> dict:
    return {model["name"]: model for model in data["models"]}


def test_json_lists_every_registered_model_with_its_parameters(capsys, offline_hub):
    data = _json(capsys)
    registered = timm.list_models("kat*")
    assert len(registered) == 12
    assert sorted({model["model"] for model in data["models"]}) == sorted(registered)
    for model in data["models"]:
        assert model["params"] == PARAMS[model["model"].split("_")[1]], model["name"]
    models = _models(data)
    assert models["kat_small_patch16_224.vitft"]["top1"] == 82.0
    assert models["kat_base_patch16_224"]["hf_hub_id"] == "adamdad/kat_base_patch16_224"
    assert models["kat_tiny_gelu_patch16_224"]["training"] == "no released weights (init variant)"
    assert models["kat_tiny"]["alias_of"] == "kat_tiny_patch16_224"
    assert "flops" in models["kat_tiny"] and models["kat_tiny"]["flops"] is None  # only with --flops


def test_json_reports_the_active_backend_and_versions(capsys, offline_hub):
    data = _json(capsys)
    cpu = data["backend"]["devices"]["cpu"]
    for dtype in ("float32", "bfloat16", "float16", "float64"):
        assert cpu[dtype]["backend"] == select_backend(torch.empty(0, dtype=getattr(torch, dtype))), dtype
    assert cpu["float64"]["backend"] == "torch"
    assert data["backend"]["requested"] == "auto" and data["backend"]["error"] is None
    native = data["backend"]["native_cpu"]
    if native["available"]:
        assert cpu["float32"]["backend"] == "native" and native["library"].endswith(".so")
    versions = data["versions"]
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"] == torch.__version__
    assert versions["timm"] == timm.__version__
    assert set(versions) >= {"python", "kat_timm", "triton", "huggingface_hub", "cuda", "gpus"}
    assert data["hub"] == {"cache": str(offline_hub.root), "offline": True}


def test_forced_and_invalid_backends_are_reported_not_fatal(capsys, offline_hub, use_backend):
    use_backend("torch")
    data = _json(capsys)
    assert {choice["backend"] for choice in data["backend"]["devices"]["cpu"].values()} == {"torch"}

    use_backend("sideways")
    data = _json(capsys)
    assert data["backend"]["requested"] is None
    assert "KAT_RATIONAL_BACKEND='sideways' is not one of" in data["backend"]["error"]

    assert info.main([]) == 0
    assert "ERROR: KAT_RATIONAL_BACKEND='sideways'" in capsys.readouterr().out


def _cache_cells(text: str) -> dict:
    """(model, tag) -> the local-cache cell of each table row of the text output."""
    cells = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0].startswith("kat_") and parts[0].endswith("_224") and len(parts) > 2:
            cells[(parts[0], parts[1])] = "not cached" if line.endswith("not cached") else parts[-1]
    return cells


def test_cache_column_shows_which_released_checkpoints_are_local(capsys, released_hub):
    # released_hub holds adamdad/kat_tiny_patch16_224 and its .vitft; nothing else.
    models = _models(_json(capsys))
    assert models["kat_tiny_patch16_224"]["cached"] is True
    assert models["kat_tiny_patch16_224.vitft"]["cached"] is True
    assert models["kat_tiny"]["cached"] is True  # same repo under its short name
    assert models["kat_small_patch16_224"]["cached"] is False
    assert models["kat_base_patch16_224.vitft"]["cached"] is False
    assert models["kat_tiny_gelu_patch16_224"]["cached"] is None  # nothing to cache

    assert info.main([]) == 0
    cells = _cache_cells(capsys.readouterr().out)
    assert cells[("kat_tiny_patch16_224", "(default)")] == "cached"
    assert cells[("kat_tiny_patch16_224", "vitft")] == "cached"
    assert cells[("kat_small_patch16_224", "(default)")] == "not cached"
    assert cells[("kat_base_patch16_224", "vitft")] == "not cached"
    assert cells[("kat_tiny_gelu_patch16_224", "-")] == "-"
    assert len(cells) == 9


def test_empty_cache_means_not_cached(capsys, offline_hub):
    models = _models(_json(capsys))
    assert {m["cached"] for m in models.values() if m["hf_hub_id"]} == {False}


def test_flops_only_on_request(capsys, offline_hub):
    models = _models(_json(capsys, "--flops"))
    tiny = models["kat_tiny_patch16_224"]["flops"]
    assert tiny["rational"] == 12 * 197 * (192 + 768) * 20
    assert tiny["macs"] == tiny["total"] / 2
    assert tiny["total"] == 2_552_755_200
    assert info.main(["--flops"]) == 0
    out = capsys.readouterr().out
    assert "GMACs" in out and "1.28" in out


def test_dispatcher_runs_info_and_rejects_unknown_options(capsys, offline_hub):
    assert kat_timm_main(["info"]) == 0
    out = capsys.readouterr().out
    assert "rational op backend" in out and "kat_base_patch16_224" in out
    with pytest.raises(SystemExit) as exit_info:
        info.main(["--no-such-option"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
