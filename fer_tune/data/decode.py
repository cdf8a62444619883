"""Shared reading helpers: a source (zip, folder or single file) seen as a list of members,
parallel image decoding into one uint8 array, CSV rows, and the readers' common result."""

import abc
import csv
import hashlib
import io
import os
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from fer_tune.data.classes import CLASSES, accepted_names, canonical_class
from fer_tune.errors import UserError, first_line

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class RawDataset:
    """What a reader returns: decoded images with labels and splits, before duplicates are counted."""

    images: np.ndarray  # uint8 (N, C, H, W), already converted and resized
    labels: np.ndarray  # int64 canonical class ids
    split: np.ndarray  # uint8 split ids; val may be empty, then prepare() slices it from train
    pixel_hash: list[bytes]  # digest of each image's decoded pixels before conversion and resizing
    layout: str  # human name of the layout that was read
    source_sha256: str
    val_from: str | None  # where val came from, None when it must be sliced from train
    test_from: str | None  # where test came from, None when it must be sliced from train
    left_out: dict[str, int] = field(default_factory=dict)  # images of classes not among the 7, by class


class Source(abc.ABC):
    """Files of a zip archive, a folder or a single file, named by relative POSIX paths (members).
    Junk (`__MACOSX/`, hidden files) is left out."""

    def __init__(self, path: Path, members: list[str]):
        self.path = path
        self.members = sorted(m for m in members if not _is_junk(m))

    def where(self, member: str) -> str:
        """The member's name for messages."""
        return f"{self.path}/{member}"

    @abc.abstractmethod
    def open(self, member: str) -> BinaryIO:
        """A binary file object for one member."""

    def read(self, member: str) -> bytes:
        with self.open(member) as f:
            return f.read()

    def sha256(self) -> str:
        """sha256 of the archive or file; for a folder, its content digest."""
        return file_sha256(self.path)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ZipSource(Source):
    def __init__(self, path: Path):
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(
                f"{path}: not a readable zip archive ({e}); download it again or pass the extracted folder"
            ) from None
        super().__init__(path, [i.filename for i in self.zip.infolist() if not i.is_dir()])

    def open(self, member):
        return self.zip.open(member)

    def read(self, member):
        try:
            return self.zip.read(member)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
            raise UserError(f"{self.where(member)}: cannot be read from the archive ({e}); download it again") from None

    def close(self):
        self.zip.close()


