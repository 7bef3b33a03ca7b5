"""kat_timm.tools.zoo and scripts/model_zoo.py: the registered models and tags, parameters, FLOPs, top-1, Hub ids, aliases,
and the local-cache check (offline: a fake Hugging Face cache in tmp_path)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import timm

from kat_timm.tools import zoo
from kat_timm.ops.flops import RATIONAL_FORWARD_FLOPS_PER_ELEMENT

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "model_zoo.py"
# Exact parameter counts of the released models (KAT_NOTES.md).
PARAMS = {"tiny": 5_718_328, "small": 22_051_576, "base": 86_568_568}
TOP1 = {"tiny": (74.6, 75.7), "small": (81.2, 82.0), "base": (82.3, 82.8)}
EMBED = {"tiny": 192, "small": 384, "base": 768}


def _size(name: str) -> str:
    return name.split("_")[1]


@pytest.fixture(scope="module")
def rows():
    return zoo.zoo_rows()


def test_every_registered_name_and_tag_has_one_row(rows):
    registered = timm.list_models("kat*")
    assert len(registered) == 12
    assert sorted({row.model for row in rows}) == sorted(registered)
    with_weights = sorted(row.name for row in rows if row.has_weights)
    assert with_weights == sorted(timm.list_pretrained("kat*"))
    assert len(rows) == len(set(row.name for row in rows)), "duplicate rows"


def test_parameters_top1_and_hub_ids(rows):
    for row in rows:
        size = _size(row.model)
        assert row.params == PARAMS[size], row.name
        if "gelu" in row.model:
            assert (row.tag, row.hf_hub_id, row.top1, row.alias_of) == (None, None, None, None), row
            assert row.training == "no released weights (init variant)"
            assert row.load == f'timm.create_model("{row.model}")'
            continue
        repo = f"adamdad/kat_{size}_patch16_224" + (".vitft" if row.tag == "vitft" else "")
        assert row.hf_hub_id == repo, row.name
        assert row.top1 == TOP1[size][row.tag == "vitft"], row.name
        assert row.load == f'timm.create_model("{row.name}", pretrained=True)'


def test_short_and_swish_names_are_aliases_of_the_canonical_names(rows):
    by_name = {row.name: row for row in rows}
    assert by_name["kat_tiny"].alias_of == "kat_tiny_patch16_224"
    assert by_name["kat_small.vitft"].alias_of == "kat_small_patch16_224.vitft"
    assert by_name["kat_base_swish_patch16_224"].alias_of == "kat_base_patch16_224"
    assert by_name["kat_tiny_patch16_224"].alias_of is None
    shown, aliases = zoo.canonical_rows(rows)
    assert [row.name for row in shown] == [
        "kat_tiny_patch16_224", "kat_tiny_patch16_224.vitft", "kat_tiny_gelu_patch16_224",
        "kat_small_patch16_224", "kat_small_patch16_224.vitft", "kat_small_gelu_patch16_224",
        "kat_base_patch16_224", "kat_base_patch16_224.vitft", "kat_base_gelu_patch16_224",
    ]
    assert aliases["kat_tiny_patch16_224.vitft"] == ["kat_tiny.vitft", "kat_tiny_swish_patch16_224.vitft"]
    # Every alias really is the same architecture (the zoo measures only the canonical one).
    assert zoo.kat_num_params("kat_tiny_swish_patch16_224") == by_name["kat_tiny_patch16_224"].params


def test_model_flops_counts_the_rationals():
    forward = zoo.model_flops("kat_tiny_patch16_224")
    tokens, depth, embed = 197, 12, EMBED["tiny"]
    assert forward.rational == depth * tokens * (embed + 4 * embed) * RATIONAL_FORWARD_FLOPS_PER_ELEMENT
    assert forward.total == zoo.model_flops("vit_tiny_patch16_224").total + forward.rational
    assert forward.macs == forward.total / 2
    batch2 = zoo.model_flops("kat_tiny_patch16_224", batch_size=2)
    assert batch2.total == 2 * forward.total
    step = zoo.model_flops("kat_tiny_patch16_224", backward=True)
    assert step.rational > forward.rational and step.total > 2 * forward.total


def test_markdown_table_lists_canonical_rows_and_aliases():
    rows = zoo.zoo_rows("kat_tiny*", flops=True)
    table = zoo.markdown_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| Model | Tag | Trained | Params | GMACs | GFLOPs |")
    body = [line for line in lines[2:] if line.startswith("| ")]
    assert len(body) == 3  # default tag, vitft, gelu
    assert "| `kat_tiny_patch16_224` | `vitft` |" in table and "| 75.7 |" in table
    assert "| 5.72 M | 1.28 | 2.55 |" in table  # 2,552,755,200 FLOPs measured for one 224 px image
    assert "- `kat_tiny_patch16_224`: `kat_tiny`, `kat_tiny_swish_patch16_224`" in table
    assert "| `kat_tiny` |" not in table


def test_checkpoint_cached_reads_the_local_cache_only(offline_hub):
    repo = "adamdad/kat_tiny_patch16_224"
    assert not zoo.checkpoint_cached(repo)
    offline_hub.add_config(repo, {"architecture": "kat_tiny_patch16_224"})
    assert not zoo.checkpoint_cached(repo), "a config.json alone is not loadable weights"
    offline_hub.add_file(repo, "pytorch_model.bin", b"weights")
    assert zoo.checkpoint_cached(repo)
    safetensors_only = "adamdad/kat_small_patch16_224"
    offline_hub.add_file(safetensors_only, "model.safetensors", b"weights")
    assert zoo.checkpoint_cached(safetensors_only)
    assert not zoo.checkpoint_cached("adamdad/kat_base_patch16_224")


def _load_script():
    spec = importlib.util.spec_from_file_location("model_zoo_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_prints_markdown_and_json(capsys):
    script = _load_script()
    assert script.main(["--no-flops"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| Model | Tag | Trained | Params | Top-1 (IN-1k) | Hub id | Load |")
    assert "`timm.create_model(\"kat_base_patch16_224.vitft\", pretrained=True)`" in out
    assert "Generated by `python scripts/model_zoo.py` on " in out

    assert script.main(["--json", "--no-flops"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {entry["name"] for entry in data} >= set(timm.list_models("kat*"))
    assert {entry["params"] for entry in data} == set(PARAMS.values())
    assert all(entry["flops"] is None for entry in data)
