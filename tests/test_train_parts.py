"""Config, augmentation, class weights and metrics: the loop's parts, tested on their own."""

import numpy as np
import pytest
import torch

from fer_tune.errors import UserError
from fer_tune.train import TrainConfig, classification_scores, confusion_matrix
from fer_tune.train.augment import affine_matrices, augment, mix_batch
from fer_tune.train.losses import class_weights
from fer_tune.train.loop import pixel_stats


def batch(n=16, c=1, h=48, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, c, h, w), generator=g)


# -- optimizers ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "adagrad", "rmsprop"])
def test_optimizers_use_the_fused_kernel_where_torch_has_one_with_the_same_steps(name, monkeypatch):
    from fer_tune.models import create_model
    from fer_tune.train import optim

    cfg = TrainConfig(optimizer=name, lr=1e-2, weight_decay=0.01, momentum=0.9)
    models = [create_model("simple_cnn", width=0.25) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fast = optim.make_optimizer(models[0], cfg)
    monkeypatch.setattr(optim, "FUSED", ())
    plain = optim.make_optimizer(models[1], cfg)
    assert bool(fast.defaults.get("fused")) == (name != "rmsprop") and not plain.defaults.get("fused")
    # One step from the same weights and gradients: the same update rule. (Over several steps Adam
    # amplifies rounding differences of near-zero gradients into +-lr, whichever kernel runs.)
    x, y = batch(8), torch.randint(0, 7, (8,), generator=torch.Generator().manual_seed(0))
    for model, opt in zip(models, (fast, plain)):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- config ----------------------------------------------------------------------------------

def test_config_rejects_unknown_key_listing_valid_ones():
    with pytest.raises(UserError, match=r"unknown key\(s\) lerning_rate; valid keys: model, .*lr"):
        TrainConfig.from_dict({"lerning_rate": 0.1})


@pytest.mark.parametrize("key,value,message", [
    ("optimizer", "adamax", "optimizer 'adamax' is not one of adam, adamw, sgd"),
    ("class_weights", "balanced", "class_weights 'balanced' is not one of none, inverse"),
    ("aug_strength", 1.5, r"aug_strength must be in \[0.0, 1.0\]"),
    ("epochs", 2.5, "epochs must be a whole number"),
    ("lr", "fast", "lr must be a float"),
])
def test_config_rejects_bad_values(key, value, message):
    with pytest.raises(UserError, match=message):
        TrainConfig.from_dict({key: value})


def test_config_yaml_round_trip(tmp_path):
    cfg = TrainConfig(model="gap_cnn", lr=3e-4, class_weights="effective", model_kwargs={})
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert TrainConfig.from_yaml(path) == cfg
    assert TrainConfig.from_yaml(path, {"lr": 1e-2}).lr == 1e-2


def test_config_takes_flat_model_kwargs_keys_as_a_search_trial_spells_them(tmp_path):
    """`--set model_kwargs.width=0.375` (a trial's column) updates model_kwargs, keeping the rest."""
    path = tmp_path / "c.yaml"
    path.write_text(TrainConfig(model="vgg_fer_s", model_kwargs={"width": 0.25, "fc": 512}).to_yaml())
    cfg = TrainConfig.from_yaml(path, {"model_kwargs.width": 0.375})
    assert cfg.model_kwargs == {"width": 0.375, "fc": 512}
    assert TrainConfig.from_dict({"model_kwargs.fc": 256}).model_kwargs == {"fc": 256}
    with pytest.raises(UserError, match="model_kwargs must be a mapping"):
        TrainConfig.from_dict({"model_kwargs": 3, "model_kwargs.fc": 256})


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="nope.yaml: config file not found"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="bad.yaml: expected a mapping"):
        TrainConfig.from_yaml(bad)


# -- augmentation ----------------------------------------------------------------------------

def test_strength_zero_is_identity():
    x = batch()
    assert torch.equal(augment(x, 0.0, torch.Generator().manual_seed(1)), x)


def test_augment_keeps_shape_dtype_range_and_is_seeded():
    x = batch()
    a = augment(x, 1.0, torch.Generator().manual_seed(3))
    b = augment(x, 1.0, torch.Generator().manual_seed(3))
    c = augment(x, 1.0, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, x)


def test_augment_works_on_rgb_and_other_sizes():
    x = batch(n=4, c=3, h=64, w=64)
    assert augment(x, 0.5, torch.Generator().manual_seed(0)).shape == (4, 3, 64, 64)


