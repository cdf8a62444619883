"""A two-node Ray cluster on this machine (Ray's own `ray.cluster_utils.Cluster`: a head and a
worker node, separate raylets with 1 CPU each) with an S3-compatible server on loopback (moto):
the multi-node path of `fer-tune search --address ... --storage s3://...`, then `fer-tune trials`
and `--resume` reading the experiment back from the bucket.
"""

import io
import shutil

import pandas as pd
import pytest
import ray
import yaml

from conftest import free_port, toy_arrays
from fer_tune.errors import UserError
from fer_tune.search import cluster
from fer_tune.search.space import parse_space
from fer_tune.search.tuner import run_search
from fer_tune.train import TrainData

pytestmark = pytest.mark.slow

moto_server = pytest.importorskip("moto.server", reason="moto[server] (a dev dependency) is not installed")

CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
SPACE = {"max_epochs": 2, "grace_period": 2, "reduction_factor": 2, "model": "simple_cnn",
         "model_kwargs.width": 0.25, "model_kwargs.hidden": 32, "batch_size": 32, "channels_last": False,
         "aug_strength": 0.0, "schedule": "constant", "label_smoothing": 0.0,
         "lr": {"loguniform": [1e-3, 1e-2]}}
BUCKET = "fer-tune-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback; every process started later (Ray's nodes) inherits the
    endpoint and the fake credentials from the environment."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per S3 request otherwise
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client
    server.stop()


@pytest.fixture(scope="module")
def two_nodes(s3):
    from ray.cluster_utils import Cluster

    # Ray reads its auth mode once per process, and this one may have run Ray without a token
    # already; the nodes here run without one too (fer-tune would otherwise switch to token mode
    # when ~/.ray/auth_token exists, as it must for clusters from `ray start`).
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    ray_cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                                 "dashboard_port": free_port()})
    ray_cluster.add_node(num_cpus=1)
    ray_cluster.wait_for_nodes()
    ray.init(address=ray_cluster.address)  # the searches join this driver connection (and leave it up)
    yield ray_cluster
    ray.shutdown()
    ray_cluster.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def tiny_data():
    tx, ty = toy_arrays(192, seed=0, size=16)
    vx, vy = toy_arrays(64, seed=1, size=16)
    return TrainData(tx, ty, vx, vy, CLASSES)


def keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", [])}


def test_two_node_search_with_s3_storage_then_trials_and_resume(two_nodes, s3, tiny_data, tmp_path, monkeypatch,
                                                                capsys):
    monkeypatch.setenv("FER_TUNE_CACHE", str(tmp_path / "cache"))
    space = parse_space(SPACE, name="tiny")
    address = two_nodes.address

    # A plain local folder is refused on a multi-node cluster, before any trial starts.
    with pytest.raises(UserError, match=r"--storage .*local folder is not shared between nodes \(this Ray cluster "
                                        r"has 2 nodes\).*s3://"):
        run_search(space, tiny_data, trials=2, storage=tmp_path / "local", name="refused", address=address,
                   progress=False)
    assert not (tmp_path / "local" / "refused").exists()

    storage = f"s3://{BUCKET}/experiments"
    # Two trials at once on two 1-CPU nodes: one on each.
    summary = run_search(space, tiny_data, trials=2, concurrency=2, storage=storage, name="twonode", seed=3,
                         address=address, executor="train", progress=False)
    table = summary.table
    assert len(table) == 2 and set(table["status"]) == {"completed"}, table["error"].tolist()
    # Trials ran on both nodes.
    node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert set(table["node_id"]) == node_ids and len(node_ids) == 2
    assert not any(cluster.wait_for_no_leftovers(timeout_s=20).values())

    # Everything is in the bucket: tables, record, the Optuna study, each trial's folder.
    stored = keys(s3, "experiments/twonode/")
    assert {"trials.csv", "trials.parquet", "best.json", "search.yaml", "optuna.journal"} <= stored
    assert {tid for tid in table["trial_id"] if any(k.startswith(f"trial_{tid}/") for k in stored)} == \
        set(table["trial_id"])
    record = yaml.safe_load(s3.get_object(Bucket=BUCKET, Key="experiments/twonode/search.yaml")["Body"].read())
    assert record["status"] == "finished" and record["storage"] == storage and "driver" not in record
    # The driver kept its record and journal apart from the copy that `trials` mirrors (and prunes).
    assert (tmp_path / "cache" / "searches" / "twonode" / "optuna.journal").is_file()

    # `fer-tune trials s3://...` reads the table back from the bucket (not from the driver's cache).
    shutil.rmtree(tmp_path / "cache")
    from fer_tune.cli import main

    capsys.readouterr()
    main(["trials", f"{storage}/twonode", "--format", "csv"])
    shown = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert sorted(shown["trial_id"]) == sorted(table["trial_id"])
    assert shown["best_val_acc"].tolist() == pytest.approx(
        table.set_index("trial_id").loc[shown["trial_id"], "best_val_acc"].tolist())

    # retrain/transfer read the experiment from the bucket too: its best config, ready to train.
    from fer_tune.evaluate.experiment import read_experiment

    exp = read_experiment(f"{storage}/twonode")
    (best,) = exp.ranked(1)
    assert best.trial_id == summary.best["trial_id"] and best.config.lr == pytest.approx(summary.best["lr"])
    assert exp.final_dir == tmp_path / "cache" / "experiments" / "twonode" / "final"

    # --resume from the bucket, on a machine without the local cache: the finished trials are kept.
    shutil.rmtree(tmp_path / "cache")
    resumed = run_search(None, tiny_data, storage=storage, name="twonode", resume=True, address=address,
                         progress=False)
    assert sorted(resumed.table["trial_id"]) == sorted(table["trial_id"])
    assert set(resumed.table["status"]) == {"completed"}
    assert resumed.table.set_index("trial_id")["best_val_acc"].to_dict() == pytest.approx(
        table.set_index("trial_id")["best_val_acc"].to_dict())
    record = yaml.safe_load(s3.get_object(Bucket=BUCKET, Key="experiments/twonode/search.yaml")["Body"].read())
    assert record["status"] == "finished" and len(record["resumed"]) == 1


