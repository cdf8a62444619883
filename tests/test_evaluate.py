"""`fer-tune evaluate`: a checkpoint on a prepared dataset, on raw image folders, on a subset of classes."""

import json
import zipfile

import numpy as np
import pytest
import torch
from conftest import toy_arrays
from PIL import Image
from test_retrain import cli

from fer_tune.data import CLASSES
from fer_tune.errors import UserError
from fer_tune.evaluate import evaluate_checkpoint
from fer_tune.evaluate.evaluate import evaluation_text, write_evaluation
from fer_tune.train import RunFolderReporter, TrainConfig, TrainData, fit, load_checkpoint, model_from_checkpoint
from fer_tune.train.runtime import predict_logits


@pytest.fixture(scope="module")
def model_path(toy_prepared, tmp_path_factory):
    from fer_tune import data

    run = tmp_path_factory.mktemp("eval_model")
    cfg = TrainConfig(model="mlp", model_kwargs={"hidden": [64]}, epochs=2, batch_size=64, lr=3e-3,
                      channels_last=False, aug_strength=0.0, schedule="constant")
    fit(cfg, TrainData.from_prepared(data.load("fer2013", toy_prepared)),
        RunFolderReporter(run, progress=False, tensorboard=False))
    return run / "best.pt"


def reference_probs(model_path, x):
    """The model's softmax on uint8 images, computed directly."""
    state = load_checkpoint(model_path)
    model, _ = model_from_checkpoint(state)
    logits = predict_logits(model, torch.as_tensor(x), mean=state["norm"][0], std=state["norm"][1], precision="fp32",
                            channels_last=False)
    return torch.softmax(logits, 1).numpy()


def write_folder(root, arrays, names, split=None):
    """PNG files <root>/[<split>/]<class name>/<i>.png from uint8 (N,1,48,48) images."""
    x, y = arrays
    for i, (img, label) in enumerate(zip(x, y)):
        folder = root / (split or "") / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0]).save(folder / f"{i:04d}.png")
    return root


def test_prepared_dataset_by_name(model_path, toy_prepared):
    from fer_tune import data

    m = evaluate_checkpoint(model_path, "fer2013", data_root=toy_prepared, log=lambda *a: None)
    x, y = data.load("fer2013", toy_prepared).arrays("test")
    pred = reference_probs(model_path, x).argmax(1)
    assert m["images"] == len(y) == 140 and m["classes"] == list(CLASSES) and m["notes"] == []
    assert m["all"]["accuracy"] == pytest.approx(np.mean(pred == y))
    cm = np.array(m["all"]["confusion_matrix"])
    assert cm.sum() == 140 and np.trace(cm) == np.sum(pred == y)
    assert m["no_train_copy"]["n"] == 140 - m["no_train_copy"]["dropped_copies"]
    text = evaluation_text(m)
    assert f"accuracy {m['all']['accuracy']:.4f}" in text and "neutral" in text
    # on train, "no copy in train" means nothing: only the full split is scored
    m = evaluate_checkpoint(model_path, "fer2013", split="train", data_root=toy_prepared, log=lambda *a: None)
    assert m["images"] == len(data.load("fer2013", toy_prepared).arrays("train")[1]) and "no_train_copy" not in m
    assert "no copy in train" not in evaluation_text(m)


def test_raw_folder_with_a_missing_and_an_extra_class(model_path, tmp_path):
    x, y = toy_arrays(120, 5)
    names = ["anger", "disgust", "fear", "happiness", "sadness", "surprise", "contempt"]  # 6: contempt, no neutral
    root = write_folder(tmp_path / "faces", (x, y), names)
    m = evaluate_checkpoint(model_path, root, log=lambda *a: None)

    contempt = int(np.sum(y == 6))
    assert contempt > 0
    assert m["images"] == 120 - contempt
    assert m["classes"] == ["angry", "disgust", "fear", "happy", "sad", "surprise"]
    assert any(f"dropped {contempt} image{'s' * (contempt != 1)} of contempt" in n for n in m["notes"])
    assert any("no images of neutral" in n and "6 shared classes" in n for n in m["notes"])
    assert "no_train_copy" not in m
    # Predictions restricted to the shared classes: the argmax over the first six model classes.
    keep = y != 6
    probs = reference_probs(model_path, x[keep])
    assert m["all"]["accuracy"] == pytest.approx(np.mean(probs[:, :6].argmax(1) == y[keep]))
    assert m["accuracy_unrestricted"] == pytest.approx(np.mean(probs.argmax(1) == y[keep]))
    report = (write_evaluation(tmp_path / "ev", m) / "report.md").read_text()
    assert f"every model class (not only the shared ones): {m['accuracy_unrestricted']:.4f}" in report
    assert np.array(m["all"]["confusion_matrix"]).shape == (6, 6)
    with pytest.raises(UserError, match=r"--split val: .* has no split folders \(<class>/<image>\), so all of its "):
        evaluate_checkpoint(model_path, root, split="val", log=lambda *a: None)  # was scored whole, silently
    # The same tree one level down in a zip: the same images scored.
    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for file in sorted(root.rglob("*.png")):
            z.write(file, f"faces/{file.relative_to(root)}")
    zipped = evaluate_checkpoint(model_path, archive, log=lambda *a: None)
    assert zipped["images"] == m["images"] and zipped["all"] == m["all"]


