"""KAT against the model contract timm's own test suite (tests/test_models.py) checks, offline and fast.

timm's suite itself runs through ``scripts/run_timm_model_tests.py`` (it needs timm's sdist from PyPI); these
tests cover the same ground on ``kat_tiny_patch16_224`` at small image sizes: forward / backward, the default
config, meta device and factory kwargs, classifier reset and pooling, parameter groups and weight decay,
feature extraction (features_only, forward_intermediates, pruning, fx), other input sizes and channels,
gradient checkpointing, TorchScript and torch.compile.
"""
from __future__ import annotations

import copy
import fnmatch
import inspect

import pytest
import torch
from torch import nn

import timm
from timm.models import create_feature_extractor, get_graph_node_names, group_parameters
from timm.optim import param_groups_weight_decay

import kat_timm  # noqa: F401  (registers the models)
from kat_timm.layers import GroupRational
from kat_timm.models import KAT
from tests.helpers import torch_threads

NAME = "kat_tiny_patch16_224"
EMBED_DIM, DEPTH, PATCH = 192, 12, 16
RATIONAL_SUFFIXES = ("weight_numerator", "weight_denominator")


def create(**kwargs) -> KAT:
    return timm.create_model(NAME, **kwargs)


def tiny(**kwargs) -> KAT:
    """The cheapest KAT-T that still has every kind of module: 32 x 32 inputs (2 x 2 patches), 2 blocks."""
    return create(**dict(dict(img_size=32, depth=2), **kwargs))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: building a KAT runs many small linear-algebra calls (the mimetic init),
    which OpenMP's barriers make several times slower with 2 threads on a busy 2-core machine."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model64(one_thread) -> KAT:
    """KAT-T, all 12 blocks, at 64 x 64 (a 4 x 4 patch grid), eval mode. Tests must not modify it."""
    torch.manual_seed(0)
    return create(img_size=64).eval()


@pytest.fixture
def x64() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64)


def test_registered_names_and_default_cfgs():
    names = timm.list_models("kat*")
    assert len(names) >= 12 and NAME in names
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg is not None, name
        assert cfg.input_size == (3, 224, 224) and cfg.fixed_input_size
        assert cfg.first_conv == "patch_embed.proj" and cfg.classifier == "head" and cfg.num_classes == 1000
        assert cfg.pool_size is None  # ViT-like: no spatial pooling size
        assert len(cfg.mean) == len(cfg.std) == 3 and 0 < cfg.crop_pct <= 1
    # released weights only where there are checkpoints: the gelu variants have none
    assert not timm.list_pretrained("kat_*_gelu*")
    assert f"{NAME}.vitft" in timm.list_pretrained("kat*")


def test_default_cfg_names_real_modules(model64):
    cfg = model64.pretrained_cfg
    first_conv = model64.get_submodule(cfg["first_conv"])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == cfg["input_size"][0] == model64.in_chans
    assert cfg["input_size"] == (3, 224, 224)  # like timm's ViT, the cfg keeps the default size
    classifier = model64.get_submodule(cfg["classifier"])
    assert isinstance(classifier, nn.Linear) and classifier.out_features == cfg["num_classes"] == model64.num_classes
    state = model64.state_dict()
    assert f"{cfg['first_conv']}.weight" in state and f"{cfg['classifier']}.weight" in state
    assert model64.num_features == model64.head_hidden_size == EMBED_DIM


def test_forward(model64, x64):
    with torch.no_grad():
        out = model64(x64)
    assert out.shape == (2, 1000) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # the batch entries are independent
    with torch.no_grad():
        torch.testing.assert_close(model64(x64[1:]), out[1:], rtol=1e-4, atol=1e-5)


