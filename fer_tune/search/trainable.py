"""What runs for one trial: the Tune function trainables and the Ray reporter.

Two executors run the same `fit` with the same `RayReporter`:

* `train` (default): the Tune trial is a small driver (`train_trial`, no CPU of its own) that runs a
  Ray Train `TorchTrainer` with `workers` workers (>1 = DDP, each worker its shard; one worker
  trains without torch.distributed's process group, see `torch_config`). Workers report
  with `ray.train.report`; `TuneReportCallback` forwards rank 0's metrics to Tune. Train keeps the
  trial's checkpoints under `<experiment>/train_runs/<trial_id>` and restores the latest one when
  the trial is restarted (retry or `--resume`).
* `direct`: the Tune trial trains itself (`direct_trial`, single worker), reports with
  `ray.tune.report` and restores from `ray.tune.get_checkpoint()`. No Train controller, no worker
  group: ~1 s instead of ~10 s of overhead per trial, for small machines.

The dataset is `ray.put` once by the driver; trials receive its ObjectRef (inside a list, so Ray
passes the reference instead of resolving it) and `ray.get` it zero-copy from the object store.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fer_tune.errors import first_line
from fer_tune.train.report import Reporter

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrialSetup:
    """Everything a trial needs besides its sampled hyperparameters (same for all trials)."""

    space: Any  # SearchSpace
    epochs: int
    seed: int
    subset: float = 1.0
    executor: str = "train"  # "train" or "direct"
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    train_storage: str = ""  # where Ray Train keeps the trials' checkpoints (train executor)
    report_interval_s: float = 0.5  # Train controller polling interval (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S)
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch is always saved)
    # Ray's own deletion of older checkpoints: None (keep all) with local storage, where
    # CheckpointCleanup deletes them once no resume can ask for them; 2 with a URI storage.
    num_to_keep: int | None = None
    # On --resume: trials our table saw finish that Tune's last snapshot (<= 1 s older) still had
    # as running. trial id -> {"metrics": last reported metrics} or {"error": text}; such a trial
    # replays its end instead of training again.
    finished: dict = field(default_factory=dict)

    def config(self, params: dict):
        return self.space.trial_config(params, epochs=self.epochs, seed=self.seed, subset=self.subset)

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_worker))


class RayReporter(Reporter):
    """The loop's reporter inside Ray: every epoch's metrics (plus a checkpoint) go to
    `ray.train.report` (api="train": every worker calls it, as Train V2 requires; rank 0 alone
    writes the checkpoint) or to `ray.tune.report` (api="tune", the direct executor)."""

    def __init__(self, api: str = "train", checkpoint_every: int = 1, extra: dict | None = None):
        if api not in ("train", "tune"):
            raise ValueError(f"api must be train or tune, got {api!r}")
        self.api = api
        self.checkpoint_every = max(1, int(checkpoint_every))
        self.extra = dict(extra or {})
        self.epochs = 0

    def start(self, info: dict) -> None:
        self.epochs = int(info["epochs"])
        self.extra["world_size"] = int(info.get("world_size", 1))

    def _rank(self) -> int:
        if self.api == "tune":
            return 0
        import ray.train

        return ray.train.get_context().get_world_rank()

    def report(self, metrics, make_checkpoint, is_best) -> None:
        from ray.train import Checkpoint

        payload = {**metrics, **self.extra}
        epoch = int(metrics["epoch"])
        wants_checkpoint = epoch % self.checkpoint_every == 0 or epoch >= self.epochs
        if wants_checkpoint and self._rank() == 0:
            with tempfile.TemporaryDirectory(prefix="fer-tune-ckpt-") as tmp:
                from fer_tune.train.checkpoint import save_checkpoint

                save_checkpoint(make_checkpoint(), Path(tmp) / CHECKPOINT_FILE)
                self.send(payload, Checkpoint.from_directory(tmp))
        else:
            self.send(payload, None)

    def send(self, payload: dict, checkpoint=None) -> None:
        if self.api == "train":
            import ray.train

            ray.train.report(payload, checkpoint=checkpoint)
        else:
            import ray.tune

            ray.tune.report(payload, checkpoint=checkpoint)


def load_resume(checkpoint) -> dict | None:
    """The loop's checkpoint dict from a Ray checkpoint, or None."""
    if checkpoint is None:
        return None
    from fer_tune.train.checkpoint import load_checkpoint

    with checkpoint.as_directory() as path:
        return load_checkpoint(Path(path) / CHECKPOINT_FILE)


def run_fit(setup: TrialSetup, params: dict, data, api: str, resume: dict | None) -> None:
    """One trial's training: the loop, reporting to Ray. A trial restored from its final
    checkpoint re-reports its last epoch (so Tune sees it finished) instead of training again."""
    import torch

    from fer_tune.train.loop import fit

    torch.set_num_threads(setup.threads)  # one OpenMP thread per allotted core: oversubscription is 10-30x slower
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    cfg = setup.config(params)
    reporter = RayReporter(api, setup.checkpoint_every, extra=_node())
    if resume and int(resume["epoch"]) >= cfg.epochs and resume.get("history"):
        reporter.start({"epochs": cfg.epochs})
        reporter.send({**resume["history"][-1], **reporter.extra}, None)
        return
    fit(cfg, data, reporter, device=_device(setup, api), resume=resume)


