"""The complete copy of Tune's experiment snapshot that `--resume` falls back on (no Ray here;
tests/test_search_ray.py resumes a real search from it after a SIGKILL)."""

import os

import pytest

from fer_tune.errors import UserError
from fer_tune.search import snapshot
from fer_tune.search.tuner import run_search

SESSION = "2026-12-05_16-00-00"
NAMES = [f"experiment_state-{SESSION}.json", f"searcher-state-{SESSION}.pkl", f"search_gen_state-{SESSION}.json",
         f"callback-states-{SESSION}.pkl"]


def write_snapshot(folder, generation: int):
    folder.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        (folder / name).write_text(f"{name} {generation}")


def contents(folder):
    return {name: (folder / name).read_text() for name in NAMES}


def test_restore_puts_the_whole_last_snapshot_back_over_cut_short_and_mixed_files(tmp_path):
    staging, exp = tmp_path / "staging", tmp_path / "exp"
    write_snapshot(staging, 1)
    (staging / "trial_dir").mkdir()  # trial folders and other files are not part of the snapshot
    (staging / "best.json").write_text("not Tune's")
    exp.mkdir()
    snapshot.save(staging, exp)
    write_snapshot(staging, 2)
    snapshot.save(staging, exp)
    # Tune's own copy into the experiment folder was killed half way: one file new, one cut short,
    # the rest old
    write_snapshot(exp, 1)
    (exp / NAMES[0]).write_text(f"{NAMES[0]} 2")
    (exp / NAMES[1]).write_text("")
    (exp / "best.json").write_text("ours")

    assert snapshot.restore(exp)
    assert contents(exp) == contents(staging)  # all of generation 2
    assert (exp / "best.json").read_text() == "ours"
    assert sorted(p.name for p in (exp / snapshot.SNAPSHOT).iterdir()) == sorted(NAMES)
    assert not [p for p in exp.iterdir() if p.name.endswith(".tmp")]


def test_a_save_killed_half_way_leaves_the_previous_snapshot(tmp_path):
    staging, exp = tmp_path / "staging", tmp_path / "exp"
    write_snapshot(staging, 1)
    exp.mkdir()
    snapshot.save(staging, exp)
    # killed after moving the last copy aside, before the new one took its place
    os.rename(exp / snapshot.SNAPSHOT, exp / f"{snapshot.SNAPSHOT}.old")
    (exp / f"{snapshot.SNAPSHOT}.tmp").mkdir()
    (exp / f"{snapshot.SNAPSHOT}.tmp" / NAMES[0]).write_text("cut")
    assert snapshot.restore(exp)
    assert contents(exp) == {name: f"{name} 1" for name in NAMES}

    write_snapshot(staging, 2)
    snapshot.save(staging, exp)  # the next save cleans up after the killed one
    assert sorted(p.name for p in exp.iterdir() if p.is_dir()) == [snapshot.SNAPSHOT]


def test_no_snapshot_yet_restores_nothing(tmp_path):
    (tmp_path / NAMES[0]).write_text("")
    assert not snapshot.restore(tmp_path)
    assert (tmp_path / NAMES[0]).read_text() == ""


def test_cut_short_names_the_files_tune_could_not_read(tmp_path):
    import json
    import pickle

    state, searcher, generator = tmp_path / NAMES[0], tmp_path / NAMES[1], tmp_path / NAMES[2]
    state.write_text(json.dumps({"trial_data": [1, 2]}))
    searcher.write_bytes(pickle.dumps({"trials": list(range(100))}))
    generator.write_bytes(pickle.dumps({"counter": 3}))  # a pickle, despite its .json name
    (tmp_path / "trials.csv").write_text("")  # not Tune's
    assert snapshot.cut_short(tmp_path) == []
    searcher.write_bytes(searcher.read_bytes()[:-5])
    state.write_text(state.read_text()[:-3])
    assert snapshot.cut_short(tmp_path) == sorted([state.name, searcher.name])


def test_resume_without_tunes_state_is_refused_before_the_record_says_running(tmp_path):
    """Killed before Tune's first snapshot: --resume says so and leaves search.yaml as it was (it does
    not claim a running driver that then ended)."""
    exp = tmp_path / "results" / "early"
    exp.mkdir(parents=True)
    record = "name: early\nstatus: interrupted\n"
    (exp / "search.yaml").write_text(record)
    with pytest.raises(UserError, match=r"^--resume: .*early has no Ray Tune experiment state to resume"):
        run_search(None, "fer2013", storage=tmp_path / "results", name="early", resume=True, progress=False)
    assert (exp / "search.yaml").read_text() == record