def test_backward_every_parameter_gets_a_gradient():
    model = create(img_size=64, num_classes=42).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 42)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    rational = [p for n, p in model.named_parameters() if n.endswith(RATIONAL_SUFFIXES)]
    assert len(rational) == 4 * DEPTH
    assert all(p.grad.abs().sum() > 0 for p in rational), "a rational coefficient got an all-zero gradient"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_create_on_meta_device():
    model = create(device="meta")
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.is_meta for t in tensors)
    out = model(torch.empty(2, 3, 224, 224, device="meta"))
    assert out.is_meta and out.shape == (2, 1000)
    with torch.device("meta"):
        ctx_model = create(num_classes=0)
    assert all(p.is_meta for p in ctx_model.parameters())
    # materialise and initialise: every tensor is set (no uninitialised memory left by a skipped meta init)
    real = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in real.parameters():
            p.fill_(float("nan"))
    real.init_weights()
    assert all(torch.isfinite(p).all() for p in real.parameters())
    assert torch.isfinite(real.eval()(torch.randn(1, 3, 224, 224))).all()


def test_create_with_device_and_bfloat16():
    model = tiny(device="cpu", dtype=torch.bfloat16).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 1000) and torch.isfinite(out).all()
    # and converting a float32 model after a forward gives bfloat16 outputs (no stale float32 state)
    model32 = tiny().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model32(x)
        assert model32.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs", [dict(not_a_model_arg=1), dict(img_sizee=64), dict(mlp_layer=nn.Identity)])
def test_unknown_or_unsupported_kwargs_raise_type_error(kwargs):
    with pytest.raises(TypeError):
        create(device="meta", **kwargs)


def test_bad_attn_init_raises_value_error():
    with pytest.raises(ValueError, match="attn_init"):
        create(device="meta", attn_init="orthogonal")


def test_reset_classifier(model64, x64):
    assert inspect.signature(model64.reset_classifier).parameters["global_pool"].default is None
    model = copy.deepcopy(model64)
    with torch.no_grad():
        features = model.forward_features(x64)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (2, model.head_hidden_size)

        model.reset_classifier(0)
        assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
        torch.testing.assert_close(model(x64), pre_logits)

        model.reset_classifier(7)  # global_pool=None keeps the pooling ('token')
        assert model.global_pool == "token" and model.num_classes == 7
        out = model(x64)
        assert out.shape == (2, 7)
        torch.testing.assert_close(model.forward_head(model.forward_features(x64), pre_logits=True), pre_logits)

        model.reset_classifier(0, "")  # no classifier, no pooling: the token sequence
        assert model(x64).shape == (2, 1 + 16, EMBED_DIM)
    created = create(img_size=64, depth=2, num_classes=0).eval()
    with torch.no_grad():
        assert created(x64).shape == pre_logits.shape


def test_reset_classifier_keeps_device_and_dtype():
    model = tiny(device="meta", dtype=torch.float64)
    model.reset_classifier(3)
    assert model.head.weight.is_meta and model.head.weight.dtype == torch.float64


@pytest.mark.parametrize("coarse", [False, True])
def test_group_matcher_covers_every_parameter(model64, coarse):
    names = [n for n, _ in model64.named_parameters()]
    groups = group_parameters(model64, model64.group_matcher(coarse=coarse))
    grouped = [n for members in groups.values() for n in members]
    assert sorted(grouped) == sorted(names), "group_matcher lost or duplicated parameters"
    assert len(groups) >= DEPTH + 1
    group_of = {n: g for g, members in groups.items() for n in members}
    # the stem comes first, blocks in order (each with its rational coefficients), the head last
    assert group_of["pos_embed"] < group_of["blocks.0.mlp.act1.weight_numerator"] == group_of["blocks.0.attn.qkv.weight"]
    assert group_of["blocks.0.mlp.fc1.weight"] < group_of["blocks.11.mlp.act2.weight_denominator"]
    assert group_of["blocks.11.mlp.fc2.weight"] < group_of["head.weight"]


