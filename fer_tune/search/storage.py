"""Where experiments live: a local folder, or a URI that every node of a cluster can reach
(`s3://bucket/prefix`, `gs://...`; anything pyarrow.fs opens, which is what Ray Tune uses).

With a URI storage, Ray Tune syncs the trial folders and our tables (trials.csv/parquet,
best.json) there itself; the driver keeps search.yaml and the Optuna journal in a local cache
(`$FER_TUNE_CACHE`, default ~/.cache/fer-tune/searches/<name>) and uploads them at the start
(search.yaml) and at the end.
`fetch` brings an experiment's small files back from the URI, for `fer-tune trials`, retrain and
`--resume` on any machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from fer_tune.errors import UserError, first_line

# The files of an experiment that are not per trial (what `fetch` copies back).
EXPERIMENT_FILES = ("search.yaml", "trials.csv", "trials.parquet", "best.json", "optuna.journal")


def is_uri(storage: str | Path) -> bool:
    text = str(storage)
    return "://" in text and not text.startswith("file://")


def normalize(storage: str | Path) -> str:
    """A URI without its trailing slash, or an absolute local path (`file://` stripped)."""
    text = str(storage)
    if is_uri(text):
        return text.rstrip("/")
    return str(Path(text.removeprefix("file://")).expanduser().resolve())


def experiment_folder(storage: str, name: str) -> Path | None:
    """The local experiment folder, or None for a URI storage."""
    if is_uri(storage):
        return None
    return Path(normalize(storage)) / name


def check_can_create(folder: Path, storage: str) -> None:
    """One line, before Ray starts, when a local experiment folder cannot be made: a file on its
    path (`--storage /etc/hostname`) or a folder this user may not write."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--storage {storage}: {existing} is a file, not a folder; pass a folder for the experiments")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--storage {storage}: cannot write in {existing}; pass a folder you can write to")


def make_folder(folder: Path, storage: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # what check_can_create cannot see, e.g. /proc/nope as root
        raise UserError(f"--storage {storage}: cannot create {folder} ({exc.strerror}); "
                        "pass a folder you can write to") from None


def remote_experiment(target: str | None, storage: str | Path) -> str | None:
    """The URI of an experiment in cloud storage (a URI itself, or a name under a URI --storage),
    None for a local one."""
    if target and is_uri(target):
        return target.rstrip("/")
    if is_uri(storage):
        if not target:
            raise UserError(f"--storage {storage}: name the experiment (NAME --storage {storage})")
        return f"{str(storage).rstrip('/')}/{target}"
    return None


def local_cache(name: str) -> Path:
    """The local copy of a URI experiment that `trials`, `retrain` and `transfer` read (`fetch` mirrors
    the URI into it) and that `retrain` writes final/ into."""
    return _cache_root() / "experiments" / name


def driver_cache(name: str) -> Path:
    """Where a search's driver keeps a URI experiment's record and Optuna journal while it runs: apart
    from local_cache, so that a `fer-tune trials s3://...` on the same machine cannot prune them."""
    return _cache_root() / "searches" / name


def _cache_root() -> Path:
    return Path(os.environ.get("FER_TUNE_CACHE", Path.home() / ".cache" / "fer-tune"))


def upload(local: Path, uri: str, items=("search.yaml", "optuna.journal")) -> None:
    import pyarrow.fs

    fs, path = _filesystem(uri)
    for item in items:
        if (local / item).is_file():
            pyarrow.fs.copy_files(str(local / item), f"{path}/{item}", destination_filesystem=fs)


def fetch(uri: str, dest: Path | None = None) -> Path:
    """Copy an experiment's EXPERIMENT_FILES from `uri` into `dest` (default: the local cache);
    files the URI does not have are removed from `dest`, so it mirrors the URI."""
    import pyarrow.fs

    uri = uri.rstrip("/")
    dest = dest or local_cache(uri.rsplit("/", 1)[-1])
    fs, path = _filesystem(uri)
    try:
        infos = fs.get_file_info([f"{path}/{item}" for item in EXPERIMENT_FILES])
    except OSError as exc:
        raise UserError(f"{uri}: cannot read it ({first_line(exc)}); check the URI and your cloud credentials") \
            from None
    found = {Path(i.path).name: i for i in infos if i.type == pyarrow.fs.FileType.File}
    if "search.yaml" not in found and "trials.csv" not in found:
        raise UserError(f"{uri}: no search experiment there (no search.yaml or trials.csv)")
    dest.mkdir(parents=True, exist_ok=True)
    for item in EXPERIMENT_FILES:
        target = dest / item
        if item in found:
            tmp = dest / f".{item}.part"
            pyarrow.fs.copy_files(found[item].path, str(tmp), source_filesystem=fs)
            os.replace(tmp, target)
        elif target.exists():
            target.unlink()
    return dest


def _filesystem(uri: str):
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as exc:
        raise UserError(f"--storage {uri}: not a storage URI pyarrow can open ({first_line(exc)}); use "
                        "s3://bucket/prefix, gs://bucket/prefix or a local folder") from None
