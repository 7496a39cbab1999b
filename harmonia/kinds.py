"""Source kinds: what each source set is, so that retrieval searches the right domains and the calibration and the
guards know what a first choice may be (issue 14 point 2).

A source vocabulary's kind comes from, strongest first: the configuration's `[sources.X]` table (`kind = "labs"`,
optionally its own `domains`, `retrieve_domains`, `vocabularies`), a declaration stored in the database
(`harmonia map FILE --source-vocab X --kind labs`, `harmonia kinds set X labs`), the built-in kinds of well-known
source vocabularies (ICD10 -> diagnosis, NDC -> drugs, ...), else `unknown`: no retrieval filter, and no
calibration covers it, so nothing of it is auto-approved until its kind is declared and calibrated, or the set is
calibrated from reviews. A kind may be defined in the configuration too (`[kinds.pathology] domains = [...]`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from harmonia.domain import SourceKind
from harmonia.store import kinds as kinds_store

if TYPE_CHECKING:
    import psycopg

    from harmonia.config import Settings

UNKNOWN = SourceKind("unknown")

# Expected domains are what OMOP's own maps of such sets point at (measured on the sample's 'Maps to' and the
# development sets: ICD10 -> Condition 82%, Observation 16%, Procedure 1%, Measurement 1%); retrieval searches a
# little wider than what may be approved, so a rarer target domain is still found and shown to a reviewer.
BUILTIN_KINDS: dict[str, SourceKind] = {k.name: k for k in (
    SourceKind("diagnosis", ("Condition", "Observation"), ("Condition", "Observation", "Procedure", "Measurement")),
    SourceKind("procedure", ("Procedure", "Observation", "Measurement"),
               ("Procedure", "Observation", "Measurement", "Condition")),
    SourceKind("labs", ("Measurement",), ("Measurement",)),
    SourceKind("drugs", ("Drug",), ("Drug", "Observation", "Device")),  # foods and devices: shown, never approved
    SourceKind("admission", ("Condition", "Procedure", "Observation"), ("Condition", "Procedure", "Observation")),
    SourceKind("microbiology", ("Observation", "Measurement"),
               ("Observation", "Measurement", "Specimen", "Condition", "Meas Value")),
    SourceKind("units", ("Unit",), ("Unit",)),
    SourceKind("routes", ("Route",), ("Route",)),
    UNKNOWN,
)}

BUILTIN_SOURCE_VOCABS: dict[str, str] = {
    **dict.fromkeys(("ICD10", "ICD10CM", "ICD10GM", "ICD10CN", "ICD9CM", "KCD7", "CIM10", "Read"), "diagnosis"),
    **dict.fromkeys(("ICD9Proc", "ICD10PCS", "CPT4", "HCPCS", "OPCS4"), "procedure"),
    **dict.fromkeys(("NDC", "SPL", "GCN_SEQNO", "Multum", "dm+d", "BDPM", "AMT", "DPD", "GGR"), "drugs"),
    "UCUM": "units",
}


class KindError(ValueError):
    """A kind or a source set's declaration cannot be used (the message names it)."""


def _tuple(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise KindError(f"{where}: expected a list of names, got {value!r}")
    return tuple(value)


def _kind_from_table(name: str, table: Mapping[str, Any], base: SourceKind | None, where: str) -> SourceKind:
    unknown = set(table) - {"kind", "domains", "retrieve_domains", "vocabularies"}
    if unknown:
        raise KindError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    k = base or SourceKind(name)
    if "domains" in table:
        domains = _tuple(table["domains"], f"{where} domains")
        k = replace(k, domains=domains, retrieve_domains=k.retrieve_domains if base else domains)
    if "retrieve_domains" in table:
        k = replace(k, retrieve_domains=_tuple(table["retrieve_domains"], f"{where} retrieve_domains"))
    if "vocabularies" in table:
        k = replace(k, vocabularies=_tuple(table["vocabularies"], f"{where} vocabularies"))
    return k


@dataclass
class KindRegistry:
    """Which kind each source vocabulary has (see the module docstring)."""

    kinds: dict[str, SourceKind] = field(default_factory=lambda: dict(BUILTIN_KINDS))
    configured: dict[str, SourceKind] = field(default_factory=dict)   # [sources.X]
    declared: dict[str, str] = field(default_factory=dict)            # the database's declarations
    # Declarations are re-read every refresh_s seconds, so a long-lived worker sees a newly declared kind.
    conn: psycopg.Connection | None = field(default=None, repr=False)
    refresh_s: float = 60.0
    loaded_at: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings, conn: psycopg.Connection | None = None) -> KindRegistry:
        reg = cls(conn=conn)
        for name, table in settings.kind_defs.items():
            reg.kinds[name] = _kind_from_table(name, table, BUILTIN_KINDS.get(name), f"[kinds.{name}]")
        for vocab, table in settings.source_sets.items():
            kind_name = table.get("kind")
            if not isinstance(kind_name, str) or not kind_name:
                raise KindError(f"[sources.{vocab}]: needs kind = \"...\" (one of {', '.join(sorted(reg.kinds))})")
            base = reg.kinds.get(kind_name)
            if base is None and "domains" not in table:
                raise KindError(f"[sources.{vocab}]: kind {kind_name!r} is neither built in nor defined in "
                                f"[kinds.{kind_name}]; give it domains = [...]")
            k = _kind_from_table(kind_name, {x: v for x, v in table.items() if x != "kind"}, base,
                                 f"[sources.{vocab}]")
            reg.configured[vocab] = k
        reg.refresh()
        return reg

    def refresh(self) -> None:
        if self.conn is not None:
            self.declared = kinds_store.declared(self.conn)
            self.loaded_at = time.monotonic()

    def refresh_if_due(self) -> None:
        if self.conn is not None and time.monotonic() - self.loaded_at >= self.refresh_s:
            self.refresh()

    def kind_named(self, name: str) -> SourceKind:
        if name not in self.kinds:
            raise KindError(f"unknown kind {name!r}: one of {', '.join(sorted(self.kinds))}, or define it in "
                            f"the configuration ([kinds.{name}] domains = [...])")
        return self.kinds[name]

    def kind_of(self, source_vocab: str) -> SourceKind:
        if source_vocab in self.configured:
            return self.configured[source_vocab]
        name = self.declared.get(source_vocab) or BUILTIN_SOURCE_VOCABS.get(source_vocab)
        return self.kinds.get(name, UNKNOWN) if name else UNKNOWN

    def origin_of(self, source_vocab: str) -> str:
        if source_vocab in self.configured:
            return "configuration"
        if source_vocab in self.declared:
            return "declared"
        return "built-in" if source_vocab in BUILTIN_SOURCE_VOCABS else "none"

    def declare(self, conn: psycopg.Connection, source_vocab: str, kind: str, declared_by: str = "") -> SourceKind:
        """Store `source_vocab`'s kind (a known kind's name). The configuration still wins where it names the set."""
        k = self.kind_named(kind)
        kinds_store.declare(conn, source_vocab, kind, declared_by)
        self.declared[source_vocab] = kind
        return k


def builtin_kind_of(source_vocab: str) -> SourceKind:
    """The kind without configuration or database (tests, scripts)."""
    return KindRegistry().kind_of(source_vocab)
