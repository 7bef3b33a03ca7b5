"""kat_timm.cli.common: model creation from command-line options, with clear errors, and the Hub access that
never hangs on an unreachable Hub."""
import time

import pytest
import torch

import kat_timm.tools.download as download_module
from kat_timm.cli import CLIError, common
from kat_timm.cli.common import create_model, resolve_device


def test_unknown_model_names_similar_ones():
    with pytest.raises(CLIError, match=r"unknown model 'kat_tinny'.*kat_tiny") as error:
        create_model("kat_tinny")
    assert error.value.code == 2


def test_checkpoint_of_another_architecture_names_it(tmp_path, ckpt):
    path = ckpt.save_released(ckpt.random_kat_state_dict(7, weight_init="skip"), tmp_path / "tiny.pth")
    with pytest.raises(CLIError, match=r"does not fit kat_small.*kat_tiny_patch16_224"):
        create_model("kat_small", checkpoint=path, weight_init="skip")


def test_checkpoint_with_nan_weights_is_refused(tmp_path, ckpt):
    state_dict = ckpt.random_kat_state_dict(7, weight_init="skip")
    state_dict["cls_token"] = torch.full_like(state_dict["cls_token"], float("nan"))
    path = ckpt.save_released(state_dict, tmp_path / "diverged.pth")
    with pytest.raises(CLIError, match=r"non-finite values .* cls_token"):
        create_model("kat_tiny", checkpoint=path, weight_init="skip")


def test_checkpoint_loads_and_takes_its_class_count(tmp_path, ckpt):
    state_dict = ckpt.random_kat_state_dict(7, weight_init="skip", num_classes=10)
    path = ckpt.save_released(state_dict, tmp_path / "ten.pth")
    model = create_model("kat_tiny", checkpoint=path, weight_init="skip")
    assert model.num_classes == 10
    assert torch.equal(model.state_dict()["head.weight"], state_dict["head.weight"])


def test_cuda_where_there_is_none_is_a_usage_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error path cannot be reached")
    with pytest.raises(CLIError, match="CUDA is not available") as error:
        resolve_device("cuda")
    assert error.value.code == 2
    assert resolve_device(None) == torch.device("cpu")


def test_pretrained_with_an_unreachable_hub_fails_at_once_naming_the_reason(monkeypatch, offline_hub):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online mode; sockets stay blocked by offline_hub
    monkeypatch.setattr(download_module, "hub_unreachable", lambda url=None: "huggingface.co did not answer")
    start = time.perf_counter()
    with pytest.raises(CLIError, match=r"huggingface.co did not answer, and they are not in the local .*kat-timm "
                                       r"download kat_tiny"):
        create_model("kat_tiny", pretrained=True, weight_init="skip")
    assert time.perf_counter() - start < 20


def test_unknown_tag_lists_the_pretrained_names():
    from kat_timm.cli.common import check_model_name

    check_model_name("kat_tiny.vitft")  # known: no error
    with pytest.raises(CLIError, match=r"kat_tiny has no pretrained tag 'bogus'.*kat_tiny\.vitft") as error:
        check_model_name("kat_tiny.bogus")
    assert error.value.code == 2


@pytest.mark.parametrize("command, argv", [
    ("predict", ["IMAGE", "--model", "kat_tiny"]),
    ("plot", ["--model", "kat_tiny"]),
    ("export", ["kat_tiny", "--pretrained"]),
])
def test_missing_weights_hints_name_options_the_command_has(command, argv, offline_hub, capsys, tmp_path):
    """Every option the command's missing-released-weights error suggests parses with its own parser."""
    import importlib
    import re

    from kat_timm.cli.demo import sample_images

    module = importlib.import_module(f"kat_timm.cli.{command}")
    parser = module._parser("x") if command == "export" else module.build_parser("x")
    argv = [str(sample_images()[0]) if arg == "IMAGE" else arg for arg in argv]
    assert module.main([*argv, "-o" if command != "predict" else "--top-k",
                        str(tmp_path / f"out.{'onnx' if command == 'export' else 'png'}") if command != "predict"
                        else "1"]) == 1
    err = capsys.readouterr().err
    assert "could not load the released weights of kat_tiny" in err
    suggested = re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", err)
    assert "--checkpoint" in suggested
    for option in suggested:
        assert option in parser._option_string_actions, f"{command} suggests {option}, which it lacks"


