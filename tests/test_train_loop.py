"""The one training loop, end to end on small learnable data."""

import math
import zipfile

import pytest
import torch
from conftest import free_port

from fer_tune.train import (MemoryReporter, Reporter, RunFolderReporter, TrainConfig, TrainingDiverged, fit,
                            load_checkpoint, model_from_checkpoint)
from fer_tune.train.report import start_line
from fer_tune.train.runtime import cpu_has_bf16, predict_logits, resolve_precision

# A quarter-width simple_cnn: 6x faster than the full one on a CPU and still learns the toy data (val ~0.7).
FAST = dict(model="simple_cnn", model_kwargs={"width": 0.25, "hidden": 32}, batch_size=64, lr=3e-3, epochs=3,
            aug_strength=0.3, seed=7)


def test_short_training_lowers_the_loss_and_learns(toy_data):
    rep = MemoryReporter()
    result = fit(TrainConfig(**FAST), toy_data, rep)
    losses = [h["train_loss"] for h in rep.history]
    assert losses[-1] < losses[0]
    assert result.best["val_acc"] > 0.5  # 7 classes: chance is ~0.14
    assert set(rep.history[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "lr",
                                   "epoch_seconds", "images_per_second"}
    assert rep.info["steps_per_epoch"] == 640 // 64
    assert result.stop_reason == "completed" and result.epochs_run == 3


def test_seeded_runs_are_identical_on_cpu(toy_data):
    cfg = TrainConfig(**{**FAST, "epochs": 2, "mixup": 0.2, "dropout": 0.3})
    a, b = fit(cfg, toy_data), fit(cfg, toy_data)
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("epoch_seconds", "images_per_second")} for e in h]
    assert strip(a.history) == strip(b.history)
    c = fit(cfg.replace(seed=8), toy_data)
    assert strip(c.history) != strip(a.history)


def test_run_folder_and_checkpoint_round_trip(toy_data, tmp_path):
    result = fit(TrainConfig(**FAST), toy_data, RunFolderReporter(tmp_path, progress=False))
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,train_loss,train_acc,val_loss,val_acc,val_macro_f1,lr")
    assert len(lines) == 1 + 3
    assert list(tmp_path.glob("events.out.tfevents.*"))
    state = load_checkpoint(tmp_path / "best.pt")
    assert state["best"]["epoch"] == result.best["epoch"] == state["epoch"]
    model, cfg = model_from_checkpoint(state)
    assert cfg.model == "simple_cnn" and state["classes"] == list(toy_data.classes)
    for k, v in result.best_state.items():
        assert torch.equal(model.state_dict()[k], v)
    logits = predict_logits(model, torch.as_tensor(toy_data.val_x), mean=state["norm"][0], std=state["norm"][1])
    acc = (logits.argmax(1) == torch.as_tensor(toy_data.val_y)).float().mean().item()
    assert acc == pytest.approx(result.best["val_acc"], abs=0.02)  # bf16 vs fp32 inference


def test_no_progress_bar_redraws_when_output_is_not_a_terminal(toy_data, tmp_path, capsys):
    """With output going to a file (pytest captures it, as `nohup ... > log` would), the epoch
    lines are printed and the per-batch bar is not (its redraws would fill the log)."""
    fit(TrainConfig(**{**FAST, "epochs": 2}), toy_data, RunFolderReporter(tmp_path, progress=True, tensorboard=False))
    out, err = capsys.readouterr()
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch")] == ["1/2", "2/2"]
    assert "batch/s" not in out + err and "\r" not in out + err
    # First, one line of what trains how: the precision explains an epoch's pace.
    precision = resolve_precision("auto", torch.device("cpu"))
    assert out.splitlines()[0].startswith("simple_cnn: ") and f"640 train / 200 val images, cpu {precision}" in out
    assert ("no native bf16" in out) == (precision == "fp32")
    info = {"device": "cpu", "precision": "fp32", "params": 1000, "train_images": 1, "val_images": 1, "epochs": 1,
            "steps_per_epoch": 1, "config": {"model": "m", "precision": "fp32"}}
    assert "no native bf16" not in start_line(info)  # asked for fp32: nothing to explain
    asked_bf16 = start_line({**info, "precision": "bf16", "config": {"model": "m", "precision": "bf16"}})
    assert ("emulated" in asked_bf16) == (not cpu_has_bf16())  # asked for bf16 the CPU only emulates