def test_unknown_storage_uri_is_one_clear_error(tmp_path):
    from fer_tune.search import results

    with pytest.raises(UserError, match="nosuch://bucket/x: not a storage URI"):
        results.find_experiment("nosuch://bucket/x")


def test_retrain_runs_as_ray_train_runs_on_two_nodes_with_checkpoints_in_s3(two_nodes, s3, tiny_data, tmp_path):
    """`fer-tune retrain --address` on a multi-node cluster: a local runs folder is refused; with
    the experiment in the bucket, every seed is a Ray Train run whose folder comes back."""
    from fer_tune.evaluate.retrain import RunSpec, train_runs

    cfg = parse_space(SPACE, name="tiny").trial_config({"lr": 3e-3}, epochs=1, seed=0)
    specs = [RunSpec(name=f"rank1-seed{i}", rank=1, trial_id="t", seed=i, seed_index=i, config=cfg.replace(seed=i))
             for i in range(2)]
    quiet = dict(address=two_nodes.address, progress=False, log=lambda *_: None)
    with pytest.raises(UserError, match=r"--storage .*local folder is not shared between nodes"):
        train_runs(specs, tiny_data, tmp_path / "local" / "runs", storage=str(tmp_path / "local"), **quiet)

    uri = f"s3://{BUCKET}/experiments/retrained"
    runs = train_runs(specs, tiny_data, tmp_path / "final" / "runs", cloud=uri, **quiet)
    assert [r.spec.name for r in runs] == ["rank1-seed0", "rank1-seed1"]
    for run in runs:
        assert run.epochs_run == 1 and run.run_dir == tmp_path / "final" / "runs" / run.spec.name
        assert {"best.pt", "config.yaml", "metrics.csv"} <= {p.name for p in run.run_dir.iterdir()}
        assert run.config.seed == run.spec.seed
    assert runs[0].history != runs[1].history  # two seeds, two models
    assert any(k.startswith("rank1-seed") for k in keys(s3, "experiments/retrained/retrain_runs/"))
    assert not any(cluster.wait_for_no_leftovers(timeout_s=20).values())


def test_concurrency_counts_the_nodes_the_autoscaler_can_add(two_nodes, tmp_path):
    """An autoscaling cluster may start as a CPU head alone: concurrency must come from what the
    autoscaler may add (here its config in the GCS, where KubeRay's and newer Rays' autoscalers
    publish it), not the 0 GPUs of now. The `ray up` launcher file: test_cluster_config.py."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    now = cluster.cluster_capacity()
    assert now == {"CPU": 2.0, "GPU": 0.0}
    most = lambda: cluster.autoscaler_max_resources(two_nodes.address, tmp_path / "absent.yaml")  # noqa: E731
    assert most() is None  # no autoscaler: what the cluster has is all there is
    assert cluster.max_concurrency(cluster.reachable_capacity(now, None), 1, 1, 0.25) == 1

    # gpu.yaml's node groups: a CPU head, up to 8 single-GPU and 2 four-GPU workers.
    config = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="head", resources={"CPU": 8}, min_count=1, max_count=1),
        autoscaler_pb2.NodeGroupConfig(name="gpu1", resources={"CPU": 8, "GPU": 1}, max_count=8),
        autoscaler_pb2.NodeGroupConfig(name="gpu4", resources={"CPU": 48, "GPU": 4}, max_count=2)])
    key, namespace = GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    _internal_kv_put(key, config.SerializeToString(), namespace=namespace)
    try:
        assert most() == {"CPU": 8 + 64 + 96, "GPU": 16.0}
        reach = cluster.reachable_capacity(now, most())
        assert cluster.max_concurrency(reach, 1, 1, 0.25) == 64  # 16 GPUs, a quarter each
        assert cluster.max_concurrency(reach, 4, 1, 1) == 4  # data-parallel trials of 4 GPUs
        assert cluster.describe(now, reach) == "2 CPUs, 0 GPUs; up to 168 CPUs, 16 GPUs with the autoscaler's nodes"
    finally:
        _internal_kv_del(key, namespace=namespace)
    assert most() is None
