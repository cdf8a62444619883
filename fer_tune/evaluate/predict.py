"""`fer-tune predict MODEL IMAGE...`: the emotions in photos.

Each image is decoded (EXIF orientation applied), the face is found with OpenCV's bundled Haar
cascade (frontal face), cropped with a margin, then converted exactly like the training data
(`fer_tune.data.decode.to_stored`: gray or RGB per the checkpoint, resized to its img_size) and
normalized with the checkpoint's mean/std.

Several faces: the largest is used and the result says how many were found (a portrait with
someone in the background is the common case; the largest face is the subject). No face: an error
for that image (with `--no-detect` the whole image is taken as the face crop). An image that
cannot be read or decoded is an error for that image; the others are still processed.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fer_tune.errors import UserError

CASCADE = "haarcascade_frontalface_default.xml"
DEFAULT_MARGIN = 0.2  # of the face box's side, added on each side (Haar boxes stop at the brows and chin)


@dataclass
class Prediction:
    image: str
    ok: bool
    error: str | None = None
    top: list[dict] = field(default_factory=list)  # [{"class": name, "probability": p}], best first
    face: dict | None = None  # {"x", "y", "w", "h"} of the face used, in the image's pixels
    faces_found: int | None = None  # None with --no-detect
    note: str = ""
    tta: str | None = None  # the TTA mode of the probabilities (none, flip or crops); None without them

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        if not self.ok:
            return f"{self.image}: error: {self.error}"
        probs = ", ".join(f"{t['class']} {t['probability'] * 100:.1f}%" for t in self.top)
        where = ""
        if self.face:
            f = self.face
            where = f"  [face {f['w']}x{f['h']} at ({f['x']},{f['y']})" + (f"; {self.note}" if self.note else "") + "]"
        tta = f" ({self.tta} TTA)" if self.tta not in (None, "none") else ""
        return f"{self.image}: {probs}{tta}{where}"


class FaceDetector:
    """OpenCV's frontal-face Haar cascade; calling it on a gray uint8 image returns (x, y, w, h) boxes."""

    def __init__(self, cascade: str | None = None, *, scale_factor: float = 1.1, min_neighbors: int = 5):
        import cv2

        if not hasattr(cv2, "CascadeClassifier"):
            raise UserError(f"face detection needs OpenCV's Haar cascades, which OpenCV {cv2.__version__} no longer "
                            "ships; install `pip install 'opencv-python-headless>=4.8,<5'`, or pass --no-detect for "
                            "images that are face crops already")
        path = cascade or str(Path(getattr(getattr(cv2, "data", None), "haarcascades", "")) / CASCADE)
        self.classifier = cv2.CascadeClassifier(path)
        if self.classifier.empty():
            raise UserError(f"{path}: cannot load the Haar cascade; reinstall opencv-python-headless, or pass "
                            "--no-detect for images that are face crops already")
        self.scale_factor, self.min_neighbors = scale_factor, min_neighbors

    def __call__(self, gray: np.ndarray) -> list[tuple[int, int, int, int]]:
        import cv2

        side = min(gray.shape[:2])
        min_size = max(20, side // 12)
        boxes = self.classifier.detectMultiScale(cv2.equalizeHist(gray), scaleFactor=self.scale_factor,
                                                 minNeighbors=self.min_neighbors, minSize=(min_size, min_size))
        return [tuple(int(v) for v in b) for b in (boxes if len(boxes) else [])]


def crop_box(box: tuple[int, int, int, int], margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the face box grown by `margin` x its side on each side, inside the image."""
    x, y, w, h = box
    mx, my = int(round(w * margin)), int(round(h * margin))
    return max(0, x - mx), max(0, y - my), min(width, x + w + mx), min(height, y + h + my)


def prepare_image(path: str | Path, *, img_size: int, rgb: bool, detect: bool, margin: float,
                  detector: Callable | None) -> tuple[np.ndarray, dict]:
    """(uint8 (C, img_size, img_size) as in training, facts) for one image; UserError when unusable."""
    from PIL import Image, ImageOps

    from fer_tune.data.decode import to_stored, why_undecodable

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the file ({exc.strerror or exc})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError too
        raise UserError(f"cannot decode the image ({why_undecodable(exc)})") from None
    facts: dict = {"face": None, "faces_found": None, "note": ""}
    if detect:
        gray = np.asarray(im.convert("L"))
        faces = sorted(detector(gray), key=lambda b: b[2] * b[3], reverse=True)
        if not faces:
            raise UserError("no face found; use a clearer frontal photo, or --no-detect if the image is a face crop "
                            "already")
        x, y, w, h = faces[0]
        facts.update(face={"x": x, "y": y, "w": w, "h": h}, faces_found=len(faces))
        if len(faces) > 1:
            facts["note"] = f"{len(faces)} faces found, used the largest"
        im = im.crop(crop_box(faces[0], margin, im.width, im.height))
    return to_stored(im, img_size, rgb), facts


def predict_images(model_path: str | Path, images: Sequence[str | Path], *, detect: bool = True, top: int = 3,
                   margin: float = DEFAULT_MARGIN, tta: bool | str | None = None, device: str | None = None,
                   detector: Callable | None = None) -> list[Prediction]:
    """A Prediction per image, in order; failed images carry their error and do not stop the others."""
    from fer_tune.evaluate.evaluate import predict_probs
    from fer_tune.train.checkpoint import load_checkpoint, model_from_checkpoint
    from fer_tune.train.runtime import pick_device, tta_mode

    if top < 1:
        raise UserError(f"--top {top}: must be >= 1")
    if not 0 <= margin <= 2:
        raise UserError(f"--margin {margin}: must be a fraction of the face size in [0, 2]")
    if not images:
        raise UserError("predict: give at least one image file")
    state = load_checkpoint(model_path)
    classes = list(state["classes"])
    img_size, rgb = int(state["img_size"]), int(state["in_chans"]) == 3
    if detect and detector is None:
        detector = FaceDetector()
    out: list[Prediction] = []
    ready: list[tuple[int, np.ndarray]] = []
    for path in images:
        try:
            pixels, facts = prepare_image(path, img_size=img_size, rgb=rgb, detect=detect, margin=margin,
                                          detector=detector)
        except UserError as exc:
            out.append(Prediction(image=str(path), ok=False, error=str(exc)))
            continue
        out.append(Prediction(image=str(path), ok=True, **facts))
        ready.append((len(out) - 1, pixels))
    if ready:
        model, cfg = model_from_checkpoint(state, device=pick_device(device))
        probs = predict_probs(model, np.stack([p for _, p in ready]), state["norm"], tta=tta,
                              channels_last=cfg.channels_last)
        for (i, _), p in zip(ready, probs):
            order = np.argsort(-p)[: min(top, len(classes))]
            out[i].top = [{"class": classes[k], "probability": round(float(p[k]), 4)} for k in order]
            out[i].tta = tta_mode(tta)
    return out