def test_no_weight_decay(model64):
    names = [n for n, _ in model64.named_parameters()]
    patterns = model64.no_weight_decay()
    for pattern in patterns:
        if any(fnmatch.fnmatch(n, pattern) for n in names):
            continue
        # the rule timm's suite uses: an entry may name an optional parameter this config doesn't have
        assert getattr(model64, pattern.split(".")[0], None) is None, f"{pattern!r} matches no parameter"
    rational = [n for n in names if n.endswith(RATIONAL_SUFFIXES)]
    assert len(rational) == 4 * DEPTH
    exempt = {n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)}
    assert set(rational) <= exempt
    assert {"pos_embed", "cls_token"} <= exempt
    assert not any(n.endswith("fc1.weight") or n.endswith("qkv.weight") for n in exempt)

    # what the optimizer factory makes of it: rational coefficients (2-D) land in the no-decay group
    groups = param_groups_weight_decay(model64, weight_decay=0.05, no_weight_decay_list=patterns)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    by_name = dict(model64.named_parameters())
    assert all(id(by_name[n]) in no_decay for n in rational)
    assert id(by_name["blocks.0.mlp.fc1.weight"]) not in no_decay


def test_features_only():
    model = create(img_size=64, features_only=True).eval()
    assert model.feature_info.channels() == [EMBED_DIM] * 3  # default out_indices=3: the last 3 blocks
    assert model.feature_info.reduction() == [PATCH] * 3
    assert [i["module"] for i in model.feature_info.get_dicts()] == ["blocks.9", "blocks.10", "blocks.11"]
    with torch.no_grad():
        features = model(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, EMBED_DIM, 4, 4)] * 3

    picked = create(img_size=64, features_only=True, out_indices=(0, 5)).eval()
    assert [i["module"] for i in picked.feature_info.get_dicts()] == ["blocks.0", "blocks.5"]
    assert len(picked.model.blocks) == 6  # pruned after the last tap
    with torch.no_grad():
        outputs = picked(torch.randn(1, 3, 64, 64))
    assert len(outputs) == 2 and all(o.shape == (1, EMBED_DIM, 4, 4) for o in outputs)


def test_forward_intermediates(model64, x64):
    with torch.no_grad():
        final, intermediates = model64.forward_intermediates(x64)
        torch.testing.assert_close(final, model64.forward_features(x64))
        assert len(intermediates) == DEPTH
        assert all(t.shape == (2, EMBED_DIM, 4, 4) for t in intermediates)

        picked = model64.forward_intermediates(x64, indices=[0, 11], intermediates_only=True)
        torch.testing.assert_close(picked[0], intermediates[0])
        torch.testing.assert_close(picked[1], intermediates[11])

        tokens = model64.forward_intermediates(x64, indices=2, output_fmt="NLC", intermediates_only=True)
        assert len(tokens) == 2 and tokens[-1].shape == (2, 16, EMBED_DIM)
        torch.testing.assert_close(tokens[-1].transpose(1, 2).reshape(2, EMBED_DIM, 4, 4), intermediates[-1])

        # norm=True: the last intermediate is the normalised output without the class token
        normed = model64.forward_intermediates(x64, indices=[11], norm=True, output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(normed[0], final[:, 1:])

        early = model64.forward_intermediates(x64, indices=[3], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], intermediates[3])


def test_prune_intermediate_layers(model64, x64):
    with torch.no_grad():
        _, reference = model64.forward_intermediates(x64)
    pruned = copy.deepcopy(model64)
    take = pruned.prune_intermediate_layers([1, 4])
    assert list(take) == [1, 4] and len(pruned.blocks) == 5
    assert pruned.num_classes == 0
    with torch.no_grad():
        selected = pruned.forward_intermediates(x64, indices=take, intermediates_only=True)
        torch.testing.assert_close(selected[0], reference[1])
        torch.testing.assert_close(selected[1], reference[4])
        assert pruned(x64).shape == (2, 1 + 16, EMBED_DIM)  # head and pooling gone
    # every remaining parameter is used (DDP would complain otherwise)
    pruned.train()
    sum(t.sum() for t in pruned.forward_intermediates(x64, indices=take, intermediates_only=True)).backward()
    unused = [n for n, p in pruned.named_parameters() if p.grad is None and n != "norm.weight" and n != "norm.bias"]
    assert not unused, unused


