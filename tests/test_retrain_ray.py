"""`fer-tune retrain --address`: the seeds as Ray Train runs give the same models as sequential runs."""

import importlib
import os

import pytest
from test_retrain import QUIET, make_experiment, prepare_toy_fer

from fer_tune.evaluate import read_experiment, retrain
from fer_tune.train import TrainData

retrain_mod = importlib.import_module("fer_tune.evaluate.retrain")
pytestmark = pytest.mark.slow


def test_seeds_as_ray_train_runs_match_local_runs(tmp_path):
    import ray

    ds = prepare_toy_fer(tmp_path)
    exp = make_experiment(tmp_path / "results", ds)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        # address "auto" joins the running instance (retrain leaves a Ray it did not start running).
        said = []
        m = retrain(exp, data_root=tmp_path / "data", seeds=2, epochs=1, address="auto", progress=True,
                    log=said.append)
        assert ray.is_initialized()
        # Each run's epochs are shown as they happen, as a local run shows them, and the queue carrying
        # them is gone.
        for name in ("rank1-seed0", "rank1-seed1"):
            assert sum(line.startswith(f"{name}: epoch   1/1  train_loss ") for line in said) == 1, said
        assert not [a for a in ray._private.state.actors().values()  # the GCS table; no dashboard here
                    if a["State"] == "ALIVE" and "Queue" in a["ActorClassName"]]
        # Each run was a Ray Train run: one worker-group placement group per run, all removed.
        groups = ray.util.placement_group_table().values()
        assert len(groups) == 2 and all(g["state"] == "REMOVED" for g in groups)
    finally:
        ray.shutdown()
    final = exp / "final"
    assert not list(exp.glob(".tmp-final-*")) and not (final / ".ray_train").exists()
    assert [x["name"] for x in m["models"]] == ["rank1-seed0", "rank1-seed1"]
    for name in ("rank1-seed0", "rank1-seed1"):
        assert (final / "runs" / name / "best.pt").is_file()
        assert list((final / "runs" / name).glob("events.out.tfevents.*"))

    # CPU training is deterministic per seed: the remote histories equal local ones.
    specs = retrain_mod.plan_runs(read_experiment(exp).ranked(1), 2, 1, 0.0, 1.0)
    data = TrainData.from_prepared(ds)
    for spec, remote in zip(specs, m["models"]):
        local = retrain_mod.run_one(spec, data, tmp_path / "local" / spec.name)
        assert remote["val"] == {k: v for k, v in local.best.items() if k.startswith("val_")}
        row = (final / "runs" / spec.name / "metrics.csv").read_text().splitlines()[1].split(",")
        assert float(row[1]) == local.history[0]["train_loss"] and float(row[4]) == local.history[0]["val_acc"]


def test_a_run_larger_than_the_machine_is_refused(tmp_path):
    """--address local with --cpus-per-run over the machine's CPUs: one line naming the flags, instead
    of a Train run whose worker group waits for ever; no final/ and no Ray left running."""
    import ray

    from fer_tune.errors import UserError

    ds = prepare_toy_fer(tmp_path)
    exp = make_experiment(tmp_path / "results", ds)
    too_many = (os.cpu_count() or 1) + 1
    with pytest.raises(UserError, match=rf"one retrain run needs {too_many} CPUs .* lower --cpus-per-run/--gpus-per-run"):
        retrain(exp, data_root=tmp_path / "data", epochs=1, address="local", cpus_per_run=too_many, **QUIET)
    assert not ray.is_initialized() and not (exp / "final").exists() and not list(exp.glob(".tmp-final-*"))
