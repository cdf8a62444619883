"""Connecting to Ray, sizing trials to it, and checking what a search leaves behind.

The local instance is started with the dashboard on (`include_dashboard=True`). That is not for the
web page: Ray Train V2 frees a trial's worker-group placement group through a detached
`PlacementGroupCleaner`, which asks the dashboard's State API whether the trial's controller is
still alive. When Tune stops a trial (ASHA at a rung, or at max_t) the controller dies before it
removes the group itself; without the dashboard the State API query fails ("Failed to query Ray
Train Controller actor state"), the group is never removed, and after about num_cpus trials the
next worker group waits forever ("WorkerGroupStartupTimeoutError ... waiting for 1 workers").
The dashboard needs `ray[default]` (aiohttp & co), which fer-tune depends on.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from fer_tune.errors import UserError, first_line

TOKEN_FILE = Path.home() / ".ray" / "auth_token"


def connect(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> bool:
    """Start a local Ray instance (address None) or join a cluster ("auto", "ray://host:10001",
    "host:6379"). Returns True when this call started Ray (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    with _keeping_sigterm_handler():
        return _connect(ray, address, num_cpus, quiet)


@contextmanager
def _keeping_sigterm_handler():
    """ray.init replaces the driver's SIGTERM handler with a plain sys.exit, and ray.shutdown sets it
    to the default action (an instant death) underneath Python; keep the command's own (the CLI's stops
    like Ctrl-C, so `kill` of a search still ends it gracefully and writes its tables, and `kill` of a
    retrain after its Ray runs still removes its half-written output)."""
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        yield
    finally:
        if callable(handler):
            signal.signal(signal.SIGTERM, handler)


def _check_reachable(address: str) -> None:
    """A `host:port` (or `ray://host:port`) where nothing listens: one line now, where ray.init would
    retry its connection for minutes. "auto" is Ray's own lookup, which fails fast."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise UserError(f"--address {address}: nothing answers there ({exc.strerror or first_line(exc)}); check the "
                        "head node's address and port (`ray start --head` prints them), or use --address auto "
                        "on a node of the cluster") from None


def _connect(ray, address, num_cpus, quiet) -> bool:
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs = dict(log_to_driver=not quiet, configure_logging=True, logging_level="ERROR" if quiet else "INFO")
    if address:
        # Clusters started with token authentication (Ray's default since 2.59) need the mode in
        # the environment of every process that connects (also for `ray status`).
        _check_reachable(address)
        if "RAY_AUTH_MODE" not in os.environ and (TOKEN_FILE.is_file() or os.environ.get("RAY_AUTH_TOKEN")):
            _enable_token_auth()
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"--address {address}: cannot connect to Ray ({first_line(exc)}); start a cluster "
                            f"with `ray start --head` or `ray up cluster/gpu.yaml`, and with token authentication "
                            f"export RAY_AUTH_MODE=token") from None
        return True
    running = [] if os.environ.get("RAY_ADDRESS") else other_ray_instance()  # with RAY_ADDRESS, ray.init joins it
    if running:
        name, pid = running[0]
        raise UserError(f"Ray is already running on this machine ({name} pid {pid}), and a second local instance "
                        f"beside it can cost both their Ray Train workers: join it with --address auto (a `ray start` "
                        f"cluster), or let the other command finish (or `ray stop` it) and run again")
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    return True


def _enable_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process and the ones it starts. Ray reads the mode into its
    config when it is imported, so setting the variable alone came too late (every connection was
    refused: "InvalidAuthToken: Authentication token is missing or incorrect"); the config is read
    again as Ray's own ray.init does when it turns token authentication on for a new local instance."""
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import Config

    Config.initialize("")


RAY_DAEMONS = ("gcs_server", "raylet")
SETTLE_S = 10.0  # how long the daemons of an instance that was just shut down may take to exit


def other_ray_instance() -> list[tuple[str, int]]:
    """The Ray daemons on this machine that are still there after SETTLE_S (none: no other instance)."""
    deadline = time.monotonic() + SETTLE_S
    while (running := ray_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return running


def ray_processes(proc: Path = Path("/proc")) -> list[tuple[str, int]]:
    """(name, pid) of the Ray daemons running on this machine, of any Ray instance; empty where there
    is no /proc to read (then nothing is checked)."""
    found = []
    for stat in proc.glob("[0-9]*/stat"):
        name = _running(stat)
        if name in RAY_DAEMONS:
            found.append((name, int(stat.parent.name)))
    return sorted(found, key=lambda item: (RAY_DAEMONS.index(item[0]), item[1]))


ENDED = ("Z", "X")  # /proc states of an exited process (unreaped, or being reaped)


def _running(stat: Path) -> str | None:
    """The name of the process of a /proc/PID/stat file, None when it has ended (an exited,
    unreaped process, state Z or X, counts as ended)."""
    info = _stat(stat)
    return None if info is None or info[1] in ENDED else info[0]


def _stat(stat: Path) -> tuple[str, str, int] | None:
    """(name, state letter, start time in clock ticks after boot) of a /proc/PID/stat file (fields 2,
    3 and 22), None when there is no such process."""
    try:
        text = stat.read_text()  # "pid (name) state ..."
    except OSError:  # the process ended while we looked
        return None
    name, _, rest = text[text.find("(") + 1:].rpartition(")")
    fields = rest.split()
    return name, fields[0], int(fields[19])


def driver_record() -> dict:
    """This process as the driver of a search, for search.yaml while it runs: host, pid, and on Linux
    its start tick and pid namespace, so that `fer-tune trials` can tell a running search from one
    whose driver ended without finishing."""
    info = _stat(Path(f"/proc/{os.getpid()}/stat"))
    return {"host": socket.gethostname(), "pid": os.getpid(), "start_tick": info[2] if info else None,
            "pid_ns": _pid_namespace()}


def driver_state(driver: dict | None) -> str | None:
    """"alive" or "gone" for a search.yaml driver on this host (gone: no such process, an unreaped one,
    or the pid now another process's); None when it cannot be told (another host or container, no record,
    a process /proc does not show)."""
    if not isinstance(driver, dict) or driver.get("host") != socket.gethostname() or not driver.get("pid") \
            or driver.get("pid_ns") != _pid_namespace():
        return None
    pid = int(driver["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except OSError:  # EPERM: some process of another user has that pid
        pass
    info = _stat(Path(f"/proc/{pid}/stat"))
    if info is None:
        return None if os.path.isdir("/proc/self") else "alive"
    reused = driver.get("start_tick") is not None and info[2] != driver["start_tick"]
    return "gone" if info[1] in ENDED or reused else "alive"


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def shutdown(started: bool) -> None:
    import ray

    if started and ray.is_initialized():
        with _keeping_sigterm_handler():
            ray.shutdown()


def check_state_api(timeout_s: float = 30.0) -> bool:
    """True when the dashboard's State API answers (what Train's placement-group cleanup needs)."""
    from ray.util.state import list_nodes

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            list_nodes(limit=1, timeout=5, raise_on_missing_output=False)
            return True
        except Exception:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def cluster_capacity() -> dict[str, float]:
    import ray

    res = ray.cluster_resources()
    return {"CPU": float(res.get("CPU", 0.0)), "GPU": float(res.get("GPU", 0.0))}


# Where `ray up` puts the cluster launcher's config on the head node, with every node type's
# resources filled out from its instance type (the head's autoscaler reads it from there).
LAUNCHER_CONFIG = Path("~/ray_bootstrap_config.yaml")


def autoscaler_max_resources(address: str | None,
                             launcher_config: Path = LAUNCHER_CONFIG) -> dict[str, float] | None:
    """The most CPUs/GPUs the connected cluster's autoscaler may bring up, or None where there is
    no autoscaler (a local instance, a fixed `ray start` cluster). First the config an autoscaler
    publishes in the GCS (KubeRay, newer Rays; Ray Train reads it the same way), else, on the head
    node of a `ray up` cluster (`--address auto` there), the launcher's own config file.
    `address` is the one the command connected with (None: a local instance it started)."""
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
    except Exception:  # a Ray without it: the launcher's file, or what the cluster has now
        most = None
    if most:
        return {"CPU": float(most.get("CPU", 0)), "GPU": float(most.get("GPU", 0))}
    if not address or address.startswith("ray://"):
        return None  # a local instance we started, or a remote cluster the file here does not describe
    return launcher_max_resources(Path(launcher_config).expanduser())


def launcher_max_resources(path: Path) -> dict[str, float] | None:
    """CPUs/GPUs of a cluster-launcher config at full size: the head plus each worker type's
    resources x its max_workers, within the config's overall max_workers (the types with most of a
    resource first). None when the file is absent or unreadable."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text())  # `ray up` writes it as JSON, which YAML reads
        types = config["available_node_types"]
        head = config["head_node_type"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None
    most = {}
    for key in ("CPU", "GPU"):
        total = float((types.get(head, {}).get("resources") or {}).get(key, 0))
        workers = sorted(((float((t.get("resources") or {}).get(key, 0)), int(t.get("max_workers", 0)))
                          for name, t in types.items() if name != head), reverse=True)
        left = config.get("max_workers", sum(n for _, n in workers))
        for per_node, count in workers:
            take = min(count, left)
            total, left = total + per_node * take, left - take
        most[key] = total
    return most


def reachable_capacity(now: dict[str, float], most: dict[str, float] | None) -> dict[str, float]:
    """What the cluster can hold once its autoscaler has added nodes: per resource the larger of
    what it has now and what its node groups can add up to."""
    return {k: max(now[k], (most or {}).get(k, 0.0)) for k in ("CPU", "GPU")}


def describe(now: dict[str, float], reach: dict[str, float]) -> str:
    """'4 CPUs, 0 GPUs' and, when the autoscaler can add more, '; up to 40 CPUs, 16 GPUs with the
    autoscaler's nodes'."""
    text = f"{now['CPU']:g} CPUs, {now['GPU']:g} GPUs"
    if reach != now:
        text += f"; up to {reach['CPU']:g} CPUs, {reach['GPU']:g} GPUs with the autoscaler's nodes"
    return text


def max_concurrency(capacity: dict[str, float], workers: int, cpus: float, gpus: float) -> int:
    """How many trials of `workers` x (cpus, gpus) the cluster holds at once (at least 1)."""
    fits = []
    if cpus > 0:
        fits.append(math.floor(capacity["CPU"] / (workers * cpus) + 1e-9))
    if gpus > 0:
        fits.append(math.floor(capacity["GPU"] / (workers * gpus) + 1e-9))
    return max(1, min(fits)) if fits else 1


def check_fits(capacity: dict[str, float], workers: int, cpus: float, gpus: float, address: str | None, *,
               what: str = "one trial", flags: str = "--workers-per-trial/--cpus-per-trial/--gpus-per-trial") -> None:
    """One trial (or retrain run) must fit the cluster: a local instance cannot grow, and a Train run
    whose worker group can never be placed waits without end."""
    if address:
        return  # an autoscaling cluster may add nodes
    need_cpu, need_gpu = workers * cpus, workers * gpus
    if need_cpu > capacity["CPU"] + 1e-9 or need_gpu > capacity["GPU"] + 1e-9:
        raise UserError(f"{what} needs {need_cpu:g} CPUs and {need_gpu:g} GPUs ({workers} worker(s) x "
                        f"{cpus:g} CPU, {gpus:g} GPU) but this machine has {capacity['CPU']:g} CPUs and "
                        f"{capacity['GPU']:g} GPUs; lower {flags}")


def alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_local_storage(storage: str, capacity: dict[str, float], gpus_per_trial: float) -> None:
    """A plain local --storage works on one node only: Ray Tune needs storage that every node
    reaches. Refused when the cluster has more than one node, or when trials need GPUs that no
    node has yet (an autoscaling cluster is about to add nodes)."""
    nodes = alive_nodes()
    if nodes > 1:
        why = f"this Ray cluster has {nodes} nodes"
    elif gpus_per_trial > 0 and capacity["GPU"] == 0:
        why = "trials need GPUs that only nodes the autoscaler adds will have"
    else:
        return
    raise UserError(f"--storage {storage}: a local folder is not shared between nodes ({why}) and Ray Tune needs "
                    "storage every node can reach; use --storage s3://bucket/prefix (or gs://...), or a shared "
                    "filesystem mounted at the same path on every node, written as --storage file:///that/path")


def leftovers() -> dict[str, list]:
    """What a finished search should not leave alive: placement groups not REMOVED (other than
    those of live actors the caller still holds) and PlacementGroupCleaner actors."""
    import ray
    from ray.util.state import list_actors

    groups = [pg_id for pg_id, info in ray.util.placement_group_table().items() if info.get("state") != "REMOVED"]
    cleaners = list_actors(filters=[("class_name", "=", "PlacementGroupCleaner"), ("state", "!=", "DEAD")],
                           raise_on_missing_output=False)
    return {"placement_groups": groups, "cleaners": [a.actor_id for a in cleaners]}


def wait_for_no_leftovers(timeout_s: float = 30.0) -> dict[str, list]:
    """Leftovers after giving the cleaners time to act (they poll every second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = leftovers()
        if not any(found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(1.0)


@contextmanager
def env(**values: str):
    """Set environment variables for the duration of a block (read by Ray Tune when it starts)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def exit_if_the_instance_ends(daemons: list[tuple[str, int]], on_lost, poll_s: float = 0.05):
    """A SIGTERM to the whole process group or cgroup (Slurm, systemd, `kill -- -PGID`) also ends
    the daemons of the local Ray instance this driver started. The driver is then blocked inside
    Ray's client, where no Python signal handler runs, until Ray ends the process 60 s later
    ("Failed to connect to GCS within 60 seconds") without writing anything. So a thread watches
    `daemons` (from `ray_processes()` right after the start): when one has ended, it calls `on_lost`
    (which writes what the driver knows) and exits 130 at once. Ray's own client sometimes ends the
    process first (exit 1) once the raylet is gone, so the watch is frequent (a few /proc reads)."""
    if not daemons:
        yield
        return
    done = threading.Event()

    def watch():
        while not done.wait(poll_s):
            if any(_running(Path(f"/proc/{pid}/stat")) is None for _, pid in daemons) and not done.is_set():
                on_lost()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(130)

    watcher = threading.Thread(target=watch, name="fer-tune-ray-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join(timeout=5)