@pytest.mark.parametrize("pool", ["token", "avg", ""])
def test_global_pool(pool):
    torch.manual_seed(0)
    model = create(img_size=64, depth=2, global_pool=pool, num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        out = model(x)
        assert features.shape == (2, 1 + 16, EMBED_DIM)
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), out)
        if pool == "token":
            torch.testing.assert_close(out, features[:, 0])
        elif pool == "avg":  # fc_norm after the pool instead of the final norm
            assert isinstance(model.norm, nn.Identity) and not isinstance(model.fc_norm, nn.Identity)
            torch.testing.assert_close(out, model.fc_norm(features[:, 1:].mean(1)))
        else:
            assert out.shape == features.shape
            torch.testing.assert_close(out, features)
    if pool:
        assert out.shape == (2, EMBED_DIM)


def test_other_img_size(model64):
    assert model64.patch_embed.grid_size == (4, 4)
    assert model64.pos_embed.shape == (1, 1 + 16, EMBED_DIM)
    with pytest.raises(AssertionError):  # fixed input size unless dynamic_img_size
        model64(torch.randn(1, 3, 96, 96))


def test_set_input_size_keeps_frozen_parameters_frozen():
    model = tiny().eval()
    model.requires_grad_(False)
    model.reset_classifier(0)
    model.set_input_size(img_size=(64, 64))
    assert model.patch_embed.grid_size == (4, 4) and model.pos_embed.shape == (1, 1 + 16, EMBED_DIM)
    assert not [n for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, EMBED_DIM)


def test_dynamic_img_size_non_square():
    model = tiny(img_size=64, dynamic_img_size=True).eval()
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 1 + 3 * 5, EMBED_DIM)
        assert model(x).shape == (2, 1000)
        _, intermediates = model.forward_intermediates(x)
    assert [t.shape for t in intermediates] == [(2, EMBED_DIM, 3, 5)] * 2


def test_in_chans_1():
    model = tiny(in_chans=1).eval()
    assert model.patch_embed.proj.weight.shape == (EMBED_DIM, 1, PATCH, PATCH)
    assert model.in_chans == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 1000)


def test_grad_checkpointing_same_output_and_gradients():
    torch.manual_seed(0)
    model = tiny(img_size=64, num_classes=10).train()
    x = torch.randn(2, 3, 64, 64)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        final, _ = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
    assert model.grad_checkpointing
    (out0, grads0), (out1, grads1) = results
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-6)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_torchscript_matches_eager():
    with timm.set_scriptable(True):
        model = tiny().eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        actual = scripted(x)
    assert actual.shape == (2, 1000)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    # the scripted model runs the pure-PyTorch rational: its gradients flow into the coefficients too
    scripted.train()
    scripted(x).sum().backward()
    assert all(p.grad is not None for n, p in scripted.named_parameters() if n.endswith(RATIONAL_SUFFIXES))


def test_fx_feature_extraction():
    model = tiny().eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    for nodes in (train_nodes, eval_nodes):
        # GroupRational is a leaf of the trace (registered with timm's notrace modules), not traced into
        assert "blocks.0.mlp.act2" in nodes and "blocks.1.mlp.act1" in nodes and "head" in nodes
        assert not [n for n in nodes if n.startswith("blocks.0.mlp.act2.")]
    extractor = create_feature_extractor(model, return_nodes={"blocks.0": "b0", "norm": "norm", "head": "logits"})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = extractor(x)
        intermediates = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(out["b0"][:, 1:], intermediates[0])
        torch.testing.assert_close(out["norm"], model.forward_features(x))
        torch.testing.assert_close(out["logits"], model(x))
    assert any(isinstance(m, GroupRational) for m in extractor.modules())

    graph_net = create(img_size=32, depth=3, features_only=True, feature_cls="fx", out_indices=(1, 2)).eval()
    with torch.no_grad():
        assert [tuple(f.shape[:2]) for f in graph_net(x)] == [(2, 1 + 4)] * 2


