"""A new release against 100,000 maps: diff + re-check time on a 1M+ concept synthetic release (issue 16).

    python benchmark/release_figures.py [--scale 20] [--maps 100000] [--database-url URL] [--keep DIR]

scripts/make_next_release.py writes `--scale` shifted copies of the bundled sample (20: ~1.03M concepts, ~1.5M
relationships) as a base release and a next release with every case in every copy. The base is loaded, the
vocabulary's own ICD10 'Maps to' become `--maps` maps, the next release is loaded beside it and swapped in, then
`diff_releases` and `recheck` (no fresh retrieval: successors come from the release) run as `harmonia vocab diff`
and `harmonia vocab recheck` do. Goal: diff + re-check <= 5 minutes on 2 cores. The loads are timed too, but are
not part of the goal.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from _common import database  # sibling module: python puts the script's folder first on sys.path

from harmonia.pipeline.recheck import recheck
from harmonia.store import migrations
from harmonia.store import recheck as recheck_store
from harmonia.vocabulary import diff_releases, load_vocabulary

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_next_release.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=20)
    ap.add_argument("--maps", type=int, default=100_000)
    ap.add_argument("--database-url")
    ap.add_argument("--keep", help="Keep the embedded server's data here (default: a temporary folder).")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="harmonia-release-") as tmp:
        base, nxt = Path(tmp) / "base", Path(tmp) / "next"
        t = time.perf_counter()
        subprocess.run([sys.executable, str(SCRIPT), "--scale", str(a.scale), "--base-out", str(base),
                        "--out", str(nxt)], check=True)
        print(f"releases written in {time.perf_counter() - t:.0f}s")
        with database(a.database_url, a.keep) as url, psycopg.connect(url, autocommit=True) as conn:
            migrations.migrate(conn)
            r0 = load_vocabulary(conn, base, progress=False)
            print(f"base release {r0.release_label}: {r0.rows['concept']:,} concepts, "
                  f"{r0.rows['concept_relationship']:,} relationships, loaded in {r0.seconds:.0f}s")
            t = time.perf_counter()
            with conn.transaction():
                n = recheck_store.map_maps_to(conn, "ICD10", a.maps)
            print(f"maps: {n:,} (the vocabulary's ICD10 'Maps to', {time.perf_counter() - t:.0f}s)")
            r1 = load_vocabulary(conn, nxt, progress=False)
            print(f"next release {r1.release_label}: {r1.rows['concept']:,} concepts, loaded and swapped in "
                  f"{r1.seconds:.0f}s")
            t0 = time.perf_counter()
            d = diff_releases(conn)
            t1 = time.perf_counter()
            rc = recheck(conn)
            t2 = time.perf_counter()
    counts = d.concept_counts()
    print("diff: " + ", ".join(f"{k}={v:,}" for k, v in counts.items()) + "; 'Maps to' "
          + ", ".join(f"{v}: +{c['added']:,}/-{c['removed']:,}" for v, c in d.maps_to_counts().items()))
    print(f"re-check: {rc.maps_affected:,} of {n:,} maps affected, " + ", ".join(
        f"{k}={v:,}" for k, v in rc.by_reason.items()) + "; successors: " + ", ".join(
        f"{k}={v:,}" for k, v in sorted(rc.proposed_by.items())))
    total = t2 - t0
    print(f"FIGURE diff {t1 - t0:.1f}s + re-check {t2 - t1:.1f}s = {total:.1f}s for {n:,} maps against "
          f"{r1.rows['concept']:,} concepts (goal <= 300s: {'met' if total <= 300 else 'NOT met'})")


if __name__ == "__main__":
    main()
