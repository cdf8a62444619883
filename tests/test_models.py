"""The model registry: every built-in trains a step at 48x48, timm models load local weights."""

import pytest
import torch
from torch import nn

from fer_tune.errors import UserError
from fer_tune.models import create_model, describe_models, list_models, model_info

BUILTINS = list_models()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batches of 4 run faster on one thread, and the 2-core machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n=4, chans=1, size=48):
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(0))


def assert_finite_grads(model):
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_builtins_are_registered():
    assert BUILTINS == ["mlp", "mlp_bn", "simple_cnn", "improved_cnn", "gap_cnn", "mini_resnet",
                        "cnn4_l2", "cnn10", "vgg_fer", "vgg_fer_s"]


@pytest.mark.parametrize("name", BUILTINS)
def test_forward_backward(name):
    model = create_model(name).train()
    logits = model(images())
    assert logits.shape == (4, 7)
    nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    assert_finite_grads(model)


@pytest.mark.parametrize("name", BUILTINS)
def test_three_channels_and_other_sizes(name):
    with torch.no_grad():
        assert create_model(name, in_chans=3).eval()(images(2, 3)).shape == (2, 7)
        for size in (32, 64):
            model = create_model(name, img_size=size, num_classes=5).eval()
            assert model(images(2, 1, size)).shape == (2, 5)


@pytest.mark.parametrize("name", BUILTINS)
def test_channels_last_bf16_autocast(name):
    model = create_model(name).to(memory_format=torch.channels_last).train()
    x = images().to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (4, 7) and torch.isfinite(logits.float()).all()
    nn.functional.cross_entropy(logits.float(), torch.arange(4)).backward()
    assert_finite_grads(model)


@pytest.mark.parametrize("name", BUILTINS)
def test_dropout_is_a_real_knob(name):
    plain = create_model(name)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    model = create_model(name, dropout=0.5)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules())
    x = images(2)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))
        plain.train()
        assert torch.equal(plain(x), plain(x))


def test_extra_kwargs_change_the_model():
    def params(name, **kw):
        return sum(p.numel() for p in create_model(name, **kw).parameters())

    assert params("vgg_fer", width=0.5, fc=256) < params("vgg_fer") / 3
    assert params("mlp", hidden=[64]) == 48 * 48 * 64 + 64 + 64 * 7 + 7
    model = create_model("improved_cnn", block_dropout=0.2)
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.2 for m in model.modules()) == 3


def test_bad_extra_values_are_user_errors():
    with pytest.raises(UserError, match="dropout"):
        create_model("cnn10", block_dropout=1.5)
    with pytest.raises(UserError, match="fc must be"):
        create_model("vgg_fer", fc=0)


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(UserError, match="unknown model 'resnet'.*mini_resnet.*vgg_fer.*timm/<name>"):
        create_model("resnet")


def test_unknown_kwarg_lists_the_accepted_ones():
    with pytest.raises(UserError, match="unknown argument.*depth.*accepts width, fc"):
        create_model("vgg_fer", depth=3)
    with pytest.raises(UserError, match="accepts hidden"):
        create_model("mlp", width=2)


@pytest.mark.parametrize("kw", [dict(dropout=1.0), dict(dropout=-0.1), dict(in_chans=0), dict(num_classes=0),
                                dict(img_size=4), dict(width=0), dict(blocks=(1, 1)), dict(blocks=2.5),
                                dict(pretrained=True)])
def test_bad_values_are_user_errors(kw):
    with pytest.raises(UserError):
        create_model("mini_resnet", **kw)


def test_model_info_counts_params_and_flops():
    model = create_model("cnn10")
    info = model_info("cnn10")
    assert info["name"] == "cnn10" and info["description"]
    assert info["params"] == sum(p.numel() for p in model.parameters())
    # mlp: 2 FLOPs per multiply-add of its four matmuls
    macs = 48 * 48 * 1024 + 1024 * 512 + 512 * 256 + 256 * 7
    assert model_info("mlp")["mflops"] == round(2 * macs / 1e6, 1)


def test_describe_models_table():
    table = describe_models()
    assert all(name in table for name in BUILTINS)
    assert "MFLOPs" in table and "timm/<name>" in table


def test_builtin_pretrained_file(tmp_path):
    source = create_model("mini_resnet", width=0.25)
    path = tmp_path / "mini.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    same = create_model("mini_resnet", width=0.25, pretrained=str(path))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), source.state_dict().values()))
    other_head = create_model("mini_resnet", width=0.25, num_classes=3, pretrained=path)
    assert torch.equal(other_head.features[1][0].conv1.weight, source.features[1][0].conv1.weight)
    assert other_head.head[-1].out_features == 3
    with pytest.raises(UserError, match="do not fit"):
        create_model("mini_resnet", pretrained=str(path))  # width 1.0: other shapes
    with pytest.raises(UserError, match="not found"):
        create_model("mini_resnet", pretrained=str(tmp_path / "missing.pth"))


# ---- timm/<name> ----------------------------------------------------------------------------


def test_timm_resnet18_one_channel():
    model = create_model("timm/resnet18", dropout=0.2)
    assert model.conv1.in_channels == 1 and model.drop_rate == 0.2
    assert model.eval()(images(2)).shape == (2, 7)


def test_timm_fixed_size_model_gets_img_size():
    model = create_model("timm/vit_tiny_patch16_224", img_size=48).eval()
    with torch.no_grad():
        assert model(images(1)).shape == (1, 7)


def test_timm_pretrained_local_file(tmp_path):
    import timm

    saved = timm.create_model("resnet18", num_classes=1000, in_chans=3).state_dict()
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(saved, path)
    model = create_model("timm/resnet18", pretrained=str(path))
    state = model.state_dict()
    assert torch.equal(state["layer3.1.conv2.weight"], saved["layer3.1.conv2.weight"])
    # timm's adapt_input_conv: for 1 channel, the sum of the RGB kernels
    assert state["conv1.weight"].shape == (64, 1, 7, 7)
    assert torch.equal(state["conv1.weight"], saved["conv1.weight"].sum(dim=1, keepdim=True))
    assert state["fc.weight"].shape == (7, 512)  # the 1000-class head was dropped


def test_timm_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        create_model("timm/resnet18", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match=r'timm\.list_models\("\*resnet\*"\)'):
        create_model("timm/resnet1")
    with pytest.raises(UserError, match="unexpected keyword argument 'depth'.*ResNet accepts"):
        create_model("timm/resnet18", depth=3)
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load pretrained weights"):
        create_model("timm/resnet18", pretrained=str(bad))
