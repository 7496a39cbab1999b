"""Time one source code's rerank (50 pairs) with a classifier checkpoint in several precisions, on the CPU.

    python benchmark/classifier_latency.py --checkpoint DIR [--codes 30] [--threads 2]

The pairs are the checkpoint's own training material (pairs.jsonl.gz): per source text, 50 candidate texts drawn
from the material (so lengths are realistic). Variants: float32; bfloat16 autocast (what `classifier_dtype = "auto"`
does on a CPU with AVX512-BF16/AMX); bfloat16 weights; dynamic int8 quantisation of the linear layers (not a
product option yet: measured to see what it would give). Prints the median ms per code (tokenising excluded) and
how often each variant keeps float32's top-1. Issue 5's goal: <= 150 ms per code on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import random
import statistics
import time
import warnings
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run folder of `harmonia reranker train`")
    ap.add_argument("--codes", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(a.threads)
    run = Path(a.checkpoint)
    tok = AutoTokenizer.from_pretrained(run / "model")
    with gzip.open(run / "pairs.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for line in fh]
    rows = [r for r in rows if "query" in r and "doc" in r]
    rng = random.Random(1)
    queries = rng.sample(sorted({r["query"] for r in rows}), a.codes + 3)
    docs = [r["doc"] for r in rows]
    groups = [tok([q] * 50, rng.sample(docs, 50), truncation=True, max_length=64, padding=True,
                  return_tensors="pt") for q in queries]

    def load(**kw):
        return AutoModelForSequenceClassification.from_pretrained(run / "model", num_labels=1, **kw).eval()

    f32 = load()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        int8 = torch.ao.quantization.quantize_dynamic(load(), {torch.nn.Linear}, dtype=torch.qint8)
    variants = {
        "float32": (f32, contextlib.nullcontext),
        "bfloat16 autocast": (f32, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
        "bfloat16 weights": (load(dtype=torch.bfloat16), contextlib.nullcontext),
        "int8 dynamic": (int8, contextlib.nullcontext),
    }
    reference: list[int] = []
    print(f"{a.codes} codes x 50 pairs, {groups[0]['input_ids'].shape[1]} tokens per pair (first code), "
          f"{torch.get_num_threads()} threads")
    for name, (model, ctx) in variants.items():
        times, top1 = [], []
        with torch.inference_mode():
            for i, enc in enumerate(groups):
                t = time.perf_counter()
                with ctx():
                    z = model(**enc).logits[:, 0].float()
                if i >= 3:  # warm-up
                    times.append((time.perf_counter() - t) * 1000)
                    top1.append(int(z.argmax()))
        if not reference:
            reference = top1
        same = sum(x == y for x, y in zip(top1, reference, strict=True)) / len(top1)
        print(f"{name:18s} median {statistics.median(times):6.0f} ms per code   same top-1 as float32 {same:.0%}")


if __name__ == "__main__":
    main()