def test_missing_weights_hint_of_the_training_route_names_no_foreign_option(offline_hub):
    """kat-train builds through create_sized_model: its error offered --checkpoint, which kat-train lacks (argparse
    took it for --checkpoint-hist). Without alternatives given, only 'kat-timm download' is suggested."""
    import re

    from kat_timm.cli.common import create_sized_model

    with pytest.raises(CLIError) as caught:
        create_sized_model("kat_tiny", [32], pretrained=True)
    message = str(caught.value)
    assert "kat-timm download kat_tiny" in message and "\n" not in message
    suggested = re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", message)
    assert suggested == [], f"suggests {suggested}"


# ---------------------------------------------------------------------------------------------------------------------
# The Hub: one bounded request, then the cache
# ---------------------------------------------------------------------------------------------------------------------


class _FakeSession:
    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.calls = []

    def head(self, url, headers=None, timeout=None):
        self.calls.append((url, timeout))
        return self.behaviour(url, timeout)


@pytest.fixture
def online_mode(monkeypatch):
    """huggingface_hub in online mode (the test replaces its HTTP session, so nothing leaves the machine)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _use_session(monkeypatch, behaviour) -> _FakeSession:
    import huggingface_hub.utils

    session = _FakeSession(behaviour)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: session)
    return session


def _refuse(url, timeout):
    raise ConnectionError("Name or service not known")


def test_probe_is_one_request_bounded_by_huggingface_hubs_etag_timeout(monkeypatch, online_mode):
    from huggingface_hub import constants

    class ReadTimeout(Exception):
        pass

    def hang(url, timeout):
        raise ReadTimeout("timed out")

    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 0.5)
    session = _use_session(monkeypatch, hang)
    assert download_module.hub_unreachable() == "huggingface.co did not answer within 0.5 s (HF_HUB_ETAG_TIMEOUT)"
    assert session.calls == [(constants.ENDPOINT, 0.5)], "one request, with huggingface_hub's own timeout"


def test_probe_reports_connection_errors_and_answers(monkeypatch, online_mode):
    _use_session(monkeypatch, _refuse)
    assert download_module.hub_unreachable() == "huggingface.co is unreachable: Name or service not known"
    _use_session(monkeypatch, lambda url, timeout: object())
    assert download_module.hub_unreachable() is None


def test_unreachable_hub_loads_cached_weights_without_switching_offline_mode(monkeypatch, released_hub, online_mode,
                                                                            kat_tiny_weights):
    from huggingface_hub import constants

    # Sockets stay blocked (released_hub): a download attempt would fail the load, after its retries.
    session = _use_session(monkeypatch, _refuse)
    start = time.perf_counter()
    model = common.create_model("kat_tiny", pretrained=True)
    assert time.perf_counter() - start < 10
    torch.testing.assert_close(model.state_dict()["head.weight"], kat_tiny_weights["scratch"]["head.weight"])
    assert len(session.calls) == 1 and "adamdad/kat_tiny_patch16_224" in session.calls[0][0]
    assert constants.HF_HUB_OFFLINE is False, "the process-wide offline flag must be left alone"


def test_reachable_hub_downloads_through_huggingface_hub(monkeypatch, released_hub, online_mode, kat_tiny_weights):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    _use_session(monkeypatch, lambda url, timeout: object())
    asked = []

    def download(repo_id, filename, revision=None):  # what hf_hub_download does for a repo without safetensors
        asked.append(filename)
        if filename == "model.safetensors":
            raise EntryNotFoundError("404: no model.safetensors")
        return huggingface_hub.try_to_load_from_cache(repo_id, filename)

    monkeypatch.setattr(download_module, "hf_hub_download", download)
    model = common.create_model("kat_tiny", pretrained=True)
    assert asked == ["model.safetensors", "pytorch_model.bin"]
    torch.testing.assert_close(model.state_dict()["head.weight"], kat_tiny_weights["scratch"]["head.weight"])


def test_unreachable_hub_without_cache_fails_at_once_with_the_reason(monkeypatch, offline_hub, online_mode):
    _use_session(monkeypatch, _refuse)
    start = time.perf_counter()
    with pytest.raises(common.ReleasedWeightsUnavailable) as caught:
        common.create_model("kat_tiny", pretrained=True)
    assert time.perf_counter() - start < 10
    assert caught.value.reason.startswith("huggingface.co is unreachable: Name or service not known, and they are "
                                          "not in the local")
    assert "\n" not in str(caught.value)
