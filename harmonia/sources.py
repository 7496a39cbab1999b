"""Reading source codes: Usagi-style CSV (sourceCode, sourceName, sourceFrequency, optional source vocabulary
column, extra columns kept). Bad rows are reported by line and skipped; nothing half-read is returned."""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harmonia.domain import SourceTerm

CODE_COLUMNS = ("sourceCode", "source_code")
NAME_COLUMNS = ("sourceName", "source_name", "sourceText", "source_text")
FREQ_COLUMNS = ("sourceFrequency", "source_frequency")
VOCAB_COLUMNS = ("sourceVocabularyId", "sourceVocabulary", "source_vocabulary_id", "source_vocab",
                 "sourceVocab")


class SourceFileError(ValueError):
    """The file as a whole cannot be read (no header, no code or name column)."""


@dataclass
class RowProblem:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class SourceFile:
    path: str
    terms: list[SourceTerm] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)
    duplicates: int = 0
    rows: int = 0  # data rows read (terms + problems + duplicates)


def _pick(header: Sequence[str], names: tuple[str, ...]) -> str | None:
    lower = {h.lower(): h for h in header}
    for n in names:
        if n.lower() in lower:
            return lower[n.lower()]
    return None


def read_source_csv(path: Path, default_vocab: str = "local") -> SourceFile:
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip
        raw = gzip.decompress(raw)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    # surrogateescape keeps undecodable bytes visible per row instead of failing the whole file
    text = raw.decode("utf-8", errors="surrogateescape")
    sample = text[:4096]
    delimiter = "\t" if sample.count("\t") > sample.count(",") else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = reader.fieldnames or []
    code_col, name_col = _pick(header, CODE_COLUMNS), _pick(header, NAME_COLUMNS)
    if not header or code_col is None or name_col is None:
        raise SourceFileError(f"{path}: needs a header with sourceCode and sourceName columns (found {header})")
    freq_col, vocab_col = _pick(header, FREQ_COLUMNS), _pick(header, VOCAB_COLUMNS)
    known = {code_col, name_col, freq_col, vocab_col}
    out = SourceFile(path=str(path))
    seen: set[tuple[str, str]] = set()
    line = 1
    for row in reader:
        line = reader.line_num
        out.rows += 1
        values = [v for v in row.values() if isinstance(v, str)]
        if any("\udc80" <= ch <= "\udcff" for v in values for ch in v):
            out.problems.append(RowProblem(line, "invalid UTF-8 encoding"))
            continue
        if None in row:  # more fields than the header
            out.problems.append(RowProblem(line, f"{len(header) + len(row[None])} fields, header has "
                                                 f"{len(header)}"))
            continue
        code = (row.get(code_col) or "").strip()
        name = (row.get(name_col) or "").strip()
        if not code:
            out.problems.append(RowProblem(line, f"empty {code_col}"))
            continue
        if not name:
            out.problems.append(RowProblem(line, f"empty {name_col}"))
            continue
        vocab = ((row.get(vocab_col) or "").strip() if vocab_col else "") or default_vocab
        freq_raw = (row.get(freq_col) or "").strip() if freq_col else ""
        freq: int | None = None
        if freq_raw:
            try:
                freq = int(float(freq_raw))
            except ValueError:
                out.problems.append(RowProblem(line, f"{freq_col}={freq_raw!r} is not a number"))
                continue
        if (code, vocab) in seen:
            out.duplicates += 1
            continue
        seen.add((code, vocab))
        extra = {k: v for k, v in row.items() if k not in known and k is not None}
        out.terms.append(SourceTerm(source_code=code, source_vocab=vocab, source_text=name, source_frequency=freq,
                                    extra=extra, line=line))
    return out
