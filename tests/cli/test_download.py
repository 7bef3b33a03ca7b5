"""``kat-timm download``: offline, against a fake Hugging Face cache in tmp_path (the fakes of
``tests/tools/test_download.py``); every test ends by checking that timm then loads the weights with
HF_HUB_OFFLINE=1, or that the failure names the model and the reason.
"""
from __future__ import annotations

import time

import pytest
from huggingface_hub import constants

import kat_timm.tools.download as download_module
from kat_timm.cli import download as cli
from kat_timm.cli import main as kat_timm_main
from kat_timm.tools.download import DownloadError, download_pretrained, format_size, released_models

from tests.tools.test_download import (
    RELEASED_REPOS,
    TINY_REPO,
    FakeHub,
    _allow_loopback_only,
    _as_blob,
    _assert_loads_offline,
    _no_fetch,
    _released_files,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_already_cached_fetches_nothing_and_timm_loads_offline(released_hub, kat_tiny_weights, monkeypatch, capsys):
    monkeypatch.setattr(download_module, "hf_hub_download", _no_fetch)
    assert kat_timm_main(["download", "kat_tiny", "kat_tiny_patch16_224.vitft"]) == 0
    out = capsys.readouterr().out
    assert "kat_tiny (adamdad/kat_tiny_patch16_224)" in out
    assert "kat_tiny_patch16_224.vitft (adamdad/kat_tiny_patch16_224.vitft)" in out
    assert out.count("already cached") == 5 and "fetched 0 B" in out  # 2 files x 2 models + the summary
    size = (released_hub.snapshot(TINY_REPO) / "pytorch_model.bin").stat().st_size
    assert format_size(size) in out and "MB" in out
    assert f"in {released_hub.snapshot(TINY_REPO)}" in out
    assert f"ready in {released_hub.root}" in out
    _assert_loads_offline(kat_tiny_weights["scratch"])


def test_fetch_gets_what_timm_loads_then_reports_it_cached(offline_hub, ckpt, kat_tiny_weights, tmp_path,
                                                           monkeypatch, capsys):
    hub = FakeHub(offline_hub, {TINY_REPO: _released_files(ckpt, kat_tiny_weights["scratch"], tmp_path)})
    monkeypatch.setattr(download_module, "hf_hub_download", hub)

    assert cli.main(["kat_tiny_patch16_224"]) == 0
    out = capsys.readouterr().out
    # timm's order: safetensors first (the release has none), then the .bin.
    assert hub.calls == [(TINY_REPO, "config.json"), (TINY_REPO, "model.safetensors"), (TINY_REPO, "pytorch_model.bin")]
    assert out.count("fetched") == 3 and "already cached" in out.splitlines()[-1]  # 2 files + the summary
    bin_size = len(hub.repos[TINY_REPO]["pytorch_model.bin"])
    assert f"fetched {format_size(bin_size + len(hub.repos[TINY_REPO]['config.json']))}" in out

    result = download_pretrained("kat_tiny_patch16_224")  # again: all from the cache, no call
    assert len(hub.calls) == 3
    assert [(f.filename, f.fetched, f.size) for f in result.files] == [
        ("config.json", False, len(hub.repos[TINY_REPO]["config.json"])), ("pytorch_model.bin", False, bin_size)]
    assert result.folder == offline_hub.snapshot(TINY_REPO)
    _assert_loads_offline(kat_tiny_weights["scratch"])


def test_offline_with_empty_cache_names_the_model_and_says_offline(offline_hub, capsys):
    assert kat_timm_main(["download", "kat_tiny.vitft"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kat-timm download: error: kat_tiny.vitft (adamdad/kat_tiny_patch16_224.vitft): ")
    assert "config.json is not in the cache" in err and "HF_HUB_OFFLINE=1" in err and str(offline_hub.root) in err


def test_one_failure_does_not_stop_the_others(released_hub, capsys):
    assert cli.main(["kat_small", "kat_tiny"]) == 1
    captured = capsys.readouterr()
    assert "kat_small (adamdad/kat_small_patch16_224): config.json is not in the cache" in captured.err
    assert "kat_tiny (adamdad/kat_tiny_patch16_224)" in captured.out and "1 of 2 model(s) ready" in captured.out


@pytest.mark.parametrize("name,message", [
    ("kat_huge", "unknown model 'kat_huge'; released KAT checkpoints: kat_base_patch16_224, "),
    ("kat_tiny.in22k", "kat_tiny has no pretrained tag 'in22k'; its pretrained names: kat_tiny, kat_tiny.vitft"),
    ("kat_base_gelu_patch16_224", "kat_base_gelu_patch16_224 has no weights on the Hugging Face Hub"),
    ("hf-hub:no-owner", "is not of the form hf-hub:owner/repo"),
])
def test_unknown_names_and_tags_are_usage_errors_before_any_fetch(offline_hub, monkeypatch, capsys, name, message):
    monkeypatch.setattr(download_module, "hf_hub_download", _no_fetch)
    assert cli.main(["kat_tiny", name]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1


def test_all_is_every_released_checkpoint_once(offline_hub, monkeypatch, capsys):
    models = released_models()
    assert set(models.values()) == RELEASED_REPOS and len(models) == 6
    assert all(name == repo.split("/")[1] for name, repo in models.items()), "the repo's own name is listed"
    for repo in RELEASED_REPOS:
        offline_hub.add_file(repo, "config.json", b"{}")
        offline_hub.add_file(repo, "pytorch_model.bin", b"0" * 1500)
    monkeypatch.setattr(download_module, "hf_hub_download", _no_fetch)
    assert cli.main(["all", "kat_tiny_patch16_224"]) == 0  # a name also in 'all' is done once
    out = capsys.readouterr().out
    assert "6 of 6 model(s) ready" in out and "1.5 kB" in out
    for name, repo in models.items():
        assert f"{name} ({repo})" in out


def test_cache_dir_is_used_and_the_output_says_to_set_hf_hub_cache(offline_hub, tmp_path, ckpt, monkeypatch, capsys):
    from tests.conftest import FakeHubCache

    other = FakeHubCache(tmp_path / "shared-cache")
    other.add_file(TINY_REPO, "config.json", b"{}")
    other.add_file(TINY_REPO, "pytorch_model.bin", b"weights")
    real_hf_hub_download = download_module.hf_hub_download
    monkeypatch.setattr(download_module, "hf_hub_download", _no_fetch)
    assert cli.main(["kat_tiny", "--cache-dir", str(other.root)]) == 0
    out = capsys.readouterr().out
    assert f"in {other.snapshot(TINY_REPO)}" in out and f"HF_HUB_CACHE={other.root}" in out
    monkeypatch.setattr(download_module, "hf_hub_download", real_hf_hub_download)
    assert cli.main(["kat_tiny"]) == 1, "the default cache (empty) is not the one given before"


def test_unreachable_hub_fails_at_once_and_cached_models_still_count(released_hub, monkeypatch, capsys, ckpt,
                                                                     kat_tiny_weights, tmp_path):
    # Online mode, the Hub at a port nothing listens on: kat_tiny is cached, kat_small and kat_base are not.
    # huggingface_hub's hf_hub_download alone retries a refused connection for about 20 s per file.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # What HF_ENDPOINT=http://127.0.0.1:9 sets when huggingface_hub is imported.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    _allow_loopback_only(monkeypatch)
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"network error while fetching config.json: .*\(Hub: http://127.0.0.1:9\)"):
        download_pretrained("kat_small")
    assert time.monotonic() - start < 5, f"an unreachable Hub took {time.monotonic() - start:.1f} s to report"
    assert cli.main(["kat_small", "kat_tiny", "kat_base"]) == 1
    captured = capsys.readouterr()
    assert time.monotonic() - start < 10
    assert "kat_tiny (adamdad/kat_tiny_patch16_224)" in captured.out and "1 of 3 model(s) ready" in captured.out
    for size in ("small", "base"):
        assert (f"kat_{size} (adamdad/kat_{size}_patch16_224): network error while fetching config.json: ") \
            in captured.err and "run the download on a machine that reaches the Hub" in captured.err
    assert not constants.is_offline_mode(), "offline mode is never switched on behind the user's back"

    # A reachable Hub: the missing files are fetched.
    small_repo = "adamdad/kat_small_patch16_224"
    monkeypatch.setattr(download_module, "_hub_answers", lambda *args: None)
    hub = FakeHub(released_hub, {small_repo: {"config.json": b"{}", "pytorch_model.bin": b"weights"}})
    monkeypatch.setattr(download_module, "hf_hub_download", hub)
    assert cli.main(["kat_small"]) == 0
    assert hub.calls == [(small_repo, "config.json"), (small_repo, "model.safetensors"),
                         (small_repo, "pytorch_model.bin")]


def test_a_damaged_cached_weight_file_is_not_called_cached(released_hub, monkeypatch, capsys):
    blob = _as_blob(released_hub, TINY_REPO, "pytorch_model.bin")
    assert cli.main(["kat_tiny"]) == 0 and "already cached" in capsys.readouterr().out  # intact: nothing to do
    blob.write_bytes(blob.read_bytes()[:1000])  # a download or a copy cut short
    monkeypatch.setattr(download_module, "hf_hub_download", _no_fetch)
    assert cli.main(["kat_tiny"]) == 1
    captured = capsys.readouterr()
    assert "already cached" not in captured.out
    assert f"the cached pytorch_model.bin ({released_hub.snapshot(TINY_REPO) / 'pytorch_model.bin'}) is damaged" \
        in captured.err and "kat-timm download --force" in captured.err, captured.err


def test_a_damaged_file_is_fetched_again_and_force_fetches_everything(released_hub, ckpt, kat_tiny_weights, tmp_path,
                                                                     monkeypatch, capsys):
    blob = _as_blob(released_hub, TINY_REPO, "pytorch_model.bin")
    good = blob.read_bytes()
    blob.write_bytes(good[:1000])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(download_module, "_hub_answers", lambda *args: None)
    hub = FakeHub(released_hub, {TINY_REPO: {"config.json": (released_hub.snapshot(TINY_REPO) / "config.json")
                                             .read_bytes(), "pytorch_model.bin": good}})
    monkeypatch.setattr(download_module, "hf_hub_download", hub)
    assert cli.main(["kat_tiny"]) == 0
    assert hub.calls == [(TINY_REPO, "pytorch_model.bin")], "only the damaged file is fetched again"
    assert blob.read_bytes() == good
    assert cli.main(["kat_tiny", "--force"]) == 0
    assert hub.calls[1:] == [(TINY_REPO, "config.json"), (TINY_REPO, "pytorch_model.bin")]
    assert "already cached" not in capsys.readouterr().out.splitlines()[-2]



def test_cache_dir_that_cannot_be_created_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["kat_tiny", "--cache-dir", str(blocker / "cache")]) == 2
    err = capsys.readouterr().err
    assert f"--cache-dir {blocker / 'cache'}: cannot create it (Not a directory)" in err, err
    assert "Traceback" not in err, err


def test_force_in_offline_mode_is_one_line_before_anything_is_fetched(released_hub, monkeypatch, capsys):
    """huggingface_hub refuses force_download offline with a ValueError: say so in one line, naming the fix."""
    monkeypatch.setattr(download_module, "hf_hub_download", _no_fetch)
    assert cli.main(["kat_tiny", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kat-timm download: error: --force fetches every file from the Hub again, but "
                          "HF_HUB_OFFLINE=1 is set"), err
    assert "Traceback" not in err and err.count("\n") == 1, err
    with pytest.raises(DownloadError, match="offline mode"):
        download_pretrained("kat_tiny", force=True)