def test_affine_strength_scales_the_warp():
    g = torch.Generator().manual_seed(0)
    theta = affine_matrices(256, 0.0, g, "cpu")
    # Strength 0 leaves only the flip: identity or mirror, both present.
    assert torch.allclose(theta[:, :, 2], torch.zeros(256, 2))
    assert torch.allclose(theta[:, 1, :2], torch.tensor([0.0, 1.0]).expand(256, 2))
    assert set(theta[:, 0, 0].tolist()) == {-1.0, 1.0}
    strong = affine_matrices(256, 1.0, torch.Generator().manual_seed(0), "cpu")
    weak = affine_matrices(256, 0.25, torch.Generator().manual_seed(0), "cpu")
    assert strong[:, :, 2].abs().mean() > 3 * weak[:, :, 2].abs().mean()


def test_flip_only_mirrors_the_image():
    """At tiny strength the warp is (almost) a pure flip or identity: pixels map exactly."""
    x = batch(n=64)
    out = augment(x, 1e-6, torch.Generator().manual_seed(0))
    for i in range(len(x)):
        assert torch.allclose(out[i], x[i], atol=1e-3) or torch.allclose(out[i], x[i].flip(-1), atol=1e-3)


def test_mixup_and_cutmix_make_convex_targets():
    x = batch(n=32)
    y = torch.nn.functional.one_hot(torch.arange(32) % 7, 7).float()
    for kw in ({"mixup": 0.4, "cutmix": 0.0}, {"mixup": 0.0, "cutmix": 1.0}):
        mx, my = mix_batch(x, y, generator=torch.Generator().manual_seed(0), **kw)
        assert mx.shape == x.shape
        assert torch.allclose(my.sum(1), torch.ones(32))
        assert not torch.equal(mx, x)
    same_x, same_y = mix_batch(x, y, 0.0, 0.0, torch.Generator())
    assert same_x is x and same_y is y


# -- class weights ---------------------------------------------------------------------------

def test_inverse_weights_balance_the_classes():
    counts = np.array([4000, 400, 4000, 8000, 5000, 4000, 3000])
    w = class_weights(counts, "inverse")
    contrib = w * counts
    assert np.allclose(contrib, contrib[0])  # every class contributes equally
    assert np.isclose((w * counts).sum(), counts.sum())  # mean weight over samples is 1


def test_sqrt_and_effective_weights_lie_between_none_and_inverse():
    counts = np.array([4000, 400, 4000, 8000, 5000, 4000, 3000])
    inv = class_weights(counts, "inverse")
    sqrt = class_weights(counts, "sqrt_inverse")
    eff = class_weights(counts, "effective", beta=0.999)
    assert np.allclose(sqrt / sqrt[3], np.sqrt(counts[3] / counts))
    # Rarest class gets the largest weight, but less extreme than inverse.
    for w in (sqrt, eff):
        assert w.argmax() == 1 and w[1] / w[3] < inv[1] / inv[3]
    # beta -> 0 makes every effective number 1: no re-weighting.
    assert np.allclose(class_weights(counts, "effective", beta=1e-9), 1.0)
    assert class_weights(counts, "none") is None


def test_effective_number_formula():
    counts = np.array([10, 100])
    beta = 0.9
    raw = (1 - beta) / (1 - beta ** counts)
    w = class_weights(counts, "effective", beta)
    assert np.isclose(w[0] / w[1], raw[0] / raw[1])


def test_missing_class_gets_zero_weight():
    w = class_weights(np.array([10, 0, 30]), "inverse")
    assert w[1] == 0 and np.isclose((w * [10, 0, 30]).sum(), 40)


# -- metrics ---------------------------------------------------------------------------------

def test_scores_match_hand_computation():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    s = classification_scores(y_true, y_pred, ["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["per_class"]["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8), "support": 3}
    assert s["per_class"]["b"]["precision"] == pytest.approx(0.5)
    f1s = [0.8, 0.5, 2 * 0.5 * 1 / 1.5]
    assert s["macro_f1"] == pytest.approx(np.mean(f1s))


def test_macro_f1_ignores_classes_absent_from_truth():
    s = classification_scores([0, 0, 1], [0, 0, 1], ["a", "b", "c"])
    assert s["macro_f1"] == 1.0 and s["per_class"]["c"]["support"] == 0


def test_pixel_stats_from_histogram():
    x = np.random.default_rng(0).integers(0, 256, size=(50, 1, 8, 8), dtype=np.uint8)
    mean, std = pixel_stats(x)
    assert mean == pytest.approx(x.mean() / 255, rel=1e-9)
    assert std == pytest.approx(x.std() / 255, rel=1e-9)
