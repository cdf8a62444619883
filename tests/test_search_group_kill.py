"""SIGTERM to the whole process group of a search that started its own Ray instance (what Slurm,
systemd and `kill -- -PGID` do): Ray's daemons end with the driver. The command must still leave its
tables and a resume hint, promptly, and `--resume` must finish the search. And a SIGTERM after Ray
has shut down still reaches the command's handler.

Its own module: the search starts a local Ray instance, which the other Ray modules' shared
instance would refuse.
"""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from fer_tune.search import cluster

pytestmark = pytest.mark.slow


def search_args(toy_prepared, storage, name):
    return [sys.executable, "-m", "fer_tune.cli", "search", "--space", "smoke", "--data-root", str(toy_prepared),
            "--subset", "0.5", "-n", "12", "--max-epochs", "3", "--executor", "direct", "--quiet",
            "--storage", str(storage), "--name", name, "--num-cpus", "2"]


def group_sigterm(args, table_path):
    """Start the search in its own process group (as under a job scheduler), SIGTERM the group once
    the table shows an epoch; (exit code, output, seconds from the signal to the exit)."""
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    # The table shows epochs from the first finished trial on: 12 trials leave the rest of the search
    # (about 20 s here) for the signal to land in; with 6 it sometimes came after the search had ended.
    while not (table_path.is_file() and (pd.read_csv(table_path)["epochs"] > 0).any()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.3)
    assert cluster.ray_processes()  # the search's own instance
    os.killpg(proc.pid, signal.SIGTERM)
    t0 = time.monotonic()
    out, _ = proc.communicate(timeout=90)
    return proc.returncode, out, time.monotonic() - t0


def test_a_group_sigterm_leaves_tables_and_a_resume_hint(toy_prepared, tmp_path):
    # Ray's client can end the driver itself (exit 1, no word) when it sees its raylet die before the
    # watcher does (polling /proc every 50 ms); that race is Ray's, so it gets a second try. Each
    # outcome leaves the table of the last refresh, and the second search is resumed below.
    for name in ("group-1", "group"):
        code, out, waited = group_sigterm(search_args(toy_prepared, tmp_path, name), tmp_path / name / "trials.csv")
        assert not cluster.other_ray_instance()  # the daemons are gone (waits for them to settle)
        if code == 130:
            break
        assert code == 1 and name == "group-1" and "Traceback" not in out, (code, out)
    assert waited < 30, waited  # not Ray's 60 s wait for its dead GCS
    assert out.strip().splitlines()[-1].endswith(f"continue with `fer-tune search --resume --name {name} "
                                                 f"--storage {tmp_path}`"), out
    table = pd.read_csv(tmp_path / name / "trials.csv")
    assert len(table) >= 1 and (table["epochs"] > 0).any()
    record = yaml.safe_load((tmp_path / name / "search.yaml").read_text())
    assert record["status"] == "interrupted" and "driver" not in record

    args = search_args(toy_prepared, tmp_path, name)
    resumed = subprocess.run(args + ["--resume"], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout
    after = pd.read_csv(tmp_path / name / "trials.csv")
    assert len(after) == 12 and set(after["status"]) <= {"completed", "stopped early"}


def test_sigterm_after_ray_shutdown_still_reaches_the_command_handler(tmp_path):
    """ray.shutdown resets SIGTERM to the default action below Python (retrain goes on to evaluate and
    write its report after its Ray runs); the command's handler must still be the one that runs."""
    script = tmp_path / "after_shutdown.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from fer_tune.search import cluster\n"
        "def handler(signum, frame):\n"
        "    print('handled', flush=True)\n"
        "    sys.exit(7)\n"
        "signal.signal(signal.SIGTERM, handler)\n"
        "cluster.shutdown(cluster.connect(None, num_cpus=1, quiet=True))\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(10)\n")
    done = subprocess.run([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=120)
    assert done.returncode == 7 and "handled" in done.stdout, (done.returncode, done.stdout)
