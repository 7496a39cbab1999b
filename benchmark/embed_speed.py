"""Embedding speed on this machine (issue 18, point 4): rows/s of the bundled encoder over a subset of the sample's
standard concept names, in float32 and bfloat16, batches in name order or sorted by length, and how far bfloat16
vectors are from float32 ones (cosine, and the overlap of each name's 10 nearest neighbours in the subset).

    flock /work/wt/quiet.lock python benchmark/embed_speed.py --n 4000 [--device cuda]

Hours for N concepts = N / rows/s / 3600 (printed for 2.5M).
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import time

import numpy as np
import torch

from harmonia.embedding.model import Embedder, bundled_model_path
from harmonia.paths import sample_dir


def names(n: int, seed: int) -> list[str]:
    with gzip.open(sample_dir() / "vocab" / "CONCEPT.csv.gz", "rt", encoding="utf-8") as fh:
        fh.readline()
        rows = [line.split("\t") for line in fh]
    std = [r[1] for r in rows if len(r) > 9 and r[5] == "S" and r[9].strip() == ""]
    return random.Random(seed).sample(std, min(n, len(std)))


def rate(emb: Embedder, texts: list[str], batch: int) -> tuple[float, np.ndarray]:
    emb.encode_documents(texts[:batch], batch)  # load and warm
    t = time.perf_counter()
    out = [emb.encode_documents(texts[i:i + batch], batch) for i in range(0, len(texts), batch)]
    return len(texts) / (time.perf_counter() - t), np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=18)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    texts = names(a.n, a.seed)
    by_len = sorted(texts, key=len)
    results = {}
    for dtype in ("float32", "bfloat16"):
        emb = Embedder(name_or_path=str(bundled_model_path()), device=a.device, dtype=dtype)
        r_unsorted, _ = rate(emb, texts, a.batch)
        r_sorted, vecs = rate(emb, by_len, a.batch)
        results[dtype] = vecs
        print(f"FIGURE embed {dtype}: {r_unsorted:,.0f} rows/s in random order, {r_sorted:,.0f} rows/s sorted by "
              f"length (n={len(texts)}, batch {a.batch}); 2.5M concepts: {2.5e6 / r_sorted / 3600:.1f} h", flush=True)
    f, b = results["float32"], results["bfloat16"]
    cos = np.sum(f * b, axis=1)
    nn_f = np.argsort(-(f @ f.T), axis=1)[:, 1:11]
    nn_b = np.argsort(-(b @ b.T), axis=1)[:, 1:11]
    overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(nn_f, nn_b, strict=True)])
    print(f"FIGURE bfloat16 vs float32: cosine mean {cos.mean():.4f}, min {cos.min():.4f}; 10-NN overlap "
          f"{overlap:.3f}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
