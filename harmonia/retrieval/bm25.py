"""The BM25 lexical generator: a Tantivy index of every valid standard concept's name and synonyms, one per
vocabulary release, beside the database in the data dir. PostgreSQL stays the system of record: the index only
proposes concept ids, which are then scored in SQL with the very trigram score the pg_trgm generator gives
(harmonia.store.lexical.rescore), so fusion sees the same numbers whichever generator found a concept.

Why: at a million concepts pg_trgm's `<%` reads a long posting list for every common trigram and scores every
hit (issue 18: p50 341 ms at 1.03M); BM25 over words with block-max WAND reads only the best postings.

Tied to the release: the index folder is named after the release's id and content hash, built by the command that
loads the release (`harmonia vocab load`, `vocab upgrade`, `quickstart`; `harmonia vocab index` rebuilds it), and
checked against the current release before every search. A missing or stale index is never searched: the search
falls back to pg_trgm and logs why once.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import tantivy

from harmonia.config import Settings
from harmonia.domain import Candidate
from harmonia.store import lexical as lex_store
from harmonia.store import release as release_store

log = logging.getLogger(__name__)

STAMP = "release.json"
# Index documents read per query before the trigram re-score: a few times the generator's k, as BM25 and the
# trigram score rank somewhat differently.
DEPTH_FACTOR = 3
FILTERED_DEPTH = 2  # a filtered search reads this many times deeper (filters apply after the index)
# ... unless the filter keeps nearly every document: the configured vocabularies (every search names them) usually
# hold all but a few percent of the index, and reading twice as deep for them doubled the SQL re-score for nothing.
LOOSE_FILTER = 0.9
_TOKENIZER = "en_stem"  # lower case, split on non-alphanumerics, English stemming (fractures -> fractur)
# Index format: 2 added the `grams` field. An index of another format is never searched (rebuilt by
# `harmonia vocab index`), so a new version never reads an old folder wrongly.
FORMAT = 2
# A query word no name of the release contains ("Alaninaminotransferase", "Kalium", a typo) matches nothing by
# words; pg_trgm would still find "Alanine aminotransferase" through shared trigrams. Such words are searched by
# their trigrams in the `grams` field, at this weight relative to a word match.
GRAM = 3
GRAM_BOOST = 0.5
GRAM_MIN_WORD = 4  # shorter unknown words (abbreviations, "xq") carry too few trigrams to find anything useful
# Only each unknown word's rarest trigrams are searched: they say the most and have the shortest posting lists (all
# of a 20-letter word's trigrams doubled the p95 at 1M concepts, measured).
GRAM_MAX = 8


class IndexMissing(RuntimeError):
    """No BM25 index of the current release (never built, or built for another release)."""


def normalise(text: str) -> str:
    """Lower case, accents off (as vocab.lexnorm), and every character the query parser reads as syntax a space."""
    t = unicodedata.normalize("NFKD", text)
    t = "".join(ch for ch in t if not unicodedata.combining(ch)).lower()
    return "".join(ch if ch.isalnum() else " " for ch in t)


def grams(words: Sequence[str]) -> list[str]:
    """Each word's trigrams, within the word (a word shorter than a trigram is its own gram)."""
    out: list[str] = []
    for w in words:
        out += [w[i:i + GRAM] for i in range(len(w) - GRAM + 1)] if len(w) >= GRAM else [w]
    return out


def _schema() -> tantivy.Schema:
    b = tantivy.SchemaBuilder()
    b.add_integer_field("concept_id", stored=False, fast=True, indexed=False)
    b.add_text_field("text", stored=False, tokenizer_name=_TOKENIZER, index_option="freq")
    b.add_text_field("grams", stored=False, tokenizer_name="raw", index_option="freq")
    b.add_text_field("domain", stored=False, tokenizer_name="raw", index_option="basic")
    b.add_text_field("vocabulary", stored=False, tokenizer_name="raw", index_option="basic")
    return b.build()


def index_root(settings: Settings) -> Path:
    return settings.database.data_path / "lexical"


def _folder_name(stamp: tuple[int, str]) -> str:
    return f"release-{stamp[0]}-{stamp[1][:16] or 'unhashed'}"