class FolderSource(Source):
    """A folder. Its sha256 is a content digest: sha256 of the sorted lines
    "<sha256 of file>  <relative path>", one per member (as in shared/datasets/SOURCES.md)."""

    def __init__(self, path: Path):
        files = (p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        super().__init__(path, list(files))
        self.digests = {}  # member -> sha256, filled as members are read

    def open(self, member):
        return open(self.path / member, "rb")

    def read(self, member):
        data = super().read(member)
        self.digests[member] = hashlib.sha256(data).hexdigest()
        return data

    def sha256(self):
        lines = "".join(
            f"{self.digests.get(m) or file_sha256(self.path / m)}  {m}\n" for m in self.members
        )
        return hashlib.sha256(lines.encode()).hexdigest()


class FileSource(Source):
    """A single plain file (a CSV), its one member being its own name."""

    def __init__(self, path: Path):
        super().__init__(path, [path.name])

    def where(self, member):
        return str(self.path)

    def open(self, member):
        return open(self.path, "rb")


def open_source(path: str | Path, what: str) -> Source:
    """The source at `path`; `what` describes the expected input for the missing-path message."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such file or folder; give the path of {what}")
    if path.is_dir():
        source = FolderSource(path)
    elif path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        source = ZipSource(path)
    else:
        source = FileSource(path)
    if not source.members:
        source.close()
        kind = "folder" if path.is_dir() else "archive"
        raise UserError(f"{path}: the {kind} is empty; expected {what}")
    return source


def find_tree(source: Source, tops) -> tuple[str, list[tuple[str, str, str]]] | None:
    """Image members shaped `[prefix/]<top>/<class>/<file>` with <top> (lower-cased) in `tops`:
    (prefix, [(member, top, class folder)]), or None when there are none."""
    found = {}
    for member in source.members:
        parts = member.split("/")
        if len(parts) >= 3 and parts[-3].lower() in tops and member.lower().endswith(IMAGE_SUFFIXES):
            found.setdefault("".join(p + "/" for p in parts[:-3]), []).append((member, parts[-3], parts[-2]))
    return one_tree(source, found)


def one_tree(source: Source, found: dict):
    """The one (prefix, members) of `found`, None when empty; several trees are a UserError."""
    if len(found) > 1:
        trees = ", ".join(p or "./" for p in sorted(found))
        raise UserError(f"{source.path}: holds several dataset trees ({trees}); pass the folder of just one")
    return next(iter(found.items()), None)


def class_ids(source: Source, members: list[str]) -> list[int]:
    """Canonical class ids of images by their class folder (`.../<class>/<file>`); unknown folder names
    are one UserError naming each (at the first one's path) and listing the accepted names."""
    folders = [member.rsplit("/", 2)[-2] for member in members]
    classes = [canonical_class(folder) for folder in folders]
    unknown = {}
    for member, folder, cls in zip(members, folders, classes):
        if cls is None:
            unknown.setdefault(folder, member.rsplit("/", 1)[0])
    if unknown:
        names, several = ", ".join(f"'{f}'" for f in unknown), len(unknown) > 1
        raise UserError(f"{source.where(next(iter(unknown.values())))}: unknown class folder{'s' * several} {names}; "
                        f"rename {'them' if several else 'it'} to one of: {accepted_names()}")
    return [CLASSES.index(cls) for cls in classes]


def to_stored(im: Image.Image, size: int, rgb: bool) -> np.ndarray:
    """A decoded image as stored: gray (1, size, size) or RGB (3, size, size) uint8.
    Shrinking averages areas (BOX, like OpenCV's INTER_AREA); enlarging is bicubic."""
    im = im.convert("RGB" if rgb else "L")
    if im.size != (size, size):
        shrink = im.width >= size and im.height >= size
        im = im.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC)
    a = np.asarray(im)
    return a.transpose(2, 0, 1) if rgb else a[None]


def pixel_digest(im: Image.Image) -> bytes:
    """Digest of an image's decoded pixels, mode and size: equal for pixel-identical images."""
    h = hashlib.sha256(f"{im.mode} {im.width}x{im.height} ".encode())
    h.update(im.tobytes())
    return h.digest()


def decode_images(
    source: Source, members: list[str], size: int, rgb: bool, required: tuple[str, int] | None = None
) -> tuple[np.ndarray, list[bytes]]:
    """Decode `members` in parallel into (uint8 (N, C, size, size), pixel digests).
    `required` = (dataset name, side) rejects images that are not side x side."""
    images = np.empty((len(members), 3 if rgb else 1, size, size), dtype=np.uint8)
    hashes = [b""] * len(members)
    problems: dict[int, str] = {}  # every bad file in one message, not one per run

    def decode_range(lo, hi):
        for i in range(lo, hi):
            try:
                images[i], hashes[i] = _decode(source, members[i], size, rgb, required)
            except UserError as exc:
                problems[i] = str(exc)

    _run_chunks(decode_range, len(members))
    if len(problems) == 1:
        raise UserError(*problems.values())
    if problems:
        bad = sorted(problems)
        shown = [problems[i].removesuffix(REMEDY) for i in bad[:MAX_LISTED]]
        more = f" | and {', '.join(source.where(members[i]) for i in bad[MAX_LISTED:])}" if bad[MAX_LISTED:] else ""
        raise UserError(f"{len(bad)} images cannot be used, remove or replace them: " + " | ".join(shown) + more)
    return images, hashes


REMEDY = "; remove or replace the file"
MAX_LISTED = 5  # with their reasons; any others by name only


def why_undecodable(exc: BaseException) -> str:
    """Pillow's reason an image could not be read, in a user's words."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format Pillow reads (jpg, png, bmp, webp, ...)"
    return first_line(exc)


def _decode(source, member, size, rgb, required):
    data = source.read(member)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if required and im.size != (required[1], required[1]):
                name, side = required
                raise UserError(
                    f"{source.where(member)}: image is {im.size[0]}x{im.size[1]}, but {name} images are {side}x{side}; "
                    "remove the file or use `fer-tune data prepare imagefolder` for resized copies"
                )
            return to_stored(im, size, rgb), pixel_digest(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{source.where(member)}: cannot decode the image ({why_undecodable(e)}){REMEDY}") from None


def _run_chunks(work, n, chunk=256):
    """Run work(lo, hi) over [0, n) in chunks on a thread pool (PIL decodes without the GIL)."""
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        futures = [pool.submit(work, lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
        try:
            for f in futures:
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def csv_rows(source: Source, member: str, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: text}) for each row of a CSV member; columns match case-insensitively."""
    where = source.where(member)
    with source.open(member) as raw:
        reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8-sig", newline=""))
        try:
            header = [h.strip().lower() for h in next(reader, [])]
            missing = [c for c in columns if c.lower() not in header]
            if missing:
                raise UserError(
                    f"{where}: missing column(s) {', '.join(missing)}; expected a header line with {','.join(columns)}"
                )
            index = {c: header.index(c.lower()) for c in columns}
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise UserError(f"{where} line {reader.line_num}: {len(row)} fields, expected {len(header)}")
                yield reader.line_num, {c: row[i] for c, i in index.items()}
        except (UnicodeDecodeError, csv.Error, zipfile.BadZipFile, OSError) as e:
            raise UserError(f"{where}: not a readable CSV file ({e})") from None


def parse_label(text: str, where: str, low: int, high: int) -> int:
    """An integer label in [low, high], or a UserError naming `where` (a file and line)."""
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{where}: label '{text}' is not an integer; labels are {low}..{high}") from None
    if not low <= value <= high:
        raise UserError(f"{where}: label {value} is out of range {low}..{high}; fix or remove the line")
    return value


def parse_pixels(text: str, where: str, side: int) -> np.ndarray:
    """A side x side uint8 image from space-separated pixel values, or a UserError naming `where`."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # numpy < 2.3 warns instead of raising
        try:
            values = np.fromstring(text, dtype=np.int32, sep=" ")
        except (ValueError, DeprecationWarning):
            raise UserError(f"{where}: pixels are not all integers; expected {side * side} values 0..255") from None
    if values.size != side * side:
        raise UserError(f"{where}: {values.size} pixel values, expected {side * side} ({side}x{side})")
    if values.min() < 0 or values.max() > 255:
        raise UserError(f"{where}: pixel values must lie in 0..255")
    return values.astype(np.uint8).reshape(side, side)


def _is_junk(member: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in member.split("/"))


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