def train_worker(config: dict) -> None:
    """Ray Train worker function (every worker of a trial's TorchTrainer)."""
    import ray
    import ray.train

    setup: TrialSetup = config["setup"]
    data = ray.get(config["data"][0])
    resume = load_resume(ray.train.get_checkpoint())
    run_fit(setup, config["params"], data, "train", resume)


def replay_finished(setup: TrialSetup) -> bool:
    """Report the recorded end of a trial that had already finished (see TrialSetup.finished)."""
    import ray.tune

    done = setup.finished.get(ray.tune.get_context().get_trial_id())
    if not done:
        return False
    if done.get("error"):
        raise TrialFailed(done["error"])
    ray.tune.report({**done["metrics"], "replayed": True})
    return True


def torch_config(workers: int):
    """The TorchTrainer's `torch_config`: torch.distributed's process group (gloo, or nccl on GPUs)
    for data-parallel runs; none for a one-worker run, which has no peer to talk to (no gloo store
    or port to set up; `fit` skips every all-reduce, `dist.is_initialized()` being false). Start-up
    time: 2.4 s less per trial on a loaded machine, the same on a quiet one (the benchmark's
    `--overhead-only` times both; README)."""
    from ray.train.torch import TorchConfig

    return TorchConfig() if workers > 1 else _no_process_group()()


@functools.cache
def _no_process_group():
    from ray.train.backend import Backend
    from ray.train.torch import TorchConfig

    class OneWorkerTorchConfig(TorchConfig):
        """TorchConfig (its per-worker CUDA device set-up included) with Ray Train's no-op backend."""

        @property
        def backend_cls(self):
            return Backend

    return OneWorkerTorchConfig


def train_trial(params: dict, setup: TrialSetup, data_ref: list, worker=None, process_group=None) -> None:
    """Tune function trainable of the train executor: one TorchTrainer run per trial, each worker
    running `worker` (default `train_worker`; the benchmark times Ray Train's own cost with an empty
    one, and with `process_group` a TorchConfig of its choice instead of `torch_config(workers)`)."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    if replay_finished(setup):
        return
    # Read by the Train controller when it is created (propagated to it and its workers).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(setup.report_interval_s))
    trial_id = ray.tune.get_context().get_trial_id()
    resources = {"CPU": setup.cpus_per_worker}
    if setup.gpus_per_worker:
        resources["GPU"] = setup.gpus_per_worker
    trainer = TorchTrainer(
        worker or train_worker,
        train_loop_config={"setup": setup, "params": params, "data": data_ref},
        torch_config=torch_config(setup.workers) if process_group is None else process_group,
        scaling_config=ray.train.ScalingConfig(num_workers=setup.workers, use_gpu=setup.gpus_per_worker > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=trial_id,  # the same name on a restart: Train restores the trial's latest checkpoint
            storage_path=setup.train_storage,
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=setup.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=0),  # retries happen at the Tune level
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:  # TrainingFailedError: re-raise the worker's own error, readable
        raise TrialFailed(worker_error(exc)) from None


def direct_trial(params: dict, setup: TrialSetup, data_ref: list) -> None:
    """Tune function trainable of the direct executor: the trial trains in its own process."""
    import ray
    import ray.tune

    if replay_finished(setup):
        return
    data = ray.get(data_ref[0])
    resume = load_resume(ray.tune.get_checkpoint())
    run_fit(setup, params, data, "tune", resume)


class TrialFailed(RuntimeError):
    """A trial's training raised; the message is the worker's exception, type first."""


def worker_cause(exc: BaseException) -> BaseException:
    """The first worker's own exception inside a Ray Train error, else the exception's cause."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        inner = next(iter(failures.values()))
        return getattr(inner, "cause", None) or inner
    return exc.__cause__ or exc


def worker_error(exc: BaseException) -> str:
    """'TrainingDiverged: training loss became nan ...' from a Ray Train error (the first worker's
    exception), else the exception's own text."""
    cause = worker_cause(exc)
    return f"{type(cause).__name__}: {first_line(cause)}"


def _node() -> dict[str, str]:
    """The node this (worker) process trains on: Ray's node id and its IP, as `ray status` lists it.
    Not Tune's own `node_ip`, which names the trial actor's node (a train-executor trial's actor may
    sit on another node than its worker) and overwrites a reported key of that name."""
    try:
        import ray

        return {"worker_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id()}
    except Exception:
        return {"worker_ip": "", "node_id": ""}


def _device(setup: TrialSetup, api: str) -> str:
    if setup.gpus_per_worker > 0:
        if api == "train":
            import ray.train.torch

            return str(ray.train.torch.get_device())
        return "cuda"
    return "cpu"
