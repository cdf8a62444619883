"""Training throughput: our loop vs a naive seed-study pipeline vs the bare model step.

    python benchmarks/throughput.py [--models improved_cnn mini_resnet vgg_fer timm/resnet18]
                                    [--repeats 3] [--batches 20] [--aug-strength 0.5] [--compile]
    python benchmarks/throughput.py --models vgg_fer_s:fc=512 vgg_fer_s:width=0.5,fc=512   # model arguments

For each model, images per second of training under
  (a) our loop: `fer_tune.train.fit` (uint8 split resident in memory, batched on-device
      augmentation, channels_last, autocast bf16 where the CPU has it);
  (b) a naive pipeline like the seed studies': torchvision ImageFolder over the extracted JPEG files,
      PIL transforms of equal strength, DataLoader with 2 workers, fp32, contiguous;
  (c) the bare model step on one pre-made input batch (same precision and layout as (a)): the limit;
  (d) the same bare step in fp32 with contiguous tensors, as (b) runs the model.
All run interleaved in every repeat; the table shows medians and the ratios a/b and a/c, and splits
a/b = a/c x c/d x d/b: our loop's overhead, what bf16 + channels_last give this model on this CPU,
and what the naive pipeline's data loading costs.
Needs FER-2013 prepared (`fer-tune data prepare fer2013 ...`) and the original zip for (b).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fer_tune import data as fdata
from fer_tune.cli import parse_assignment
from fer_tune.models import create_model
from fer_tune.train import MemoryReporter, TrainConfig, TrainData, fit
from fer_tune.train import augment as aug
from fer_tune.train.runtime import autocast, resolve_precision

ROOT = Path(__file__).resolve().parents[1]
BATCH = 128


def model_spec(spec: str) -> tuple[str, dict]:
    """`NAME` or `NAME:KEY=VALUE,...` (model arguments, values read as `--set` reads them):
    `vgg_fer_s:width=0.5,fc=512`."""
    name, _, args = spec.partition(":")
    kwargs = {}
    for item in filter(None, args.split(",")):
        try:
            key, value = parse_assignment(item)
        except argparse.ArgumentTypeError:
            key = ""
        if not key:
            raise SystemExit(f"--models {spec}: model arguments must be KEY=VALUE, e.g. vgg_fer_s:width=0.5,fc=512")
        kwargs[key] = value
    return name, kwargs


def ours(model: str, train: TrainData, batches: int, strength: float, compile: bool = False) -> float:
    """Images/s of the second epoch of `fit` (the first pays one-off kernel set-up and compilation)."""
    model, kwargs = model_spec(model)
    cfg = TrainConfig(model=model, model_kwargs=kwargs, epochs=2, batch_size=BATCH, aug_strength=strength,
                      schedule="constant", lr=1e-3, compile=compile)
    rep = MemoryReporter()
    fit(cfg, train, rep)
    return rep.history[-1]["images_per_second"]


def bare(model: str, batches: int, compile: bool = False, fast: bool = True) -> float:
    """Images/s of the model step alone; fast=False: fp32 and contiguous, as the naive pipeline."""
    fmt = torch.channels_last if fast else torch.contiguous_format
    name, kwargs = model_spec(model)
    net = create_model(name, **kwargs).to(memory_format=fmt)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    forward = torch.compile(net) if compile else net
    precision = resolve_precision("auto" if fast else "fp32", torch.device("cpu"))
    x = torch.randn(BATCH, 1, 48, 48).contiguous(memory_format=fmt)
    y = torch.randint(0, 7, (BATCH,))

    def step():
        with autocast(torch.device("cpu"), precision):
            out = forward(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(batches):
        step()
    return batches * BATCH / (time.perf_counter() - t0)


def naive(model: str, folder: Path, batches: int, strength: float, mean: float, std: float) -> float:
    from torchvision import datasets, transforms as T

    s = strength
    tf = T.Compose([
        T.Grayscale(1),
        T.RandomHorizontalFlip(),
        T.RandomAffine(degrees=aug.MAX_ROTATE_DEG * s, translate=(aug.MAX_SHIFT * s,) * 2,
                       scale=(1 - aug.MAX_SCALE * s, 1 + aug.MAX_SCALE * s), shear=aug.MAX_SHEAR_DEG * s),
        T.ColorJitter(brightness=aug.MAX_BRIGHTNESS * s, contrast=aug.MAX_CONTRAST * s),
        T.ToTensor(),
        T.Normalize([mean], [std]),
        T.RandomErasing(p=aug.MAX_ERASE_PROB * s, scale=aug.ERASE_AREA),
    ])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), transform=tf), batch_size=BATCH,
                                         shuffle=True, num_workers=2, drop_last=True, persistent_workers=False)
    name, kwargs = model_spec(model)
    net = create_model(name, **kwargs)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    seen, t0 = 0, None
    for i, (x, y) in enumerate(loader):
        if i == 3:
            t0, seen = time.perf_counter(), 0
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
        if i == batches + 2:
            break
    return seen / (time.perf_counter() - t0)


def extract_subset(zip_path: Path, out: Path, n: int, seed: int = 0) -> None:
    """The first n (seeded) training JPEGs of the Kaggle zip, as an ImageFolder tree."""
    with zipfile.ZipFile(zip_path) as zf:
        names = [m for m in zf.namelist() if m.startswith("train/") and m.endswith(".jpg")]
        for name in np.random.default_rng(seed).choice(names, n, replace=False):
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["improved_cnn", "mini_resnet", "vgg_fer", "timm/resnet18"],
                   help="model names, each optionally with arguments: vgg_fer_s:width=0.5,fc=512")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--aug-strength", type=float, default=0.5)
    p.add_argument("--dataset", default="fer2013")
    p.add_argument("--data-root")
    p.add_argument("--zip", default=str(ROOT.parent / "shared" / "datasets" / "fer2013.zip"))
    p.add_argument("--compile", action="store_true", help="torch.compile the model in (a) and (c)")
    args = p.parse_args(argv)

    ds = fdata.load(args.dataset, args.data_root)
    x, y = ds.arrays("train")
    n = BATCH * args.batches
    keep = np.random.default_rng(0).choice(len(x), n, replace=False)
    vx, vy = ds.arrays("val")
    train = TrainData(x[keep], y[keep], vx[:BATCH], vy[:BATCH], tuple(ds.classes))
    mean, std = float(x.mean() / 255), float(x.std() / 255)
    precision = resolve_precision("auto", torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, precision of (a)/(c): {precision}, "
          f"batch {BATCH}, {args.batches} timed batches, {args.repeats} repeats, aug_strength {args.aug_strength}"
          f"{', torch.compile in (a)/(c)' if args.compile else ''}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        extract_subset(Path(args.zip), Path(tmp), n)
        for model in args.models:
            runs = {"a": [], "b": [], "c": [], "d": []}
            for _ in range(args.repeats):
                runs["a"].append(ours(model, train, args.batches, args.aug_strength, args.compile))
                runs["b"].append(naive(model, Path(tmp) / "train", args.batches, args.aug_strength, mean, std))
                runs["c"].append(bare(model, args.batches, args.compile))
                runs["d"].append(bare(model, args.batches, fast=False))
            med = {k: statistics.median(v) for k, v in runs.items()}
            rows.append((model, med["a"], med["b"], med["c"], med["d"]))
            print(f"  {model}: " + ", ".join(f"{k} {[round(v) for v in vs]}" for k, vs in runs.items()),
                  file=sys.stderr)

    print()
    print("| model | (a) ours img/s | (b) naive img/s | (c) bare step img/s | (d) bare fp32 img/s "
          "| a/b | a/c | c/d | d/b |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model, a, b, c, d in rows:
        print(f"| {model} | {a:,.0f} | {b:,.0f} | {c:,.0f} | {d:,.0f} | {a / b:.2f} | {a / c:.2f} "
              f"| {c / d:.2f} | {d / b:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
