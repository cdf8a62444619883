"""cluster/gpu.yaml passes Ray's own cluster-config validation, offline, and matches the project."""

import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GPU_YAML = ROOT / "cluster" / "gpu.yaml"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(GPU_YAML.read_text())


def pinned(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(rf"{package}(\[|=)", d))
    return spec.split("==")[1]


def test_ray_validates_the_launcher_config(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # raises on any schema violation
    assert prepared["head_node_type"] == "head"
    gpu_types = [t for t in prepared["available_node_types"] if t != "head"]
    assert gpu_types and all(prepared["available_node_types"][t]["min_workers"] == 0 for t in gpu_types)

    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["node_confg"] = {}
    with pytest.raises(Exception, match="node_confg"):
        validate_config(prepare_config(broken))


def test_image_matches_the_pinned_ray_and_python(config):
    image = config["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{pinned('ray')}-py311-")
    assert image.endswith("-gpu") or re.search(r"-cu\d+$", image)


def test_referenced_files_exist_and_nothing_is_exposed(config):
    for target, source in config["file_mounts"].items():
        if source == "~/.ray/auth_token":  # the user's own token, generated before `ray up`
            assert target == "/home/ray/.ray/auth_token"
        else:
            assert (ROOT / source).exists(), f"file_mounts {target}: {source} is not in the project"
        assert any(target in cmd for cmd in config["setup_commands"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard`, not the internet
    for start in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):  # token auth on every node
        assert "RAY_AUTH_MODE=token ray start" in " ".join(start)
    assert "~/.ray/auth_token" in config["file_mounts"].values()
    text = GPU_YAML.read_text().lower()
    for secret in ("aws_access_key", "aws_secret", "ray_auth_mode=disabled", "password"):
        assert secret not in text


def test_kuberay_manifest_has_what_kuberay_requires():
    manifest = yaml.safe_load((ROOT / "cluster" / "kuberay.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    assert spec["rayVersion"] == pinned("ray")
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and head["serviceType"] == "ClusterIP"
    assert head["template"]["spec"]["containers"][0]["image"]
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] and int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_dockerfile_base_matches_the_launcher_image(config):
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f"FROM {config['docker']['image']}" in dockerfile
    for line in dockerfile.splitlines():
        if line.startswith("COPY"):
            for source in line.split()[2:-1] if "--chown" in line else line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the project"


@pytest.mark.parametrize("nodes, gpus_per_trial, gpus, refused", [
    (1, 0.0, 0.0, None),  # one machine: a local folder is fine
    (1, 0.5, 1.0, None),
    (2, 0.0, 0.0, "this Ray cluster has 2 nodes"),
    (1, 0.25, 0.0, "trials need GPUs that only nodes the autoscaler adds will have"),  # `ray up`: a CPU head alone
])
def test_local_storage_is_refused_where_nodes_cannot_share_it(monkeypatch, nodes, gpus_per_trial, gpus, refused):
    from fer_tune.errors import UserError
    from fer_tune.search import cluster

    monkeypatch.setattr(cluster, "alive_nodes", lambda: nodes)
    check = lambda: cluster.check_local_storage("/x/results", {"CPU": 8.0, "GPU": gpus}, gpus_per_trial)  # noqa: E731
    if refused is None:
        check()
    else:
        with pytest.raises(UserError, match=rf"--storage /x/results: a local folder is not shared between nodes "
                                            rf"\({refused}\).*--storage s3://bucket/prefix.*file:///"):
            check()


@pytest.fixture
def fake_raylet(tmp_path):
    """A process named `raylet` (a copy of sleep), as another Ray instance on this machine would have."""
    import shutil
    import subprocess
    import time

    if not Path("/proc").is_dir():
        pytest.skip("no /proc: the check for other Ray instances reads it")
    exe = tmp_path / "raylet"
    shutil.copy(shutil.which("sleep"), exe)
    proc = subprocess.Popen([str(exe), "60"])
    comm, deadline = Path(f"/proc/{proc.pid}/comm"), time.monotonic() + 30
    while comm.read_text().strip() != "raylet" and time.monotonic() < deadline:  # until the exec is done
        time.sleep(0.05)
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_second_local_ray_instance_is_refused(fake_raylet, toy_prepared, tmp_path, monkeypatch, capsys):
    import ray

    from fer_tune.cli import main
    from fer_tune.search import cluster

    assert ("raylet", fake_raylet) in cluster.ray_processes()
    if ray.is_initialized():
        pytest.skip("Ray is connected in this process (connect() joins it before any check)")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "SETTLE_S", 1.0)
    args = ["search", "--space", "smoke", "--dataset", "fer2013", "--data-root", str(toy_prepared), "--quiet",
            "--executor", "direct", "--storage", str(tmp_path / "results"), "--name", "second"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Ray is already running on this machine" in err and "--address auto" in err
    assert not ray.is_initialized()
    assert not (tmp_path / "results" / "second").exists()  # nothing written


def test_concurrency_on_gpu_yaml_counts_what_the_autoscaler_can_add(config, tmp_path):
    """On the head of `ray up cluster/gpu.yaml` the cluster has 0 GPUs until trials wait for them:
    the search's concurrency comes from the launcher's config there (resources filled out per
    instance type, as `ray up` writes it), so 0.25 GPU per trial runs 64 trials, not one."""
    import json

    from ray.autoscaler._private.util import prepare_config

    from fer_tune.search import cluster

    filled = prepare_config(copy.deepcopy(config))
    types = filled["available_node_types"]
    # What `ray up` fills in from the instance types (m5.2xlarge, g5.xlarge, g5.12xlarge).
    assert [types[t]["node_config"]["InstanceType"] for t in ("head", "gpu_1x", "gpu_4x")] == \
        ["m5.2xlarge", "g5.xlarge", "g5.12xlarge"]
    for name, resources in {"head": {"CPU": 8}, "gpu_1x": {"CPU": 4, "GPU": 1}, "gpu_4x": {"CPU": 48, "GPU": 4}}.items():
        types[name]["resources"] = resources
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(json.dumps(filled))

    now = {"CPU": 8.0, "GPU": 0.0}  # the head alone
    most = cluster.autoscaler_max_resources("auto", path)
    assert most == {"CPU": 8 + 8 * 4 + 2 * 48, "GPU": 8 * 1 + 2 * 4}
    reach = cluster.reachable_capacity(now, most)
    assert cluster.max_concurrency(now, 1, 1, 0.25) == 1
    assert cluster.max_concurrency(reach, 1, 1, 0.25) == 64
    assert cluster.describe(now, reach) == "8 CPUs, 0 GPUs; up to 136 CPUs, 16 GPUs with the autoscaler's nodes"

    # The overall max_workers caps the nodes: the types with most GPUs come first.
    path.write_text(json.dumps({**filled, "max_workers": 3}))
    assert cluster.autoscaler_max_resources("auto", path)["GPU"] == 2 * 4 + 1
    # A local instance we started, or a ray:// cluster elsewhere, is not the one the file describes.
    assert cluster.autoscaler_max_resources(None, path) is None
    assert cluster.autoscaler_max_resources("ray://10.0.0.1:10001", path) is None
    assert cluster.autoscaler_max_resources("auto", tmp_path / "absent.yaml") is None
    assert cluster.reachable_capacity(now, None) == now


def test_an_address_where_nothing_listens_is_one_line_at_once():
    """ray.init would retry such an address for minutes; the command says so before it tries (the
    check alone: `connect` would also turn on token authentication for this whole test session)."""
    import socket
    import time

    from fer_tune.errors import UserError
    from fer_tune.search.cluster import _check_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    started = time.time()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(UserError, match=rf"--address {address}: nothing answers there"):
            _check_reachable(address)
    with socket.socket() as s:  # something listens: no complaint
        s.bind(("127.0.0.1", 0))
        s.listen()
        _check_reachable(f"127.0.0.1:{s.getsockname()[1]}")
    _check_reachable("auto")
    assert time.time() - started < 20