def test_raw_folder_with_split_folders_and_errors(model_path, tmp_path):
    x, y = toy_arrays(40, 6)
    names = list(CLASSES)
    root = write_folder(tmp_path / "tree", (x, y), names, split="test")
    write_folder(root, toy_arrays(10, 7), names, split="train")
    m = evaluate_checkpoint(model_path, root, split="test", log=lambda *a: None)
    assert m["images"] == 40
    assert m["all"]["accuracy"] == pytest.approx(np.mean(reference_probs(model_path, x).argmax(1) == y))
    with pytest.raises(UserError, match=r"no 'val' split folder \(found test, train\)"):
        evaluate_checkpoint(model_path, root, split="val", log=lambda *a: None)

    bad = write_folder(tmp_path / "bad", toy_arrays(10, 8), ["angry", "disgust", "fear", "happy", "sad", "surprise",
                                                           "smirk"])
    (bad / "blah").mkdir()
    Image.fromarray(x[0, 0]).save(bad / "blah" / "a.png")
    with pytest.raises(UserError, match=r"unknown class folders 'blah', 'smirk'; rename them to one of: angry/"):
        evaluate_checkpoint(model_path, bad, log=lambda *a: None)
    (tmp_path / "flat").mkdir()
    Image.fromarray(x[0, 0]).save(tmp_path / "flat" / "a.png")
    with pytest.raises(UserError, match=r"flat: no image folders found; expected <split>/<class>/<image> with "):
        evaluate_checkpoint(model_path, tmp_path / "flat", log=lambda *a: None)
    with pytest.raises(UserError, match="no prepared dataset 'nowhere'"):
        evaluate_checkpoint(model_path, "nowhere", data_root=tmp_path, log=lambda *a: None)


def test_image_size_must_match_the_model(model_path, tmp_path):
    from fer_tune import data
    from conftest import write_fer_csv

    csv = write_fer_csv(tmp_path / "f.csv", {u: toy_arrays(30, i) for i, u in enumerate(
        ("Training", "PublicTest", "PrivateTest"))})
    data.prepare("fer2013", csv, name="small", size=24, data_root=tmp_path / "data", log=lambda *a: None)
    with pytest.raises(UserError, match=r"images are 1x24x24 but the model .* takes 1x48x48; .*--size 48"):
        evaluate_checkpoint(model_path, "small", data_root=tmp_path / "data", log=lambda *a: None)


def test_report_files_and_cli(model_path, toy_prepared, tmp_path, capsys):
    out = tmp_path / "eval"
    code, err = cli(["evaluate", str(model_path), "--data", "fer2013", "--data-root", str(toy_prepared),
                     "--json", "--out", str(out)])
    assert code == 0, err
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((out / "metrics.json").read_text()) == printed
    assert {p.name for p in out.iterdir()} == {"metrics.json", "report.md", "confusion_matrix.png", "per_class_f1.png"}
    assert "![confusion matrix](confusion_matrix.png)" in (out / "report.md").read_text()
    assert printed["tta"] == "none"
    for flags, tta in ((["--tta"], "horizontal flip"), (["--tta-crops"], "horizontal flip x (the image")):
        code, err = cli(["evaluate", str(model_path), "--data", "fer2013", "--data-root", str(toy_prepared),
                         "--json", *flags])
        assert code == 0 and json.loads(capsys.readouterr().out)["tta"].startswith(tta)
    for flags, said in (([], "classes):"), (["--tta"], "classes, flip TTA):"), (["--tta-crops"], "classes, crops TTA):")):
        code, err = cli(["evaluate", str(model_path), "--data", "fer2013", "--data-root", str(toy_prepared), *flags])
        assert code == 0 and capsys.readouterr().out.splitlines()[0].endswith(said)
    code, err = cli(["evaluate", str(tmp_path / "missing.pt"), "--data", "fer2013"])
    assert code == 2 and err.endswith("missing.pt: checkpoint not found")


