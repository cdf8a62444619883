"""A complete copy of Tune's last experiment snapshot, so that `--resume` after a SIGKILL of the
driver always finds one.

Tune (Ray 2.60) saves its snapshot (experiment state JSON, searcher and search-generator state,
callback states) into a staging folder of the Ray session, all in the controller's thread, and a
background thread then copies that folder into the experiment folder file by file, writing each
file in place. A driver killed during that copy leaves a truncated file (CI saw both: "Failed to
restore the run state" from a JSONDecodeError, and from an EOFError in a pickle, after which Tune
silently restarted the experiment) or files of two different snapshots, which load but disagree
(the search generator then counts more trials than the state holds and the resumed search ends a
trial short). So right after each save, while the staging folder holds one whole snapshot, we
copy it into `<experiment>/.tune-snapshot/` and swap that folder in with renames; `restore` puts
it back over Tune's files before `Tuner.restore` reads them. The copy is never older than Tune's
own files in the experiment folder (it is taken before Tune's copy starts).

Local experiment folders only: with cloud storage Tune uploads whole files, and the Ray Client
runs the controller on the head node.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
from pathlib import Path

SNAPSHOT = ".tune-snapshot"
# The files of one snapshot (the CKPT_FILE_TMPL of TuneController, Searcher, SearchGenerator,
# BasicVariantGenerator and CallbackList), one of each per driver session
TUNE_FILES = ("experiment_state-*.json", "searcher-state-*.pkl", "search_gen_state-*.json",
              "basic-variant-state-*.json", "callback-states-*.pkl")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and any(fnmatch.fnmatchcase(p.name, pattern) for pattern in TUNE_FILES))


def save(staging: str | Path, folder: str | Path) -> None:
    """Copy the snapshot in `staging` to `folder/.tune-snapshot`, replacing the last one only once
    the new copy is complete (a kill at any point leaves one complete copy)."""
    folder = Path(folder)
    current, tmp, old = folder / SNAPSHOT, folder / f"{SNAPSHOT}.tmp", folder / f"{SNAPSHOT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in _files(Path(staging)):
        shutil.copyfile(path, tmp / path.name)
    if current.is_dir():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(current, old)
    os.rename(tmp, current)
    shutil.rmtree(old, ignore_errors=True)


def restore(folder: str | Path) -> bool:
    """Put the last complete snapshot back over Tune's files in `folder`; False when there is none
    (the search was killed before its first snapshot)."""
    folder = Path(folder)
    source = next((p for p in (folder / SNAPSHOT, folder / f"{SNAPSHOT}.old") if p.is_dir()), None)
    if source is None:
        return False
    for path in _files(source):
        tmp = folder / f".{path.name}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, folder / path.name)
    return True


def cut_short(folder: str | Path) -> list[str]:
    """Tune's files in `folder` that cannot be whole: an experiment state that is not JSON, or one of
    the other files (pickles, whatever their suffix) that does not end with pickle's STOP opcode.
    Tune would log the error and quietly start the search over."""
    broken = []
    for path in _files(Path(folder)):
        data = path.read_bytes()
        if fnmatch.fnmatchcase(path.name, TUNE_FILES[0]):
            try:
                json.loads(data)
            except ValueError:
                broken.append(path.name)
        elif not data.endswith(b"."):
            broken.append(path.name)
    return broken


@contextlib.contextmanager
def kept(folder: str | Path):
    """While in this block, every experiment snapshot Tune saves in this process is also saved to
    `folder/.tune-snapshot` (see the module's docstring)."""
    from ray.tune.execution.tune_controller import TuneController

    original = TuneController.save_to_dir

    def save_to_dir(controller):
        original(controller)
        save(controller._storage.experiment_driver_staging_path, folder)

    TuneController.save_to_dir = save_to_dir
    try:
        yield
    finally:
        TuneController.save_to_dir = original
