"""`fer-tune predict`: face crops (--no-detect), detection with a stand-in detector, and the error cases."""

import json

import numpy as np
import pytest
import torch
from conftest import toy_arrays
from PIL import Image
from test_retrain import cli

from fer_tune.data import CLASSES
from fer_tune.errors import UserError
from fer_tune.evaluate import predict_images
from fer_tune.evaluate.predict import FaceDetector, crop_box
from fer_tune.train import TrainConfig, TrainData, fit, load_checkpoint, model_from_checkpoint, save_checkpoint
from fer_tune.train.runtime import predict_logits


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    tx, ty = toy_arrays(480, 0)
    vx, vy = toy_arrays(140, 1)
    cfg = TrainConfig(model="mlp", model_kwargs={"hidden": [64]}, epochs=2, batch_size=64, lr=3e-3,
                      channels_last=False, aug_strength=0.0, schedule="constant")
    result = fit(cfg, TrainData(tx, ty, vx, vy, CLASSES))
    path = tmp_path_factory.mktemp("predict") / "best.pt"
    save_checkpoint({"model": result.best_state, "config": result.config.to_dict(), "classes": list(CLASSES),
                     "in_chans": 1, "img_size": 48, "norm": list(result.norm)}, path)
    return path


def probs_of(model_path, x):
    state = load_checkpoint(model_path)
    model, _ = model_from_checkpoint(state)
    logits = predict_logits(model, torch.as_tensor(x), mean=state["norm"][0], std=state["norm"][1], precision="fp32",
                            channels_last=False)
    return torch.softmax(logits, 1).numpy()


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """Four 48x48 face crops as PNG files, and their pixels."""
    x, y = toy_arrays(4, 3)
    folder = tmp_path_factory.mktemp("crops")
    paths = []
    for i, img in enumerate(x):
        paths.append(folder / f"face{i}.png")
        Image.fromarray(img[0]).save(paths[-1])
    return paths, x


def test_no_detect_converts_like_training(model_path, crops):
    paths, x = crops
    results = predict_images(model_path, paths, detect=False, top=3)
    expected = probs_of(model_path, x)
    for r, p in zip(results, expected):
        assert r.ok and r.faces_found is None and r.face is None
        assert [t["class"] for t in r.top] == [CLASSES[k] for k in np.argsort(-p)[:3]]
        assert [t["probability"] for t in r.top] == pytest.approx(np.sort(p)[::-1][:3], abs=1e-4)