def test_checkpoint_loading_refuses_arbitrary_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil(), "config": {}}, path)
    from fer_tune.errors import UserError

    with pytest.raises(UserError, match="evil.pt: not a readable fer-tune checkpoint") as err:
        load_checkpoint(path)
    assert "it holds Python objects" in str(err.value)
    assert "weights_only" not in str(err.value)  # torch's advice to unpickle anyway is not passed on

    # Whatever else a user passes as MODEL is one line too (torch raises KeyError, ValueError, ... on them).
    (tmp_path / "notes.txt").write_text("explain like I'm five\n")
    (tmp_path / "face.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("a.txt", "not a torch file")
    for name in ("notes.txt", "face.png", "other.zip"):
        with pytest.raises(UserError, match=f"{name}: not a readable fer-tune checkpoint") as err:
            load_checkpoint(tmp_path / name)
        assert ("the checkpoint comes before the images" in str(err.value)) == (name == "face.png")
        assert "Python objects" not in str(err.value)


@pytest.mark.parametrize("ema", [0.0, 0.99], ids=["plain", "ema"])
def test_resume_continues_exactly(toy_data, tmp_path, ema):
    cfg = TrainConfig(**{**FAST, "epochs": 4, "dropout": 0.2, "ema": ema})
    full = fit(cfg, toy_data)

    class StopAfterTwo(RunFolderReporter):
        def should_stop(self):
            return len(list((self.run_dir / "metrics.csv").read_text().splitlines())) > 2

    part = fit(cfg, toy_data, StopAfterTwo(tmp_path, progress=False, tensorboard=False))
    assert part.stop_reason == "stopped" and part.epochs_run == 2
    resumed = fit(cfg, toy_data, resume=load_checkpoint(tmp_path / "last.pt"))
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
    assert [[h[k] for k in keys] for h in resumed.history] == [[h[k] for k in keys] for h in full.history]


def test_divergence_is_an_error(toy_data):
    with pytest.raises(TrainingDiverged, match="training loss became nan"):
        fit(TrainConfig(**{**FAST, "optimizer": "sgd", "lr": 1e12, "epochs": 2, "precision": "fp32"}), toy_data)


def test_early_stopping_and_reporter_stop(toy_data):
    class NeverBetter(MemoryReporter):
        pass

    # At lr 1e-9 val accuracy cannot keep rising (val loss could: in fp32 it fell a hair every epoch
    # on an AVX2 machine, where bf16 had rounded the change away).
    result = fit(TrainConfig(**{**FAST, "epochs": 30, "lr": 1e-9, "early_stop_patience": 2, "precision": "fp32",
                                "select_metric": "val_acc", "schedule": "constant"}), toy_data, NeverBetter())
    assert result.stop_reason == "early_stopped" and result.epochs_run < 30

    class StopNow(Reporter):
        def should_stop(self):
            return True

    assert fit(TrainConfig(**FAST), toy_data, StopNow()).epochs_run == 1


@pytest.mark.parametrize("optimizer,schedule,weights", [
    ("adam", "onecycle", "inverse"), ("sgd", "plateau", "sqrt_inverse"),
    ("rmsprop", "constant", "effective"), ("adagrad", "cosine", "none"),
])
def test_every_optimizer_schedule_and_weighting_trains(toy_data, optimizer, schedule, weights):
    lr = {"adam": 2e-3, "sgd": 0.05, "rmsprop": 1e-3, "adagrad": 0.02}[optimizer]
    result = fit(TrainConfig(**{**FAST, "optimizer": optimizer, "schedule": schedule, "class_weights": weights,
                                "lr": lr, "grad_clip": 1.0, "cutmix": 1.0}), toy_data)
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_cosine_schedule_warms_up_and_decays(toy_data):
    rep = MemoryReporter()
    fit(TrainConfig(**{**FAST, "epochs": 4, "warmup_epochs": 1.0}), toy_data, rep)
    lrs = [h["lr"] for h in rep.history]
    assert lrs[0] == pytest.approx(3e-3, rel=0.05)  # end of warm-up: the peak
    assert lrs[0] > lrs[1] > lrs[2] > lrs[3] >= 0


def test_time_budget_sizes_the_epochs(toy_data):
    short = fit(TrainConfig(**{**FAST, "epochs": 1000, "time_budget": 1.5}), toy_data)
    longer = fit(TrainConfig(**{**FAST, "epochs": 1000, "time_budget": 6.0}), toy_data)
    assert 1 <= short.config.epochs < longer.config.epochs < 1000
    assert short.epochs_run == short.config.epochs


@pytest.mark.parametrize("how", ["backbone", "lower"])
def test_fine_tuning_from_weights_with_frozen_layers(toy_data, how):
    base = fit(TrainConfig(**{**FAST, "epochs": 1, "model": "cnn4_l2"}), toy_data)
    tuned = fit(TrainConfig(**{**FAST, "epochs": 1, "model": "cnn4_l2", "freeze": how}), toy_data,
                init={"model": base.best_state, "norm": (0.3, 0.2)})
    assert tuned.norm == (0.3, 0.2) != base.norm  # the weights' own input normalisation, not the new data's
    before, after = base.best_state, tuned.best_state
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "head.3.weight" in changed  # the classifier always trains (cnn4_l2: Linear, ReLU, Dropout, Linear)
    first_conv = "features.0.0.weight"
    assert torch.equal(before[first_conv], after[first_conv])  # frozen in both modes
    assert torch.equal(before["features.0.1.running_mean"], after["features.0.1.running_mean"])  # frozen BN stays put
    last_conv = "features.3.0.weight"
    assert torch.equal(before[last_conv], after[last_conv]) == (how == "backbone")


def test_extra_val_sets_are_scored_every_epoch_and_can_select(toy_data, tmp_path):
    """Fine-tuning's source val: scored per epoch as val_<name>_*, in metrics.csv, and val_mean_acc
    (the mean of the val accuracies) selects the epoch when asked to."""
    import dataclasses

    from fer_tune.errors import UserError

    base = fit(TrainConfig(**FAST), toy_data)
    # Fine-tuning on the same images with every label moved one class on: the old task is forgotten
    # as the new one is learnt. Three copies of the old val weigh the mean towards remembering, so
    # val_mean_acc peaks at the first epoch while the new task's val_acc keeps rising after it.
    old = (toy_data.val_x, toy_data.val_y)
    moved = dataclasses.replace(toy_data, train_y=(toy_data.train_y + 1) % 7, val_y=(toy_data.val_y + 1) % 7,
                                extra_val={"old": old, "old2": old, "old3": old})
    cfg = TrainConfig(**{**FAST, "epochs": 4, "lr": 1e-3, "select_metric": "val_mean_acc"})
    result = fit(cfg, moved, RunFolderReporter(tmp_path, progress=False, tensorboard=False),
                 init={"model": base.best_state, "norm": base.norm})
    history = result.history
    for h in history:
        assert h["val_old_acc"] == h["val_old2_acc"] and h["val_old_loss"] == h["val_old3_loss"]  # the same images
        assert h["val_mean_acc"] == pytest.approx((h["val_acc"] + 3 * h["val_old_acc"]) / 4)
    assert history[-1]["val_old_acc"] < history[0]["val_old_acc"]  # forgetting, as the old val split shows it
    assert result.best == max(history, key=lambda h: h["val_mean_acc"]) and result.best["epoch"] == 1
    assert max(history, key=lambda h: h["val_acc"])["epoch"] > 1  # val_acc alone would have kept a later one
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[-10:-7] == ["val_old_loss", "val_old_acc", "val_old_macro_f1"] and header[-1] == "val_mean_acc"
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    with pytest.raises(UserError, match="select_metric val_mean_acc averages val_acc with other val sets"):
        fit(cfg, toy_data)
    with pytest.raises(ValueError, match="the name 'mean' is taken"):
        fit(TrainConfig(**FAST), dataclasses.replace(toy_data, extra_val={"mean": old}))


def test_time_budget_replans_when_the_machine_slows_down(toy_data):
    """Load that arrives after the first estimate must not make the run overshoot its budget."""
    import time

    class SlowsDown(MemoryReporter):
        def step(self, loss=None):
            if self.history:  # from epoch 2 on, every batch costs 50 ms more
                time.sleep(0.05)

        def replan(self, epochs):
            self.replans.append(epochs)

    rep = SlowsDown()
    rep.replans = []
    t0 = time.perf_counter()
    # A tiny MLP, so the first plan is many epochs on any machine and the slowdown must cut it (with
    # simple_cnn a slow CI machine planned 2 epochs at once, and there was nothing left to re-plan).
    cfg = {**FAST, "model": "mlp", "model_kwargs": {"hidden": [64]}, "epochs": 1000, "time_budget": 8.0}
    result = fit(TrainConfig(**cfg), toy_data, rep)
    elapsed = time.perf_counter() - t0
    assert rep.replans and rep.replans[-1] == result.epochs_run == result.config.epochs
    assert elapsed < 8.0 + 1.5  # one slow epoch is ~0.5 s plus eval
    lrs = [h["lr"] for h in rep.history]
    assert lrs[-1] < 0.1 * max(lrs), lrs  # the cosine schedule was shrunk to end with the run


def test_a_slow_first_epoch_does_not_collapse_the_schedule(toy_data):
    """The first epoch pays one-off costs (and may meet a load spike): it must not be taken as the pace."""
    import time

    class SlowStart(MemoryReporter):
        def step(self, loss=None):
            if not self.history:
                time.sleep(0.35)  # epoch 1 alone costs ~3.5 s more (10 batches), a third of the budget

    rep = SlowStart()
    # A tiny MLP, so the sleep sets the pace whatever the CPU (in fp32 on a CPU without bf16 the
    # simple_cnn's own epochs left room for only 3).
    cfg = {**FAST, "model": "mlp", "model_kwargs": {"hidden": [64]}, "epochs": 1000, "time_budget": 10.0}
    result = fit(TrainConfig(**cfg), toy_data, rep)
    lrs = [h["lr"] for h in rep.history]
    assert result.epochs_run >= 4
    # Cosine over the whole run keeps the first half at >= half the peak learning rate; a schedule
    # planned from the slow first epoch alone would have annealed to ~0 within the first few epochs.
    first_half = lrs[: len(lrs) // 2]
    assert min(first_half) > 0.4 * max(lrs), lrs


def test_a_run_that_reached_its_planned_end_is_not_stretched_again(toy_data, monkeypatch):
    """The machine speeds up during the planned last epoch: the cosine schedule has annealed to ~0
    there, so the run ends instead of restarting the learning rate for the time left."""
    import fer_tune.train.loop as loop

    plans = {1: 3, 2: 3, 3: 5}  # after epoch n, the epochs that would fit at the recent pace
    monkeypatch.setattr(loop, "_replan_for_budget", lambda cfg, history, start, schedule, *args:
                        schedule.resize(plans[len(history)]))
    rep = MemoryReporter()
    result = fit(TrainConfig(**{**FAST, "epochs": 1000, "time_budget": 60.0}), toy_data, rep)
    lrs = [h["lr"] for h in rep.history]
    assert result.epochs_run == result.config.epochs == 3
    assert lrs[-1] < 1e-6 * max(lrs) and min(lrs[:-1]) > 0.1 * max(lrs)


def _replan_as_rank(rank: int, port: int, seconds_gone: float, out) -> None:
    """One of two gloo workers re-planning a 100 s budget after `seconds_gone` s at 1 s per epoch."""
    import os
    import time

    import torch.distributed as dist

    from fer_tune.train.loop import _replan_for_budget
    from fer_tune.train.optim import Schedule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = TrainConfig(**{**FAST, "epochs": 50, "time_budget": 100.0})
    schedule = Schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), cfg, steps_per_epoch=10)
    history = [{"epoch": e, "epoch_seconds": 1.0} for e in (1, 2, 3)]
    planned = _replan_for_budget(cfg, history, time.perf_counter() - seconds_gone, schedule, 2, "cpu")
    out.put((rank, planned, schedule.total))
    dist.destroy_process_group()