def test_plain_fx_symbolic_trace():
    """torch.fx.symbolic_trace (not only timm's tracer) traces a KAT as it traces a ViT: the rational op is one
    recorded call (``torch.fx.wrap``), and the GraphModule computes the model's outputs and gradients."""
    from kat_timm.ops import group_rational

    torch.manual_seed(0)
    model = tiny(num_classes=10)
    graph_module = torch.fx.symbolic_trace(model)
    calls = [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target is group_rational]
    assert len(calls) == 2 * 2, "act1 and act2 of both blocks, each one call"
    x = torch.randn(2, 3, 32, 32)
    for mode in (False, True):  # eval, then train (dropout is 0: the same function)
        model.train(mode), graph_module.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(graph_module(x), model(x), rtol=0, atol=0)
    model(x).square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    graph_module(x).square().mean().backward()
    for name, parameter in model.named_parameters():
        assert graph_module.get_parameter(name) is parameter, "symbolic_trace shares the model's parameters"
        assert parameter.grad is not None, f"no gradient of {name} through the trace"
        torch.testing.assert_close(parameter.grad, expected[name], msg=f"gradient of {name} through the trace")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_backward(backend):
    """fullgraph=True: no graph break anywhere (the rational op is a custom op with fake and autograd
    registrations). aot_eager checks the capture (dynamo + AOT autograd) alone; inductor also generates code
    (about 15 s on 2 cores with a cold compile cache, a few seconds warm)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny(num_classes=10).train()
    x = torch.randn(2, 3, 32, 32)
    model(x).square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        expected_out = model(x)
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    out.square().mean().backward()
    torch.testing.assert_close(out.detach(), expected_out, rtol=1e-4, atol=1e-5)
    params = dict(model.named_parameters())
    for name, grad in expected.items():
        assert params[name].grad is not None, name
        torch.testing.assert_close(params[name].grad, grad, rtol=1e-4, atol=1e-5, msg=name)
    torch._dynamo.reset()


def test_fix_init_rescales_after_mimetic_init():
    """timm's fix_init divides attn.proj and mlp.fc2 by sqrt(2 (layer + 1)): it must survive the mimetic init."""
    torch.manual_seed(0)
    plain = tiny()
    torch.manual_seed(0)
    fixed = tiny(fix_init=True)
    for layer, (a, b) in enumerate(zip(plain.blocks, fixed.blocks)):
        scale = (2.0 * (layer + 1)) ** 0.5
        torch.testing.assert_close(b.attn.proj.weight, a.attn.proj.weight / scale)
        torch.testing.assert_close(b.mlp.fc2.weight, a.mlp.fc2.weight / scale)
        torch.testing.assert_close(b.attn.qkv.weight, a.attn.qkv.weight)


def test_reset_mode_init_keeps_variance_preserving_kan_init():
    """weight_init='skip' then init_weights() (timm's 'reset' mode, e.g. after to_empty) still inits the KANs."""
    model = tiny(weight_init="skip").to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    fc1 = model.blocks[0].mlp.fc1
    # fc1 ~ N(0, 1 / fan_in) (act1 is the identity), not nn.Linear's default U(+-1/sqrt(fan_in)) (std 0.58/sqrt)
    assert abs(fc1.weight.std().item() * fc1.in_features**0.5 - 1.0) < 0.05
    assert torch.count_nonzero(fc1.bias) == 0
