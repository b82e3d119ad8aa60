"""Host throughput of the streamed input pipeline (`train.data.Streamed`), ImageNet-like.

  PYTHONPATH=. python -m benchmarks.input_pipeline [--workers 1,2] [--out results/input.jsonl]

No ImageNet here, so the records are made up: `--images` JPEGs of ImageNet's typical size
(500 x 375, quality 90), smooth gradients plus noise (closer to photographs than noise
alone, which compresses badly and decodes slower). The source decodes a record with PIL
when it is read, as a tfds data source does for `imagenet2012`; `Streamed` then crops and
resizes to 224. Timed: `take` of one batch (training crops, then evaluation crops), median
of `--repeats`, after one warm-up; images/s per setting. This bounds how many host cores
feed a GPU: the H100 of ../shared/GPU.md trains a ResNet-50 at a few thousand images/s.
"""

from __future__ import annotations

import argparse
import io
import time
import types

import numpy as np
from PIL import Image

from benchmarks import common
from train import data as data_lib


class JpegSource:
  """A tfds-like random-access source of JPEG records, decoded on read."""

  def __init__(self, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500]
    self.records, self.labels = [], rng.integers(0, 1000, n)
    for _ in range(n):
      a, b, c = rng.uniform(-1, 1, 3)
      base = 128 + 60 * np.sin(a * xx / 40 + b * yy / 30 + c)[..., None] * np.array([1, 0.8, 0.6])
      img = np.clip(base + rng.normal(0, 12, (375, 500, 3)), 0, 255).astype(np.uint8)
      buf = io.BytesIO()
      Image.fromarray(img).save(buf, format="JPEG", quality=90)
      self.records.append(buf.getvalue())
    label = types.SimpleNamespace(num_classes=1000)
    image = types.SimpleNamespace(shape=(None, None, 3))
    self.dataset_info = types.SimpleNamespace(features={"image": image, "label": label})

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    with Image.open(io.BytesIO(self.records[i])) as im:
      return {"image": np.asarray(im.convert("RGB")), "label": int(self.labels[i])}


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--images", type=int, default=256)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--workers", default="1,2")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="results/input.jsonl")
  args = p.parse_args()
  src = JpegSource(args.images)
  kb = np.mean([len(r) for r in src.records]) / 1024
  device = common.device_name()
  print(f"host: {device}; {args.images} JPEGs 500x375, {kb:.0f} KiB each on average", flush=True)
  rows = []
  for workers in (int(w) for w in args.workers.split(",")):
    split = data_lib.Streamed(
      src, where="jpeg", size=args.size, num_classes=1000, channels=3, workers=workers
    )
    idx = np.arange(args.batch) % args.images
    for crop, seed in (("train", (0, 0)), ("eval", None)):
      split.take(idx, seed)  # warm-up (and the pool's threads)
      times = []
      for r in range(args.repeats):
        t0 = time.perf_counter()
        split.take(idx, None if seed is None else (0, r + 1))
        times.append(time.perf_counter() - t0)
      sec = float(np.median(times))
      row = {
        "host": device,
        "workers": workers,
        "crop": crop,
        "batch": args.batch,
        "size": args.size,
        "images_per_s": args.batch / sec,
        "batch_ms": 1e3 * sec,
        "jpeg_kib": kb,
        "repeats": args.repeats,
      }
      rows.append(row)
      print(
        f"workers {workers}  {crop:5s} crops  {row['images_per_s']:7.0f} images/s  "
        f"({row['batch_ms']:.0f} ms per batch of {args.batch})",
        flush=True,
      )
  common.write_jsonl(args.out, rows)
  print(f"\nwrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
  main()