@dataclass
class IndexReport:
    path: Path
    documents: int
    seconds: float
    bytes: int


def build_index(conn: psycopg.Connection, settings: Settings, *, threads: int = 1) -> IndexReport:
    """Index the current release's names and synonyms into a new folder, then put it in place (a reader never
    sees a half-written index) and remove the indexes of other releases."""
    stamp = release_store.current_stamp(conn)
    if stamp is None:
        raise IndexMissing("no vocabulary loaded: run `harmonia vocab load` first")
    t0 = time.perf_counter()
    root = index_root(settings)
    root.mkdir(parents=True, exist_ok=True)
    final = root / _folder_name(stamp)
    tmp = root / (final.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    schema = _schema()
    index = tantivy.Index(schema, path=str(tmp))
    writer = index.writer(heap_size=256_000_000, num_threads=max(threads, 1))
    n = 0
    for rows in lex_store.index_rows(conn):
        for cid, text, domain, vocabulary in rows:
            norm = normalise(text)
            # raw-tokenised list: one term per distinct gram (a gram's count within a name says little)
            writer.add_document(tantivy.Document(concept_id=int(cid), text=norm, grams=sorted(set(grams(norm.split()))),
                                                 domain=domain, vocabulary=vocabulary))
        n += len(rows)
    writer.commit()
    writer.wait_merging_threads()
    (tmp / STAMP).write_text(json.dumps({"release_id": stamp[0], "content_sha256": stamp[1], "documents": n,
                                         "format": FORMAT}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for other in root.iterdir():
        if other != final and other.name.startswith("release-") and not other.name.endswith(".building"):
            shutil.rmtree(other, ignore_errors=True)
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    return IndexReport(path=final, documents=n, seconds=time.perf_counter() - t0, bytes=size)


class Bm25Index:
    """The open index of one release; `search` returns concept ids best first (name and synonym hits merged)."""

    def __init__(self, path: Path) -> None:
        meta = json.loads((path / STAMP).read_text())
        self.stamp: tuple[int, str] = (int(meta["release_id"]), str(meta["content_sha256"]))
        self.path = path
        self.index = tantivy.Index.open(str(path))
        self.schema = self.index.schema
        self.searcher = self.index.searcher()
        self.filter_in_index = False
        self.use_grams = True  # benchmark/scale.py measures without (generator "bm25-words")
        self._shares: dict[tuple[str, tuple[str, ...]], float] = {}
        self.loose_filter = LOOSE_FILTER  # benchmark/scale.py measures above 1 (every filter deepens: before 4 Dec)
        self._stem = tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple()).filter(
            tantivy.Filter.lowercase()).filter(tantivy.Filter.stemmer("english")).build()  # what en_stem does

    def unknown_words(self, words: Sequence[str]) -> list[str]:
        """The query words (long enough) that no indexed name contains."""
        return [w for w in words if len(w) >= GRAM_MIN_WORD and w.isalpha()
                and all(self.searcher.doc_freq("text", t) == 0 for t in self._stem.analyze(w))]

    @classmethod
    def for_release(cls, settings: Settings, stamp: tuple[int, str]) -> Bm25Index:
        path = index_root(settings) / _folder_name(stamp)
        if not (path / STAMP).exists():
            raise IndexMissing(f"no BM25 index of release #{stamp[0]} in {path.parent}: run `harmonia vocab index`")
        fmt = json.loads((path / STAMP).read_text()).get("format", 1)
        if fmt != FORMAT:
            raise IndexMissing(f"the BM25 index in {path} has format {fmt}, this version reads {FORMAT}: run "
                               "`harmonia vocab index`")
        return cls(path)

    def share(self, field: str, values: Sequence[str]) -> float:
        """The share of the index's documents whose `field` is one of `values` (cached: an index never changes)."""
        key = (field, tuple(sorted(set(values))))
        if key not in self._shares:
            n = self.searcher.num_docs
            self._shares[key] = sum(self.searcher.doc_freq(field, v) for v in key[1]) / n if n else 1.0
        return self._shares[key]

    def _any_of(self, field: str, values: Sequence[str]) -> tantivy.Query:
        return tantivy.Query.boolean_query(
            [(tantivy.Occur.Should, tantivy.Query.term_query(self.schema, field, v)) for v in values])

    def search(self, text: str, depth: int, *, domains: Sequence[str] | None = None,
               vocabularies: Sequence[str] | None = None) -> list[int]:
        words = normalise(text).split()
        if not words:
            return []
        # Lower-case words only, so AND/OR/NOT in a source name are words, not operators; OR of all words.
        query = self.index.parse_query(" ".join(words), ["text"])
        unknown = self.unknown_words(words) if self.use_grams else []
        if unknown:
            picked: set[str] = set()
            for w in unknown:
                df = {g: self.searcher.doc_freq("grams", g) for g in set(grams([w]))}
                picked |= {g for g in sorted(df, key=lambda g: (df[g], g))[:GRAM_MAX] if df[g]}
            if picked:
                gram_query = tantivy.Query.boolean_query(
                    [(tantivy.Occur.Should, tantivy.Query.term_query(self.schema, "grams", g)) for g in sorted(picked)])
                query = tantivy.Query.boolean_query([(tantivy.Occur.Should, query), (
                    tantivy.Occur.Should, tantivy.Query.boost_query(gram_query, GRAM_BOOST))])
        if domains or vocabularies:
            # A filter clause turns the pure disjunction, which block-max WAND answers reading few postings, into a
            # conjunction that scores every document of every query word: 50-300 ms instead of 2-18 ms at 5M
            # documents (measured). So filters apply after the search (here when asked, and always in SQL), over a
            # deeper window.
            if self.filter_in_index:
                parts = [(tantivy.Occur.Must, query)]
                if domains:
                    parts.append((tantivy.Occur.Must, self._any_of("domain", domains)))
                if vocabularies:
                    parts.append((tantivy.Occur.Must, self._any_of("vocabulary", vocabularies)))
                query = tantivy.Query.boolean_query(parts)
            elif ((self.share("domain", domains) if domains else 1.0)
                  * (self.share("vocabulary", vocabularies) if vocabularies else 1.0)) < self.loose_filter:
                depth *= FILTERED_DEPTH
        hits = self.searcher.search(query, limit=depth, count=False).hits
        ids = self.searcher.fast_field_values("concept_id", [addr for _, addr in hits])
        out: list[int] = []
        seen: set[int] = set()
        for value in ids:
            if value is None:
                continue
            cid = int(value)
            if cid not in seen:
                seen.add(cid)
                out.append(cid)
        return out


class Bm25Generator:
    """Lexical candidates from the BM25 index, re-scored in SQL; falls back to pg_trgm while the index is missing or
    of another release (checked before every search, so a vocabulary load is seen at once)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._index: Bm25Index | None = None
        self._warned: tuple[int, str] | None = None

    def index_for(self, conn: psycopg.Connection) -> Bm25Index | None:
        stamp = release_store.current_stamp(conn)
        if stamp is None:
            return None
        if self._index is not None and self._index.stamp == stamp:
            return self._index
        try:
            self._index = Bm25Index.for_release(self.settings, stamp)
        except IndexMissing as exc:
            self._index = None
            if self._warned != stamp:
                log.warning("lexical search uses pg_trgm: %s", exc)
                self._warned = stamp
        return self._index

    def rows(self, conn: psycopg.Connection, text: str, k: int, *, domains: Sequence[str] | None,
             vocabularies: Sequence[str] | None, boost_name: float, boost_synonym: float,
             threshold: float) -> list[Candidate]:
        index = self.index_for(conn)
        if index is None:
            return lex_store.lexical_search(conn, text, k, domains=domains, vocabularies=vocabularies,
                                            boost_name=boost_name, boost_synonym=boost_synonym, threshold=threshold)
        ids = index.search(text, DEPTH_FACTOR * k, domains=domains, vocabularies=vocabularies)
        return lex_store.rescore(conn, text, ids, k, domains=domains, vocabularies=vocabularies,
                                 boost_name=boost_name, boost_synonym=boost_synonym)