def test_write_evaluation_is_atomic(tmp_path, monkeypatch):
    from fer_tune.evaluate import report

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "plot_per_class_f1", broken)
    m = {"model": "m.pt", "data": "d", "tta": "none", "classes": ["a", "b"], "notes": [],
         "all": {"n": 2, "accuracy": 0.5, "macro_f1": 0.5, "confusion_matrix": [[1, 0], [1, 0]],
                 "per_class": {"a": {"precision": .5, "recall": 1., "f1": .67, "support": 1},
                               "b": {"precision": 0., "recall": 0., "f1": 0., "support": 1}}}}
    with pytest.raises(RuntimeError, match="disk full"):
        write_evaluation(tmp_path / "out", m)
    assert list(tmp_path.iterdir()) == []


def test_flip_tta_averages_the_logits_of_each_image_and_its_mirror_in_one_pass(model_path, toy_prepared):
    """One pass gives both figures of a --tta evaluation: the plain softmax, and the softmax of the
    logits averaged over each image and its horizontal mirror (computed here by hand)."""
    from fer_tune import data
    from fer_tune.evaluate.evaluate import probs_of_checkpoint, probs_of_checkpoint_with_and_without_tta

    x = data.load("fer2013", toy_prepared).arrays("test")[0][:50]
    state = load_checkpoint(model_path)
    model, _ = model_from_checkpoint(state)
    mean, std = state["norm"]
    logits = predict_logits(model, torch.as_tensor(x), mean=mean, std=std, channels_last=False)
    mirrored = predict_logits(model, torch.as_tensor(x).flip(3), mean=mean, std=std, channels_last=False)

    plain, flip = probs_of_checkpoint_with_and_without_tta(state, x, tta=True, batch_size=16)
    np.testing.assert_allclose(plain, torch.softmax(logits, 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(flip, torch.softmax((logits + mirrored) / 2, 1).numpy(), atol=1e-5)
    assert not np.allclose(plain, flip, atol=1e-3)  # the mirror changes the answer: the flip is really applied
    np.testing.assert_allclose(probs_of_checkpoint(state, x, tta=True, batch_size=16), flip, atol=1e-6)
    np.testing.assert_allclose(probs_of_checkpoint(state, x, batch_size=16), plain, atol=1e-6)
    assert probs_of_checkpoint_with_and_without_tta(state, x, tta=False)[1] is None


def test_crops_tta_averages_the_shifted_and_zoomed_views_and_their_mirrors():
    """--tta-crops: 14 views (the image, 1-pixel shifts in four directions, zoom in and out, each
    with its mirror); a 1-pixel shift is the image moved by one pixel with its edge repeated."""
    import torch.nn.functional as F

    from fer_tune.train.runtime import predict_views, tta_description, tta_views

    x = torch.rand(3, 1, 12, 12)
    views = tta_views(x, "crops")
    assert len(views) == 14 and torch.equal(views[0], x) and torch.equal(views[7], x.flip(3))
    edge = F.pad(x, (1, 1, 1, 1), mode="replicate")
    shifted = [edge[..., 1:-1, 2:], edge[..., 1:-1, :-2], edge[..., 2:, 1:-1], edge[..., :-2, 1:-1]]
    for view, want in zip(views[1:5], shifted):
        torch.testing.assert_close(view, want, atol=1e-5, rtol=0)
    zoom_in, zoom_out = views[5], views[6]
    assert zoom_in.shape == zoom_out.shape == x.shape and not torch.allclose(zoom_in, x)
    assert not torch.allclose(zoom_out, x) and zoom_in[..., 0, 0].ne(x[..., 0, 0]).all()  # corners move in
    for i in range(7):
        assert torch.equal(views[7 + i], views[i].flip(3))
    assert len(tta_views(x, "flip")) == 2 and len(tta_views(x, None)) == 1
    assert tta_description("crops").endswith("14 views") and tta_description(True) == "horizontal flip"

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 7))
    images = (torch.rand(5, 1, 12, 12) * 255).to(torch.uint8)
    plain, mean = predict_views(model, images, mean=0.5, std=0.25, channels_last=False, tta="crops")
    inputs = (images.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        by_hand = torch.stack([model(v) for v in tta_views(inputs, "crops")]).mean(0)
        torch.testing.assert_close(plain, model(inputs))
    torch.testing.assert_close(mean, by_hand)
    with pytest.raises(ValueError, match="tta must be one of none, flip, crops"):
        tta_views(x, "ten-crop")
