"""The canonical class order (FER-2013's own) and the names we map to it."""

CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

# Every spelling we accept for a class folder or label name, lower-cased.
SYNONYMS = {
    "angry": "angry", "anger": "angry", "mad": "angry",
    "disgust": "disgust", "disgusted": "disgust", "disgusting": "disgust",
    "fear": "fear", "fearful": "fear", "afraid": "fear", "scared": "fear",
    "happy": "happy", "happiness": "happy", "joy": "happy",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprise", "surprised": "surprise",
    "neutral": "neutral", "calm": "neutral",
}

# Classes of other datasets that are not one of the 7 (CK+'s and AffectNet's contempt, AffectNet's
# none/uncertain/non-face): `data prepare imagefolder` leaves their images out and `evaluate` drops
# them, each saying how many. Any other unknown folder name is an error (most likely a typo).
EXTRA_CLASSES = {"contempt": "contempt", "contemptuous": "contempt", "none": "none", "uncertain": "uncertain",
                 "non-face": "non-face", "nonface": "non-face", "no-face": "non-face"}

# RAF-DB basic labels 1..7 = surprise, fear, disgust, happiness, sadness, anger, neutral.
RAFDB_TO_CANONICAL = {1: 5, 2: 2, 3: 1, 4: 3, 5: 4, 6: 0, 7: 6}


def canonical_class(name: str) -> str | None:
    """The canonical class for a folder/label name, or None when we do not know it."""
    return SYNONYMS.get(name.strip().lower())


def extra_class(name: str) -> str | None:
    """The class of EXTRA_CLASSES a folder name means, or None."""
    return EXTRA_CLASSES.get(name.strip().lower())


def count_images(counts: dict[str, int]) -> str:
    """Image counts by class in words: '8 images of contempt, 1 image of non-face'."""
    return ", ".join(f"{n} image{'s' * (n != 1)} of {c}" for c, n in counts.items())


def accepted_names() -> str:
    """Every accepted class name, grouped by canonical class, for error messages."""
    return ", ".join("/".join(n for n, c in SYNONYMS.items() if c == cls) for cls in CLASSES)