def test_data_parallel_workers_agree_on_the_replanned_epochs():
    """Workers that time the same epochs a little differently must plan the same number of epochs
    (one with an epoch more would wait for the others forever); they take the smallest plan."""
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    # Rank 0 has 100 - 10.5 s left (89 more epochs), rank 1 100 - 40.5 s (59 more).
    workers = [ctx.Process(target=_replan_as_rank, args=(rank, port, gone, out))
               for rank, gone in ((0, 10.5), (1, 40.5))]
    for w in workers:
        w.start()
    results = sorted(out.get(timeout=120) for _ in workers)
    for w in workers:
        w.join(timeout=60)
    assert [planned for _, planned, _ in results] == [3 + 59, 3 + 59]
    assert [total for _, _, total in results] == [62 * 10, 62 * 10]  # both schedules stretched alike


def test_ema_weights_are_the_ones_scored_saved_and_selected(toy_data, tmp_path):
    cfg = TrainConfig(**{**FAST, "epochs": 3, "ema": 0.99})
    result = fit(cfg, toy_data, RunFolderReporter(tmp_path, progress=False, tensorboard=False))
    plain = fit(cfg.replace(ema=0.0), toy_data)
    # Same training trajectory (the average does not feed back), different weights scored.
    assert [h["train_loss"] for h in result.history] == [h["train_loss"] for h in plain.history]
    assert [h["val_loss"] for h in result.history] != [h["val_loss"] for h in plain.history]
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["ema_steps"] == 3 * (640 // 64)
    averaged, trained = last["model"], last["train_model"]
    assert set(averaged) == set(trained)
    assert not all(torch.equal(averaged[k], trained[k]) for k in averaged)
    best = load_checkpoint(tmp_path / "best.pt")
    for k, v in result.best_state.items():
        assert torch.equal(best["model"][k], v)
    model, _ = model_from_checkpoint(best)
    logits = predict_logits(model, torch.as_tensor(toy_data.val_x), mean=best["norm"][0], std=best["norm"][1])
    acc = (logits.argmax(1) == torch.as_tensor(toy_data.val_y)).float().mean().item()
    assert acc == pytest.approx(result.best["val_acc"], abs=0.02)  # the selected metric is the average's
    with pytest.raises(Exception, match="ema must be in"):
        TrainConfig(ema=1.0)
