"""Athena loader throughput: rows/s loading a synthetic CONCEPT.csv (default 2M rows) with COPY.

    python benchmark/loader_speed.py [--rows 2000000] [--gzip] [--database-url URL]

Goal (issue 2): >= 50,000 rows/s. The file is written once to a temp folder; the load runs through
harmonia.vocab.load_vocabulary exactly as `harmonia vocab load` does (validation, staging, swap, indexes).
"""

from __future__ import annotations

import argparse
import gzip
import random
import tempfile
import time
from pathlib import Path

import psycopg
from _common import database  # sibling module: python puts the script's folder first on sys.path

from harmonia.store import migrations
from harmonia.vocabulary import load_vocabulary

HEADER = ("concept_id\tconcept_name\tdomain_id\tvocabulary_id\tconcept_class_id\tstandard_concept\t"
          "concept_code\tvalid_start_date\tvalid_end_date\tinvalid_reason\n")
WORDS = ["acute", "chronic", "fracture", "of", "left", "right", "upper", "lower", "limb", "neoplasm",
         "malignant", "benign", "disorder", "finding", "procedure", "serum", "plasma", "glucose", "sodium",
         "measurement", "tablet", "oral", "10", "mg", "injection"]


def write_concepts(path: Path, rows: int, gz: bool) -> None:
    rnd = random.Random(7)
    doms = [("Condition", "SNOMED", "Clinical Finding"), ("Measurement", "LOINC", "Lab Test"),
            ("Drug", "RxNorm", "Clinical Drug"), ("Condition", "ICD10", "ICD10 code")]
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as fh:  # type: ignore[operator]  # gzip.open | open: one signature here
        fh.write(HEADER)
        buf = []
        for i in range(1, rows + 1):
            dom, voc, cls = doms[i % 4]
            name = " ".join(rnd.choices(WORDS, k=rnd.randint(3, 9)))
            std = "" if voc == "ICD10" else "S"
            buf.append(f"{i}\t{name}\t{dom}\t{voc}\t{cls}\t{std}\tC{i}\t19700101\t20991231\t\n")
            if len(buf) == 50_000:
                fh.write("".join(buf))
                buf = []
        fh.write("".join(buf))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--gzip", action="store_true", help="compress the file, as Athena downloads often are")
    ap.add_argument("--database-url")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "athena"
        folder.mkdir()
        path = folder / ("CONCEPT.csv.gz" if a.gzip else "CONCEPT.csv")
        t = time.perf_counter()
        write_concepts(path, a.rows, a.gzip)
        print(f"wrote {a.rows:,} rows ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f}s")
        with database(a.database_url) as url, psycopg.connect(url, autocommit=True) as conn:
            migrations.migrate(conn)
            r = load_vocabulary(conn, folder, progress=False)
            rate = r.rows["concept"] / r.seconds
            print(f"loaded {r.rows['concept']:,} concepts in {r.seconds:.1f}s: {rate:,.0f} rows/s "
                  f"(goal >= 50,000) [{'gzip' if a.gzip else 'plain'}; validation + COPY + indexes + swap]")


if __name__ == "__main__":
    main()
