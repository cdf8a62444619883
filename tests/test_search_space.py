"""Search spaces: parsing, define-by-run sampling, conditions, and every validation error."""

import optuna
import pytest

from fer_tune.errors import UserError
from fer_tune.search.space import list_spaces, load_space, parse_space, space_from_record
from fer_tune.train import TrainConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE = {"max_epochs": 4, "grace_period": 1, "reduction_factor": 2}


def sample(space, n=40, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        values = space.suggest(trial)
        study.tell(trial, 0.0)
        out.append(values)
    return out


def test_shipped_spaces_load_and_sample_valid_configs():
    assert {"cnn", "cpu", "timm", "smoke"} <= set(list_spaces())
    for name in ("smoke", "cnn", "cpu"):
        space = load_space(name)
        for values in sample(space, 15):
            cfg = space.trial_config(values, seed=3)
            assert cfg.epochs == space.max_epochs and cfg.seed == 3
            assert cfg.select_metric == space.metric
    cnn = load_space("cnn")
    assert set(cnn.params["class_weights"].args) == {"none", "inverse", "sqrt_inverse", "effective"}
    assert {"model", "optimizer", "dropout", "weight_decay", "aug_strength", "class_weights", "lr", "batch_size",
            "schedule", "label_smoothing"} <= set(cnn.searched())
    assert (cnn.metric, cnn.mode) == ("val_acc", "max")
    for name, sgd_lr in (("cpu", 5e-3), ("cnn", 3e-3)):  # SGD gets its own (larger) step sizes and smaller L2
        sgd = [v for v in sample(load_space(name), 40) if v["optimizer"] == "sgd"]
        assert sgd and all(v["lr"] >= sgd_lr and v["weight_decay"] <= 2e-3 for v in sgd)


def test_cpu_space_keeps_every_sampled_model_cpu_sized():
    """search_spaces/cpu.yaml promises architectures of <= 250 MFLOPs per 48x48 image."""
    from fer_tune.models import create_model
    from fer_tune.models.registry import forward_flops

    space = load_space("cpu")
    assert {"model", "optimizer", "dropout", "weight_decay", "aug_strength", "class_weights"} <= set(space.searched())
    seen = set()
    for values in sample(space, 25):
        cfg = space.trial_config(values, seed=0)
        key = (cfg.model, tuple(sorted(cfg.model_kwargs.items())))
        if key in seen:
            continue
        seen.add(key)
        model = create_model(cfg.model, dropout=cfg.dropout, **cfg.model_kwargs)
        assert forward_flops(model, 1, 48) <= 250e6, key
    assert {m for m, _ in seen} == {"vgg_fer_s", "cnn4_l2", "simple_cnn"}
    assert {dict(kw).get("width") for m, kw in seen if m == "vgg_fer_s"} == {0.25, 0.5}


def test_every_distribution_kind_samples_inside_its_bounds():
    space = parse_space({**BASE,
                         "optimizer": {"choice": ["adamw", "sgd"]},
                         "dropout": {"uniform": [0.1, 0.4]},
                         "lr": {"loguniform": [1e-4, 1e-2]},
                         "batch_size": {"int": [16, 256], "log": True},
                         "early_stop_patience": {"int": [0, 3]},
                         "label_smoothing": {"quniform": [0.0, 0.2, 0.05]},
                         "model": "mlp",
                         "model_kwargs.hidden": {"choice": [[64], [128, 32]]},
                         "mixup": 0.2})
    values = sample(space, 60)
    assert {v["optimizer"] for v in values} == {"adamw", "sgd"}
    assert all(0.1 <= v["dropout"] <= 0.4 for v in values)
    assert all(1e-4 <= v["lr"] <= 1e-2 for v in values)
    assert all(isinstance(v["batch_size"], int) and 16 <= v["batch_size"] <= 256 for v in values)
    assert {v["early_stop_patience"] for v in values} == {0, 1, 2, 3}
    assert {round(v["label_smoothing"], 6) for v in values} <= {0.0, 0.05, 0.1, 0.15, 0.2}
    assert {tuple(v["model_kwargs.hidden"]) for v in values} == {(64,), (128, 32)}  # list values survive
    assert all(v["mixup"] == 0.2 and v["model"] == "mlp" for v in values)
    cfg = space.trial_config(values[0])
    assert cfg.model_kwargs == {"hidden": values[0]["model_kwargs.hidden"]} and cfg.mixup == 0.2
    assert space.searched() == ["optimizer", "dropout", "lr", "batch_size", "early_stop_patience",
                                "label_smoothing", "model_kwargs.hidden"]


def test_conditions_activate_parameters_only_when_they_hold():
    space = parse_space({**BASE,
                         "model": {"choice": ["simple_cnn", "vgg_fer"]},
                         "model_kwargs.width": {"choice": [0.5, 1.0], "when": {"model": "vgg_fer"}},
                         "optimizer": {"choice": ["adamw", "sgd", "rmsprop"]},
                         "momentum": {"uniform": [0.8, 0.99], "when": {"optimizer": ["sgd", "rmsprop"]}},
                         "nesterov": {"value": False, "when": {"optimizer": "sgd"}}})
    values = sample(space, 60)
    for v in values:
        assert ("momentum" in v) == (v["optimizer"] in ("sgd", "rmsprop"))
        assert ("nesterov" in v) == (v["optimizer"] == "sgd")
        assert ("model_kwargs.width" in v) == (v["model"] == "vgg_fer")
        cfg = space.trial_config(v)
        assert cfg.model_kwargs == ({"width": v["model_kwargs.width"]} if v["model"] == "vgg_fer" else {})
    assert any("momentum" in v for v in values) and any("momentum" not in v for v in values)


def test_alternatives_give_a_key_one_distribution_per_condition():
    """SGD wants 10-30x AdamW's learning rate and coupled L2 far below AdamW's decoupled decay:
    one range per optimizer, each its own Optuna parameter, one `lr` column for the trial."""
    raw = {**BASE, "optimizer": {"choice": ["adamw", "sgd", "rmsprop"]},
           "lr": [{"loguniform": [1e-4, 1e-3], "when": {"optimizer": "adamw"}},
                  {"loguniform": [1e-2, 1e-1], "when": {"optimizer": "sgd"}}],
           "nesterov": [{"value": True, "when": {"optimizer": "sgd"}}]}
    space = parse_space(raw)
    assert space.searched() == ["optimizer", "lr"] and space.params["lr"].when == {"optimizer": ["adamw", "sgd"]}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask()
        v = space.suggest(trial)
        study.tell(trial, 0.0)
        low, high = {"adamw": (1e-4, 1e-3), "sgd": (1e-2, 1e-1)}.get(v["optimizer"], (None, None))
        if low is None:
            assert "lr" not in v and space.trial_config(v).lr == TrainConfig.lr  # no branch: the default
        else:
            assert low <= v["lr"] <= high and space.trial_config(v).lr == v["lr"]
        assert ("nesterov" in v) == (v["optimizer"] == "sgd")
    names = {name for t in study.trials for name in t.params}
    assert names == {"optimizer", "lr[optimizer=adamw]", "lr[optimizer=sgd]"}
    back = space_from_record(space.to_dict())
    assert back.to_dict() == space.to_dict() and back.params["lr"].branches[1].label == "lr[optimizer=sgd]"


def test_the_searcher_hands_trials_config_keys_not_optunas_names(tmp_path):
    """Ray's OptunaSearch merges Optuna's parameter names into the trial config; an alternative's
    name (`lr[optimizer=sgd]`) is no config key, so the searcher passes on what the space returns."""
    from fer_tune.search.tuner import JournalOptunaSearch

    space = parse_space({**BASE, "optimizer": {"choice": ["adamw", "sgd"]},
                         "lr": [{"loguniform": [1e-4, 1e-3], "when": {"optimizer": "adamw"}},
                                {"loguniform": [1e-2, 1e-1], "when": {"optimizer": "sgd"}}]})
    searcher = JournalOptunaSearch(space=space.suggest, metric="val_acc", mode="max", seed=0,
                                   journal=str(tmp_path / "optuna.journal"))
    configs = [searcher.suggest(f"t{i}") for i in range(12)]
    assert {c["optimizer"] for c in configs} == {"adamw", "sgd"}
    for config in configs:
        assert set(config) == {"model", "optimizer", "lr"}
        space.trial_config(config)


@pytest.mark.parametrize("lr, message", [
    ([{"loguniform": [1e-4, 1e-3], "when": {"optimizer": ["adamw", "sgd"]}},
      {"loguniform": [1e-2, 1e-1], "when": {"optimizer": "sgd"}}], r"lr: alternatives .* can both apply to one trial"),
    ([{"loguniform": [1e-4, 1e-3]}, {"loguniform": [1e-2, 1e-1], "when": {"optimizer": "sgd"}}],
     r"lr: each alternative needs a when:"),
    ([{"loguniform": [1e-4, 1e-3], "when": {"optimizer": "adam"}}], r"optimizer can never be 'adam'"),
    ([{"uniform": [0.0, 2.0], "when": {"optimizer": "sgd"}}, {"uniform": [-1.0, 0.5], "when": {"optimizer": "adamw"}}],
     r"lr must be > 0"),
])
def test_alternatives_that_overlap_or_break_a_rule_name_the_problem(lr, message):
    with pytest.raises(UserError, match=message):
        parse_space({**BASE, "optimizer": {"choice": ["adamw", "sgd"]}, "lr": lr}, name="bad")


def test_budget_metric_and_mode():
    space = parse_space({"metric": "val_loss", "max_epochs": 9, "grace_period": 3, "reduction_factor": 3})
    assert space.mode == "min" and space.params["model"].args == TrainConfig.model
    assert space.with_budget(metric="val_macro_f1").mode == "max"
    assert space.with_budget(max_epochs=12).max_epochs == 12
    with pytest.raises(UserError, match="grace_period .* exceeds max_epochs"):
        space.with_budget(max_epochs=2)


@pytest.mark.parametrize("raw, message", [
    ({"model": {"choice": ["simple_cnn", "resnet_imaginary"]}}, r"unknown model 'resnet_imaginary'.*choose from mlp, mlp_bn, simple_cnn"),
    ({"model": {"choice": ["simple_cnn", "mlpp"]}, "model_kwargs.hidden": {"value": [64], "when": {"model": "mlp"}}},
     r"model: unknown model 'mlpp' \(did you mean 'mlp'\?\)"),  # not "when: model can never be 'mlp'"
    ({"model": "simple_cnnn"}, r"did you mean 'simple_cnn'"),
    ({"weight_decay": "1e-4"}, r"weight_decay: '1e-4' is text, not a number \(write floats with a dot: 1.0e-4"),
    ({"dropout": {"choice": [0.1, "2e-1"]}}, r"dropout: '2e-1' is text, not a number"),
    ({"batch_size": {"uniform": [32, 128]}}, r"batch_size takes whole numbers, which uniform: \[32, 128\] does not draw"),
    ({"early_stop_patience": {"quniform": [2, 10, 0.5]}}, r"early_stop_patience takes whole numbers"),
    ({"dropout": {"quniform": [0.0, 0.5, 0.3]}}, r"dropout: quniform's range 0.5 is not a whole number of steps of 0.3"),
    ({"optimizer": {"choice": ["adamw", "lion"]}}, r"unknown optimizer 'lion'; valid: adam, adamw, sgd, rmsprop, adagrad"),
    ({"class_weights": {"choice": ["none", "balanced"]}}, r"unknown class weights 'balanced'; valid: none, inverse, sqrt_inverse, effective"),
    ({"schedule": "step"}, r"unknown schedule 'step'; valid: cosine, onecycle, plateau, constant"),
    ({"learning_rate": {"loguniform": [1e-4, 1e-2]}}, r"unknown key 'learning_rate'.*valid keys: model, model_kwargs"),
    ({"epochs": 10}, r"'epochs' cannot be searched.*max_epochs"),
    ({"lr": {"loguniform": [0, 1e-2]}}, r"loguniform needs low > 0"),
    ({"lr": {"uniform": [1e-2, 1e-4]}}, r"needs low < high"),
    ({"lr": {"normal": [0, 1]}}, r"give exactly one of choice, uniform, loguniform, int, quniform, value"),
    ({"batch_size": {"int": [16.5, 64]}}, r"int needs whole-number bounds"),
    ({"label_smoothing": {"quniform": [0, 0.2]}}, r"quniform needs \[low, high, q\]"),
    ({"dropout": {"uniform": [0.0, 0.99]}}, r"dropout must be in \[0.0, 0.95\]"),
    ({"optimizer": {"choice": []}}, r"choice needs a non-empty list"),
    ({"momentum": {"uniform": [0.8, 0.9], "when": {"optimizer": "sgd"}}}, r"refers to 'optimizer', which is not a key above it"),
    ({"optimizer": {"choice": ["adamw", "sgd"]}, "momentum": {"uniform": [0.8, 0.9], "when": {"optimizer": "rmsprop"}}},
     r"optimizer can never be 'rmsprop'; optimizer takes adamw, sgd"),
    ({"model": {"choice": ["mlp", "vgg_fer"]}, "model_kwargs.width": {"choice": [0.5, 1.0]}},
     r"model 'mlp' has no argument 'width'; it accepts hidden"),
    ({"metric": "val_accuracy"}, r"metric 'val_accuracy' is not one of train_loss, train_acc, val_loss, val_acc, val_macro_f1"),
    ({"mode": "maximise"}, r"mode 'maximise' must be min or max"),
    ({"select_metric": {"choice": ["val_acc", "val_mean_acc"]}},
     r"select_metric val_mean_acc is for fine-tuning.*use val_acc, val_macro_f1, val_loss"),
    ({"reduction_factor": 1}, r"reduction_factor must be >= 2"),
    ({"max_epochs": 0}, r"max_epochs must be a whole number >= 1"),
    ({"promotion_window": -1}, r"promotion_window must be a whole number >= 0"),
    ({"promotion_window": 1}, r"promotion_window \(1\) must be 0 \(all results\) or at least reduction_factor \(2\)"),
])
def test_invalid_spaces_name_the_problem_and_what_is_valid(raw, message):
    with pytest.raises(UserError, match=message):
        parse_space({**BASE, **raw}, name="bad")


def test_unknown_space_name_lists_the_available_ones(tmp_path):
    with pytest.raises(UserError, match=r"unknown search space \(did you mean 'smoke'\?\); available: cnn, cpu, smoke, timm"):
        load_space("smok")
    with pytest.raises(UserError, match="file not found"):
        load_space(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_epochs: 2\nlr: [1, 2\n")
    with pytest.raises(UserError, match=r"bad.yaml: not valid YAML \(line 3, column 1: expected ',' or ']'"):
        load_space(str(bad))
    control = tmp_path / "control.yaml"  # the reader's errors carry no problem mark
    control.write_text("max_epochs: 2\x07\n")
    with pytest.raises(UserError, match=r"control.yaml: not valid YAML \(unacceptable character #x0007"):
        load_space(str(control))
    twice = tmp_path / "twice.yaml"  # YAML itself would keep the second and drop the search range
    twice.write_text("max_epochs: 2\ndropout: {uniform: [0.1, 0.3]}\nlr: 0.01\ndropout: 0.1\n")
    with pytest.raises(UserError, match=r"twice.yaml: key 'dropout' is given twice \(lines 2 and 4\); keep one"):
        load_space(str(twice))
    good = tmp_path / "mine.yaml"
    good.write_text("max_epochs: 2\ngrace_period: 1\nmodel: simple_cnn\nlr: {loguniform: [1.0e-3, 1.0e-2]}\n")
    assert load_space(str(good)).name == "mine"


def test_timm_space_validates_names_with_timm():
    space = load_space("timm")
    assert all(m.startswith("timm/") for m in space.params["model"].args)
    with pytest.raises(UserError, match=r"unknown timm model 'timm/resnet_18' \(did you mean 'timm/resnet18'\?\)"):
        parse_space({**BASE, "model": {"choice": ["timm/resnet18", "timm/resnet_18"]}})


def test_startup_points_try_every_architecture_first():
    """Seeded random start-up can draw one model over and over (cpu.yaml with seed 0: the first 5
    draws were all cnn4_l2, and TPE never tried the others); each model gets the first trials."""
    space = load_space("cpu")
    assert space.startup_points(16) == [{"model": "vgg_fer_s"}, {"model": "cnn4_l2"}, {"model": "simple_cnn"}]
    assert space.startup_points(5) == []  # fewer than two trials per model: left to the sampler
    assert parse_space({"model": "simple_cnn", "lr": {"uniform": [0.1, 0.2]}}).startup_points(50) == []

    # Through Optuna, as the search uses them: enqueued, the other keys sampled (conditions hold).
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for point in space.startup_points(16):
        study.enqueue_trial(point)
    models = []
    for _ in range(3):
        trial = study.ask()
        values = space.suggest(trial)
        models.append(values["model"])
        assert ("model_kwargs.fc" in values) == (values["model"] == "vgg_fer_s")
        space.trial_config(values, seed=0)  # a valid training config
        study.tell(trial, 0.5)
    assert models == ["vgg_fer_s", "cnn4_l2", "simple_cnn"]


def test_a_space_comes_back_from_its_search_record():
    space = parse_space({**BASE, "promotion_window": 4, "lr": {"loguniform": [1e-4, 1e-2]}}, name="rec")
    assert parse_space(BASE).promotion_window == 0  # Ray's ASHA unless a space asks
    back = space_from_record(space.to_dict())
    assert back.to_dict() == space.to_dict() and back.promotion_window == 4
    old = {k: v for k, v in space.to_dict().items() if k != "promotion_window"}  # a record from before the key
    assert space_from_record(old).promotion_window == 0


def _asha_decisions(scheduler, results):
    """Feed (trial, epoch, val_acc) results to a Tune scheduler; the trials it stopped."""
    from types import SimpleNamespace

    scheduler.set_search_properties("val_acc", "max")
    trials, stopped = {}, []
    for name, epoch, acc in results:
        if name not in trials:
            trials[name] = SimpleNamespace(trial_id=name)
            scheduler.on_trial_add(None, trials[name])
        if scheduler.on_trial_result(None, trials[name], {"epoch": epoch, "val_acc": acc}) == "STOP":
            stopped.append(name)
    return stopped


def test_recent_asha_keeps_its_bar_where_the_sampler_is_now():
    """An improving sampler: Ray's ASHA measures each trial at the 2-epoch rung against every
    earlier one and promotes all the later, better trials; with a window of the last 3 results only
    those among the best third of their neighbours go on."""
    from fer_tune.search.tuner import RecentASHA, make_scheduler

    space = parse_space({**BASE, "max_epochs": 8, "grace_period": 2})
    rung = [("a", 0.20), ("b", 0.24), ("c", 0.21), ("d", 0.30), ("e", 0.31), ("f", 0.29), ("g", 0.33), ("h", 0.26)]
    results = [(name, 2, acc) for name, acc in rung]
    assert _asha_decisions(make_scheduler(space), results) == ["c", "h"]  # below the median of all before
    windowed = make_scheduler(space.with_budget(promotion_window=3))
    assert isinstance(windowed, RecentASHA)
    # d beats all three before it; f loses to d and e; h to e, f and g
    assert _asha_decisions(windowed, results) == ["c", "f", "h"]
    assert _asha_decisions(make_scheduler(space.with_budget(promotion_window=8)), results) == ["c", "h"]


def test_tpe_models_the_best_quarter_as_good_and_starts_with_a_third_at_random():
    from fer_tune.search.tuner import good_group_size, make_sampler

    assert [good_group_size(n) for n in (1, 4, 5, 16, 40, 400)] == [1, 1, 2, 4, 10, 25]
    sampler = make_sampler(seed=0, trials=16)
    assert sampler._gamma(16) == 4  # Optuna's default would model 2 of 16 trials as good
    assert sampler._n_startup_trials == 5
    assert make_sampler(seed=0, trials=6)._n_startup_trials == 3
    assert make_sampler(seed=0, trials=100)._n_startup_trials == 10


def test_pretrained_weights_are_checked_when_the_space_loads(tmp_path):
    """A missing weights file fails the load (one line naming it), not every trial; a file given
    for one model of a choice applies to that model only."""
    models = {"choice": ["timm/resnet18", "timm/efficientnet_b0"]}
    with pytest.raises(UserError, match=r"pretrained: pretrained weights file not found: /nowhere/r18.safetensors"):
        parse_space({**BASE, "model": models, "pretrained": "/nowhere/r18.safetensors"})
    weights = tmp_path / "r18.safetensors"
    weights.write_bytes(b"")
    space = parse_space({**BASE, "model": models,
                         "pretrained": {"value": str(weights), "when": {"model": "timm/resnet18"}}})
    assert space.params["pretrained"].active({"model": "timm/resnet18"})
    assert not space.params["pretrained"].active({"model": "timm/efficientnet_b0"})
    with pytest.raises(UserError, match="pretrained"):
        parse_space({**BASE, "model": models, "pretrained": {"choice": [str(weights), str(tmp_path / "gone.pth")]}})


def test_a_local_search_on_a_cpu_without_bf16_says_trials_train_in_fp32(monkeypatch):
    from fer_tune.search.tuner import fp32_note
    from fer_tune.train import runtime

    cpu = {"CPU": 2.0, "GPU": 0.0}
    space = parse_space(dict(BASE))
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert fp32_note(space, cpu, local=True).startswith("this CPU has no native bf16, so trials train in fp32")
    assert fp32_note(parse_space({**BASE, "precision": "auto"}), cpu, local=True)
    assert fp32_note(space, cpu, local=False) is None  # a cluster's workers may have other CPUs
    assert fp32_note(space, {"CPU": 2.0, "GPU": 1.0}, local=True) is None
    assert fp32_note(parse_space({**BASE, "precision": "fp32"}), cpu, local=True) is None  # asked for fp32
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert fp32_note(space, cpu, local=True) is None


def test_a_local_cpu_search_with_a_gpu_sized_budget_names_the_cpu_search():
    from fer_tune.search.tuner import cpu_budget_note

    cpu, gpu = {"CPU": 2.0, "GPU": 0.0}, {"CPU": 8.0, "GPU": 1.0}
    cnn, small = load_space("cnn"), load_space("cpu")
    assert "--space cpu --subset 0.5 --executor direct" in cpu_budget_note(cnn, cnn.trials, 1.0, cpu, local=True)
    assert cpu_budget_note(cnn, cnn.trials, 1.0, cpu, local=False) is None  # a cluster's nodes may have GPUs
    assert cpu_budget_note(cnn, cnn.trials, 1.0, gpu, local=True) is None
    assert cpu_budget_note(cnn, 8, 0.25, cpu, local=True) is None  # made small by flags
    assert cpu_budget_note(small, small.trials, 0.5, cpu, local=True) is None  # the documented CPU search
    assert cpu_budget_note(small, small.trials, 1.0, cpu, local=True) is None
