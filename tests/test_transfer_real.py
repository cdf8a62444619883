"""Retrain and transfer on the real FER-2013 and RAF-DB (tiny model, small subset; skips when
../shared/datasets is absent). Figures from shared/datasets/SOURCES.md."""

import pytest
from test_retrain import QUIET, make_experiment

from fer_tune.evaluate import retrain, transfer

pytestmark = pytest.mark.realdata


def test_real_retrain_then_transfer(real_fer, real_rafdb, real_data_root, tmp_path):
    exp = make_experiment(tmp_path, real_fer)
    m = retrain(exp, data_root=real_data_root, epochs=1, subset=0.05, **QUIET)
    # FER-2013 PrivateTest: 3589 images; of the 568 val+test images with a pixel-identical copy in
    # train, those in PrivateTest are left out of the no_train_copy scores.
    copies = real_fer.meta["duplicates"]["copies_in_train"]
    assert copies["val"] + copies["test"] == 568
    assert m["dataset"]["test_with_train_copy"] == copies["test"] > 0
    assert m["final"]["test"]["all"]["images"] == 3589
    assert m["final"]["test"]["no_train_copy"]["images"] == 3589 - copies["test"]
    assert m["final"]["test"]["all"]["accuracy"]["mean"] > 0.2  # above always-"happy" on test is 0.247; loose

    t = transfer(exp, to="rafdb", strategy="linear-probe", epochs=1, data_root=real_data_root, **QUIET)
    zero, probe = t["comparison"]
    assert (zero["strategy"], probe["strategy"]) == ("zero-shot", "linear-probe")
    assert sum(t["test"]["zero-shot"]["target"]["all"]["per_class"][c]["support"] for c in
               t["test"]["zero-shot"]["target"]["all"]["per_class"]) == 3068  # RAF-DB basic test
    assert zero["source_acc"] == pytest.approx(m["models"][0]["test"]["all"]["accuracy"])
    assert (exp / "transfer" / "report.md").is_file()