def test_bad_files_are_reported_and_the_rest_processed(model_path, crops, tmp_path, capsys):
    paths, _ = crops
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    missing = tmp_path / "gone.png"
    results = predict_images(model_path, [junk, paths[0], missing], detect=False, top=2)
    assert [r.ok for r in results] == [False, True, False]
    assert results[0].error.startswith("cannot decode the image")
    assert results[2].error.startswith("cannot read the file")
    assert len(results[1].top) == 2

    code, err = cli(["predict", str(model_path), str(junk), str(paths[1]), "--no-detect", "--json", "--top", "7"])
    assert code == 2 and err.startswith("predict: 1 of 2 image(s) failed: ") and "junk.jpg" in err
    payload = json.loads(capsys.readouterr().out)
    assert [p["ok"] for p in payload] == [False, True]
    assert sorted(t["class"] for t in payload[1]["top"]) == sorted(CLASSES)
    assert sum(t["probability"] for t in payload[1]["top"]) == pytest.approx(1.0, abs=1e-3)

    code, err = cli(["predict", str(model_path), str(paths[2]), "--no-detect"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{paths[2]}: ") and "TTA" not in out
    code, err = cli(["predict", str(model_path), str(paths[2]), "--no-detect", "--tta"])
    assert code == 0 and capsys.readouterr().out.rstrip().endswith("(flip TTA)")
    code, err = cli(["predict", str(model_path), str(paths[2]), str(junk), "--no-detect", "--tta-crops", "--json"])
    assert code == 2 and [p["tta"] for p in json.loads(capsys.readouterr().out)] == ["crops", None]  # none scored


def has_cascade() -> bool:
    import cv2

    return hasattr(cv2, "CascadeClassifier")


@pytest.mark.skipif(not has_cascade(), reason="this OpenCV (5.x) ships no Haar cascade; needs opencv-python-headless<5")
def test_no_face_on_a_blank_image_with_the_real_cascade(model_path, tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((200, 240), 128, np.uint8)).save(blank)
    detector = FaceDetector()
    assert not detector.classifier.empty()  # OpenCV's bundled cascade is found and loads
    (r,) = predict_images(model_path, [blank], detector=detector)
    assert not r.ok and r.error.startswith("no face found") and "--no-detect" in r.error


@pytest.mark.skipif(not has_cascade(), reason="this OpenCV (5.x) ships no Haar cascade; needs opencv-python-headless<5")
def test_the_real_cascade_finds_faces_in_a_photo(model_path, tmp_path):
    """matplotlib ships a portrait (Grace Hopper, 512x600): one face; pasted twice, once at half size,
    the larger is used."""
    from matplotlib import cbook

    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    group = Image.new("RGB", (900, 600), (90, 90, 90))
    group.paste(photo, (0, 0))
    group.paste(photo.resize((256, 300)), (600, 150))
    group.save(tmp_path / "group.jpg")
    photo.save(tmp_path / "portrait.jpg")
    single, pair = predict_images(model_path, [tmp_path / "portrait.jpg", tmp_path / "group.jpg"])
    assert single.ok and single.faces_found == 1 and single.note == ""
    assert 100 < single.face["x"] < 200 and 60 < single.face["y"] < 150 and 180 < single.face["w"] < 290
    assert pair.ok and pair.faces_found == 2 and pair.face["x"] < 300 and pair.face["w"] > 180


def test_an_unusable_cascade_is_a_clear_error(model_path, crops, tmp_path):
    with pytest.raises(UserError, match="--no-detect"):
        FaceDetector(str(tmp_path / "no-such-cascade.xml"))
    if not has_cascade():  # OpenCV 5: detection is refused up front, with the fix
        with pytest.raises(UserError, match=r"opencv-python-headless>=4.8,<5.*--no-detect"):
            predict_images(model_path, crops[0][:1])


def test_several_faces_use_the_largest_with_its_margin(model_path, tmp_path, crops):
    _, x = crops
    # A 300x240 photo: face 0 at 96x96 (large, scaled 2x) and face 1 at 48x48 (small).
    photo = np.full((240, 300), 30, np.uint8)
    photo[20:116, 150:246] = np.kron(x[0, 0], np.ones((2, 2), np.uint8))
    photo[150:198, 20:68] = x[1, 0]
    path = tmp_path / "group.png"
    Image.fromarray(photo).save(path)
    boxes = [(20, 150, 48, 48), (150, 20, 96, 96)]  # (x, y, w, h) as OpenCV gives them
    (r,) = predict_images(model_path, [path], detector=lambda gray: boxes, margin=0.0, top=7)
    assert r.ok and r.faces_found == 2 and "2 faces found, used the largest" in r.note
    assert r.face == {"x": 150, "y": 20, "w": 96, "h": 96}
    got = {t["class"]: t["probability"] for t in r.top}
    expected = probs_of(model_path, x[:1])[0]  # the 2x-enlarged face, shrunk back by area averaging
    assert [got[c] for c in CLASSES] == pytest.approx(expected, abs=1e-4)
    assert "[face 96x96 at (150,20); 2 faces found, used the largest]" in r.text()

    with pytest.raises(UserError, match="--top 0: must be >= 1"):
        predict_images(model_path, [path], detector=lambda gray: boxes, top=0)


def test_crop_box_margin_stays_inside_the_image():
    assert crop_box((10, 20, 100, 100), 0.2, 640, 480) == (0, 0, 130, 140)
    assert crop_box((500, 300, 100, 100), 0.2, 640, 480) == (480, 280, 620, 420)
    assert crop_box((100, 100, 50, 40), 0.0, 640, 480) == (100, 100, 150, 140)
