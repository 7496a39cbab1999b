"""Settings: defaults < TOML file < environment variables < explicit overrides (command-line options).

`Settings` holds one typed section per concern (database, embedding, retrieval, rerank, llm, classifier, router,
worker, review, benchmark); a component receives only the section(s) it uses. Every setting also has a flat key, the
name it has always had (`retrieval_top_k`, `reranker`, `serve_host`): the key of its environment variable
(`HARMONIA_RETRIEVAL_TOP_K`), of the flat TOML form, of `load_settings` overrides, and what `harmonia config show`
and `harmonia config set` print and take. It is `<section>_<field>` unless the field says otherwise (`key=`).

TOML, in any mix (the file is `HARMONIA_CONFIG` if set, else `./harmonia.toml` if present, else
`<data_dir>/harmonia.toml`):
- flat, at top level: `retrieval_top_k = 30`, `reranker = "llm"`;
- sectioned: `[retrieval] top_k = 30`, `[review] host = "0.0.0.0"`;
- the older section style, a table whose name and key join to a flat key: `[llm] provider = "openai"`,
  `[serve] host = "0.0.0.0"`, or any table holding a flat key: `[x] reranker = "llm"`.
`write_settings` (calibration, tuning, `config set`) writes the flat form, which every version of Harmonia reads.
Environment: lists are comma-separated, booleans 1/0/true/false. `docs/configuration.md` is generated from this
module (`harmonia config docs`) and a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
import tomli_w

ENV_PREFIX = "HARMONIA_"

DEFAULT_VOCABULARIES = [
    "SNOMED", "RxNorm", "RxNorm Extension", "LOINC", "ATC", "HCPCS", "CPT4", "UCUM", "Cancer Modifier",
]


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the setting and its source."""


def setting(default: Any, help: str, *, key: str = "") -> Any:
    """A field of a settings section: its default, a one-line help text, and its flat key when that is not
    `<section>_<field>`."""
    meta = {"help": help, "key": key}
    if isinstance(default, list | dict):
        return field(default_factory=default.copy, metadata=meta)  # each Settings gets its own list
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------------------------------------ sections


@dataclass
class DatabaseSettings:
    url: str = setting("", "PostgreSQL URL (needs pgvector). Empty: start the embedded server in data_dir.",
                       key="database_url")
    data_dir: str = setting("", "Where the embedded database, models, checkpoints and caches live. "
                                "Empty: the user data dir (e.g. ~/.local/share/harmonia).", key="data_dir")
    pool_size: int = setting(8, "Largest connection pool per process (API server, worker).", key="db_pool_size")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser() if self.data_dir else Path(platformdirs.user_data_dir("harmonia"))

    def ensure_data_path(self) -> Path:
        p = self.data_path
        p.mkdir(parents=True, exist_ok=True)
        return p


@dataclass
class EmbeddingSettings:
    model: str = setting("", "sentence-transformers model name or path. Empty: the bundled all-MiniLM-L6-v2 "
                             "(offline). E.g. BAAI/bge-base-en-v1.5 with internet.")
    query_prefix: str = setting("auto", "Text put before queries (not documents). 'auto': the BGE retrieval "
                                        "instruction for BGE models, nothing otherwise.")
    batch_size: int = setting(256, "Concepts encoded and written per batch by `harmonia embed`.")
    device: str = setting("auto", "torch device for models: auto (cuda when present), cpu, cuda, mps.")
    dtype: str = setting("float32", "Precision of the encoder's weights: float32, bfloat16, or auto (bfloat16 on a "
                                    "GPU or a CPU with bfloat16 instructions).")
    vocabularies: list[str] = setting(DEFAULT_VOCABULARIES, "vocabulary_id values whose valid standard concepts are "
                                                            "embedded and retrieved.", key="vocabularies")


STORAGES = ("vector", "halfvec")  # pgvector types the HNSW index can keep the vectors in


@dataclass
class RetrievalSettings:
    top_k: int = setting(50, "Candidates retrieved per source term.")
    mode: str = setting("vector", "vector | lexical | hybrid.")
    hnsw_ef_search: int = setting(200, "hnsw.ef_search; must exceed top_k or fewer rows come back.",
                                  key="hnsw_ef_search")
    hnsw_m: int = setting(16, "HNSW m (graph degree) used when the index is built.", key="hnsw_m")
    hnsw_ef_construction: int = setting(128, "HNSW ef_construction used when the index is built.",
                                        key="hnsw_ef_construction")
    hnsw_storage: str = setting("vector", "vector | halfvec: the precision the HNSW index keeps the vectors in "
                                          "(halfvec: half the index's size and memory; the table keeps full "
                                          "precision, and exact search uses it). A change rebuilds the index at "
                                          "the next `harmonia embed`.", key="hnsw_storage")
    hnsw_domain_indexes: list[str] = setting(
        ["auto"], "Domains that get a partial HNSW index of their own, so a search filtered to them (a kind's "
                  "domains: labs -> Measurement) walks only their graph: [\"auto\"] every domain holding under "
                  "a quarter of the model's vectors, a list of domain_ids, or [] none (filtered searches then "
                  "scan the whole index iteratively).", key="hnsw_domain_indexes")
    maintenance_work_mem: str = setting("1GB", "maintenance_work_mem for index builds.", key="maintenance_work_mem")
    hnsw_workers: int = setting(2, "max_parallel_maintenance_workers for HNSW builds (the build's extra processes).",
                                key="hnsw_workers")
    lexical_generator: str = setting("trigram", "Lexical candidate generator: bm25 (a Tantivy index of the release's "
                                                "names and synonyms, built by `harmonia vocab load`; candidates "
                                                "then get the trigram score) or trigram (pg_trgm over the tables).")
    lexical_k: int = setting(100, "Candidates the lexical generator returns before fusion.")
    vector_k: int = setting(100, "Candidates the vector generator returns before fusion.")
    # The fusion defaults are what `harmonia retrieve tune` found on the bundled sample's development part
    # (500 sources, mapping memory built); tune on your own vocabulary and mappings.
    weight_vector: float = setting(0.71, "Fusion weight of the normalised semantic score (vector, memory).")
    weight_lexical: float = setting(0.12, "Fusion weight of the normalised lexical score.")
    weight_rrf: float = setting(0.23, "Fusion weight of reciprocal-rank fusion.")
    rrf_k: float = setting(68.0, "k of reciprocal-rank fusion (1/(k+rank)).")
    boost_name: float = setting(1.0, "Lexical field boost for concept names.")
    boost_synonym: float = setting(0.8, "Lexical field boost for concept synonyms.")
    boost_memory: float = setting(0.95, "Hybrid: a remembered source counts as a name of its target at this share "
                                        "of its similarity (needs `harmonia memory build`; 0: off).")
    parallel: bool = setting(True, "Hybrid: run the lexical query on a second connection while the vector and "
                                   "memory searches run on the first.")
    memory_k: int = setting(20, "Remembered sources whose targets join the hybrid pool (0: memory off).")
    domains: list[str] = setting([], "Only retrieve concepts of these domain_id values (empty: all; a source "
                                     "kind's own domains take precedence when retrieval_kind_filter is on).")
    kind_filter: bool = setting(True, "Retrieve only the domains and target vocabularies that the source's kind "
                                      "expects (harmonia.kinds); off: every domain.")
    # On: measured with no loss on any set, big gains on the lab sets (docs/retrieval.md "Source kinds and text").
    lab_text: bool = setting(True, "For sources of kind labs: rewrite the lab name's specimen prefix, "
                                    "parenthesised specimen, scale and unit hints into LOINC words (\"P -Potassium\" "
                                    "-> \"Potassium in Plasma\") for retrieval and the rerankers (harmonia.text.labs).")
    drug_text: bool = setting(True, "For sources of kind drugs: rewrite strength, dose form and brand in RxNorm's "
                                     "order and units (\"glucose 40% infusion\" -> \"glucose 400 MG/ML Injectable "
                                     "Solution\") for retrieval and the rerankers (harmonia.text.drugs).")


@dataclass
class RerankSettings:
    kind: str = setting("none", "none (retrieval order, similarity as confidence) | llm | classifier.",
                        key="reranker")
    top_n: int = setting(5, "How many ranked candidates a decision keeps.")


@dataclass
class LLMSettings:
    provider: str = setting("anthropic", "anthropic | openai | ollama (openai also serves any OpenAI-compatible "
                                         "server via llm_base_url).")
    model: str = setting("claude-sonnet-4-5", "Model name sent to the provider.")
    base_url: str = setting("", "Provider endpoint override (vLLM, LM Studio, llama.cpp, a proxy).")
    temperature: float = setting(0.0, "Sampling temperature.")
    max_tokens: int = setting(1024, "Largest response, in tokens.")
    timeout_s: float = setting(60.0, "Per-request timeout in seconds.")
    max_retries: int = setting(5, "Retries on rate limits, 5xx and timeouts before the code goes to review.")
    retry_max_wait_s: float = setting(60.0, "Longest single back-off wait, Retry-After included.")
    api_key_env: str = setting("", "Environment variable holding the API key. Empty: the provider's usual one "
                                   "(ANTHROPIC_API_KEY, OPENAI_API_KEY).")
    api_key_file: str = setting("", "File holding the API key (read at start, never logged).")
    prompt_version: str = setting("v1", "Folder under prompts/ holding system.md and rerank_tool.json.")
    concurrency: int = setting(8, "LLM calls in flight per worker process.")
    requests_per_minute: int = setting(0, "Shared request-rate limit per process (0: none).")
    tokens_per_minute: int = setting(0, "Shared token-rate limit per process (0: none).")
    price_input_per_mtok: float = setting(3.0, "Price per million input tokens, for cost reports.")
    price_output_per_mtok: float = setting(15.0, "Price per million output tokens, for cost reports.")
    prices: list[str] = setting([], "Price table for `llm stats`: 'MODEL=INPUT/OUTPUT' per million tokens, e.g. "
                                    "'gpt-4o=2.5/10'. A model not listed is priced at llm_price_input/output_per_"
                                    "mtok when it is llm_model, else reported unpriced.")
    reasoning: str = setting("auto", "Reasoning model (max_completion_tokens, no temperature): auto (by name: "
                                     "o1, o3, o4, gpt-5...; also learnt from the server's refusal) | yes | no.")
    reasoning_effort: str = setting("", "Reasoning effort sent to reasoning models where the provider takes it "
                                        "(OpenAI: minimal, low, medium, high). Empty: not sent.")
    fail_after: int = setting(5, "`harmonia map` stops after this many consecutive fatal or connection errors "
                                 "(bad key, unknown model, server down), leaving the rest pending (0: never).")


@dataclass
class ClassifierSettings:
    base_model: str = setting("", "Base checkpoint for `harmonia reranker train` (HF name or path). Empty: the "
                                  "bundled all-MiniLM-L6-v2.")
    checkpoint: str = setting("", "Trained classifier to use. Empty: <data_dir>/reranker/latest.")
    batch_size: int = setting(64, "Pairs scored per forward pass.")
    max_length: int = setting(64, "Token limit per (source, candidate) pair.")
    dtype: str = setting("auto", "Precision of the classifier's matrix work: auto (bfloat16 where the hardware does "
                                 "it natively: AVX512-BF16/AMX CPUs, recent GPUs), float32, bfloat16.")
    kinds: list[str] = setting([], "Source kinds the classifier ranks; for the others it keeps retrieval order. "
                                   "Empty: the kinds its held-out development sources show it ranks better than "
                                   "retrieval order (kinds.json in the checkpoint); [\"*\"]: every kind.")


@dataclass
class RouterSettings:
    auto_approve_threshold: float = setting(0.5, "A floor: no first choice whose calibrated probability is below it "
                                                 "is auto-approved, whatever its calibration. It approves nothing "
                                                 "by itself: only a threshold certified for the source's kind or "
                                                 "set (`harmonia bench calibrate`, `harmonia calibrate fit`) does.",
                                            key="auto_approve_threshold")
    max_text_len: int = setting(255, "Guard: a source text longer than this (or than twice the longest text its "
                                     "kind was calibrated on, where that is known) is never auto-approved "
                                     "(reason text_too_long).")
    max_retrieval_rank: int = setting(10, "Guard: an LLM's first choice that retrieval ranked below this place is "
                                          "never auto-approved (reason low_retrieval_rank; 0: off).")
    approve_requires: list[str] = setting([], "Guard: what must agree with the first choice before it is "
                                              "auto-approved, any of vector, lexical, memory (retrieval's own "
                                              "first choices), classifier, llm (a second reranker asked only "
                                              "about would-be approvals); else reason disagreement.")


@dataclass
class WorkerSettings:
    batch_size: int = setting(16, "Queue items claimed per batch.")
    lease_s: float = setting(120.0, "Lease length; renewed while working, reclaimed after expiry.")
    max_attempts: int = setting(3, "Failed attempts (decide raised) before an item goes to review; also the "
                                   "least provider failures before one can, and the deaths of a worker holding "
                                   "it alone that make it poison.")
    poll_s: float = setting(2.0, "Poll interval when LISTEN/NOTIFY brings nothing.")
    retry_base_s: float = setting(2.0, "First back-off of an item after a failed attempt or a provider failure; "
                                       "doubles with each one, jittered (half to all of it).")
    retry_max_s: float = setting(300.0, "Cap of that back-off, and of the pause while the provider is down.")
    provider_patience_s: float = setting(1800.0, "A code goes to review because of provider failures (rate limit, "
                                                 "5xx, timeout, connection) only once the provider has failed it "
                                                 "this long and worker_max_attempts times; before, it waits in "
                                                 "the queue.")
    breaker_failures: int = setting(5, "Consecutive provider failures after which a worker stops claiming and "
                                       "probes the provider with one item after a pause (0: never pause).")
    breaker_pause_s: float = setting(10.0, "First pause once the provider is down; doubles after each failed "
                                           "probe, up to worker_retry_max_s.")
    db_patience_s: float = setting(600.0, "How long a worker waits for an unreachable database (retrying with "
                                          "back-off on fresh connections) before it exits non-zero.")
    prune_finished_days: float = setting(30.0, "`harmonia queue prune`: delete finished queue rows older than this "
                                               "(in review or failed only once resolved); negative: keep all.")
    prune_llm_call_days: float = setting(90.0, "`harmonia queue prune`: delete LLM call-log rows older than this; "
                                               "negative: keep all. Concept maps, history and reviews are never "
                                               "pruned.")


@dataclass
class ReviewSettings:
    host: str = setting("127.0.0.1", "Review service bind address.", key="serve_host")
    port: int = setting(8000, "Review service port.", key="serve_port")
    claim_ttl_s: float = setting(900.0, "How long a reviewer's claim on queue items lasts (seconds) unless renewed; "
                                        "others do not get claimed items until it expires.")
    session_ttl_s: float = setting(43200.0, "How long a review page login lasts (seconds): the page trades the API "
                                            "token for a session token that expires and that logging out revokes.")
    max_body_bytes: int = setting(16_000_000, "Largest request body the review service reads (bytes); a larger "
                                              "one gets 413 before authentication.")


@dataclass
class BenchmarkSettings:
    target_precision: float = setting(0.98, "Auto-approved precision the calibration aims for.",
                                      key="bench_target_precision")
    gate_dev_top1: float = setting(0.60, "Gate: development set top-1.", key="bench_gate_dev_top1")
    gate_dev_top5: float = setting(0.85, "Gate: development set top-5.", key="bench_gate_dev_top5")
    gate_hard_top1: float = setting(0.50, "Gate: harder set top-1.", key="bench_gate_hard_top1")
    gate_hard_top5: float = setting(0.75, "Gate: harder set top-5.", key="bench_gate_hard_top5")


@dataclass
class Settings:
    """Every setting, one section per concern (see the module docstring)."""

    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    embedding: EmbeddingSettings = field(default_factory=EmbeddingSettings)
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)
    rerank: RerankSettings = field(default_factory=RerankSettings)
    llm: LLMSettings = field(default_factory=LLMSettings)
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    router: RouterSettings = field(default_factory=RouterSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    review: ReviewSettings = field(default_factory=ReviewSettings)
    benchmark: BenchmarkSettings = field(default_factory=BenchmarkSettings)
    # Source sets and kinds from the TOML file's tables of tables ([sources.ICD9CM] kind = "diagnosis";
    # [kinds.pathology] domains = [...]); harmonia.kinds reads and checks them. Not flat settings.
    source_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    kind_defs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Where each value came from (flat key -> "default" | file path | env var | "override"); not settings.
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    config_file: str = field(default="", repr=False, compare=False)

    @property
    def data_path(self) -> Path:
        return self.database.data_path

    def get(self, key: str) -> Any:
        """A setting's value by its flat key (or section.field)."""
        spec = spec_for(key)
        return getattr(getattr(self, spec.section), spec.name)

    def _set(self, spec: SettingSpec, value: Any, source: str) -> None:
        setattr(getattr(self, spec.section), spec.name, spec.coerce(value, source))
        self.sources[spec.key] = source


# ------------------------------------------------------------------------------------------------ the registry


@dataclass(frozen=True, eq=False)  # one object per setting: compared and hashed by identity
class SettingSpec:
    """One setting: where it lives (section, name), its flat key, type, default and help."""

    section: str
    name: str
    key: str
    type: Any
    default: Any
    help: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    def coerce(self, value: Any, source: str) -> Any:
        hint = self.type
        try:
            if hint is bool:
                if isinstance(value, str):
                    if value.lower() in ("1", "true", "yes", "on"):
                        return True
                    if value.lower() in ("0", "false", "no", "off", ""):
                        return False
                    raise ValueError(value)
                return bool(value)
            if hint in (int, float, str):
                if hint is int and isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                return hint(value)
            if typing.get_origin(hint) is list:
                if isinstance(value, str):
                    return [v.strip() for v in value.split(",") if v.strip()]
                return [str(v) for v in value]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"setting {self.key!r} from {source}: cannot read {value!r} as {hint}") from exc
        return value


NOT_SECTIONS = ("source_sets", "kind_defs", "sources", "config_file")
# TOML tables of tables that are not settings: [sources.X] (a source set's kind) and [kinds.NAME] (a kind).
TABLES_OF_TABLES = {"sources": "source_sets", "kinds": "kind_defs"}

SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Settings)[f.name] for f in dataclasses.fields(Settings)
                             if f.name not in NOT_SECTIONS}


def _specs() -> list[SettingSpec]:
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            out.append(SettingSpec(section=section, name=f.name, key=f.metadata["key"] or f"{section}_{f.name}",
                                   type=hints[f.name], default=getattr(defaults, f.name), help=f.metadata["help"]))
    return out


SPECS: list[SettingSpec] = _specs()
_BY_KEY = {s.key: s for s in SPECS}
_BY_PATH = {(s.section, s.name): s for s in SPECS}
assert len(_BY_KEY) == len(SPECS), "two settings share a flat key"


def setting_specs() -> list[SettingSpec]:
    """Every setting, in section order (what `config show` and docs/configuration.md list)."""
    return list(SPECS)


def spec_for(name: str) -> SettingSpec:
    """The setting a flat key (`retrieval_top_k`) or a `section.field` path (`retrieval.top_k`) names."""
    if name in _BY_KEY:
        return _BY_KEY[name]
    section, _, field_name = name.partition(".")
    if (section, field_name) in _BY_PATH:
        return _BY_PATH[(section, field_name)]
    raise ConfigError(f"unknown setting {name!r}")


def _table_spec(table: str, name: str) -> SettingSpec | None:
    """What `name` under TOML table `[table]` sets: the section's field, else the flat key table_name (the older
    section style, `[llm] provider`), else the flat key name."""
    return _BY_PATH.get((table, name)) or _BY_KEY.get(f"{table}_{name}") or _BY_KEY.get(name)


def _read_toml(doc: dict[str, Any], path: Path) -> dict[SettingSpec, Any]:
    out: dict[SettingSpec, Any] = {}
    for key, value in doc.items():
        if key in TABLES_OF_TABLES:
            continue  # read by _read_tables
        if isinstance(value, dict):
            for sub, v in value.items():
                spec = _table_spec(key, sub)
                if spec is None:
                    raise ConfigError(f"{path}: unknown setting [{key}] {sub}")
                out[spec] = v
        else:
            if key not in _BY_KEY:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            out[_BY_KEY[key]] = value
    return out


def _read_tables(doc: dict[str, Any], path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """[sources.X] and [kinds.NAME]: attribute name -> {X: {key: value}}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, attr in TABLES_OF_TABLES.items():
        tables = doc.get(key, {})
        if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
            raise ConfigError(f"{path}: [{key}] must hold tables, e.g. [{key}.NAME]")
        out[attr] = {str(k): dict(v) for k, v in tables.items()}
    return out


# ------------------------------------------------------------------------------------------------ loading


def config_file_path(settings_data_dir: str | None = None) -> Path:
    if os.environ.get(ENV_PREFIX + "CONFIG"):  # write_settings targets the file the user named
        return Path(os.environ[ENV_PREFIX + "CONFIG"]).expanduser()
    local = Path("harmonia.toml")
    if local.exists():
        return local
    base = Path(settings_data_dir).expanduser() if settings_data_dir else Path(
        platformdirs.user_data_dir("harmonia"))
    return base / "harmonia.toml"


def load_settings(overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Settings:
    """Build Settings from defaults, the TOML file, the environment, then explicit overrides (flat keys or
    section.field paths)."""
    env = dict(os.environ if env is None else env)
    s = Settings()
    for spec in SPECS:
        s.sources[spec.key] = "default"
    # data_dir decides where the default config file lives, so read it from the env first.
    given = overrides or {}
    data_dir_env = (str(given.get("data_dir") or given.get("database.data_dir") or "")
                    or env.get(ENV_PREFIX + "DATA_DIR"))
    cfg = env.get(ENV_PREFIX + "CONFIG")
    path: Path | None
    if cfg == "":
        path = None  # explicitly no config file (tests, scripts)
    elif cfg:
        path = Path(cfg).expanduser()
        if not path.exists():
            raise ConfigError(f"HARMONIA_CONFIG points at {path}, which does not exist")
    else:
        path = config_file_path(data_dir_env)
    s.config_file = str(path or "")
    if path is not None and path.exists():
        try:
            doc = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        for spec, value in _read_toml(doc, path).items():
            s._set(spec, value, str(path))
        for attr, tables in _read_tables(doc, path).items():
            setattr(s, attr, tables)
    for spec in SPECS:
        if spec.env in env:
            s._set(spec, env[spec.env], spec.env)
    for name, value in (overrides or {}).items():
        s._set(spec_for(name), value, "override")
    validate(s)
    return s


def validate(s: Settings) -> None:
    if s.rerank.kind not in ("none", "llm", "classifier"):
        raise ConfigError(f"setting 'reranker' ({s.sources.get('reranker')}): {s.rerank.kind!r} is not one of "
                          "none, llm, classifier")
    if s.retrieval.mode not in ("vector", "lexical", "hybrid"):
        raise ConfigError(f"setting 'retrieval_mode': {s.retrieval.mode!r} is not vector, lexical or hybrid")
    if s.embedding.dtype not in ("float32", "bfloat16", "auto"):
        raise ConfigError(f"setting 'embedding_dtype': {s.embedding.dtype!r} is not float32, bfloat16 or auto")
    if s.retrieval.hnsw_storage not in STORAGES:
        raise ConfigError(f"setting 'hnsw_storage': {s.retrieval.hnsw_storage!r} is not vector or halfvec")
    if s.retrieval.lexical_generator not in ("bm25", "trigram"):
        raise ConfigError(f"setting 'retrieval_lexical_generator': {s.retrieval.lexical_generator!r} is not bm25 or "
                          "trigram")
    if not 0.0 <= s.router.auto_approve_threshold <= 1.0:
        raise ConfigError(f"setting 'auto_approve_threshold': {s.router.auto_approve_threshold} is outside 0..1")
    if s.retrieval.top_k < 1:
        raise ConfigError("setting 'retrieval_top_k' must be at least 1")


def write_settings(updates: dict[str, Any], path: Path | None = None) -> Path:
    """Write settings (flat keys or section.field paths) into the TOML config file, keeping what else it holds
    (used by calibrate, tune and `config set`). The file is written in the flat form, which every version reads;
    a file in the sectioned form is rewritten flat, with the same values."""
    path = path or config_file_path(os.environ.get(ENV_PREFIX + "DATA_DIR"))
    doc: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
    flat = {spec.key: value for spec, value in _read_toml(doc, path).items()}
    for name, value in updates.items():
        spec = spec_for(name)
        flat[spec.key] = spec.coerce(value, "write_settings")
    out: dict[str, Any] = dict(sorted(flat.items()))
    for key in TABLES_OF_TABLES:  # [sources.X], [kinds.NAME]: kept as they are
        if doc.get(key):
            out[key] = doc[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(tomli_w.dumps(out))
    tmp.replace(path)
    return path


def docs_markdown() -> str:
    """docs/configuration.md."""
    lines = [
        "# Configuration",
        "",
        "Generated from `harmonia/config.py` by `harmonia config docs`; do not edit by hand.",
        "",
        "Order: defaults < TOML file < environment < command-line options. The TOML file is `$HARMONIA_CONFIG`,",
        "else `./harmonia.toml`, else `<data_dir>/harmonia.toml`.",
        "",
        "Every setting has a flat key (the first column): the name of its environment variable (`HARMONIA_` + the",
        "key in upper case; lists comma-separated, booleans 1/0/true/false), of `harmonia config show` and",
        "`harmonia config set KEY VALUE`, and of the flat TOML form. In code, settings are grouped into sections",
        "(`settings.retrieval.top_k`); the second column is the section and field. In TOML any of these work,",
        "mixed as you like:",
        "",
        "```toml",
        "reranker = \"llm\"              # flat, at top level",
        "",
        "[retrieval]                   # sectioned: [section] field",
        "top_k = 30",
        "",
        "[llm]                         # the older section style: [llm] provider = llm_provider,",
        "provider = \"openai\"           # [serve] host = serve_host, [bench] gate_dev_top1 = bench_gate_dev_top1",
        "```",
        "",
        "`harmonia bench calibrate`, `harmonia retrieve tune` and `harmonia config set` write the flat form (every",
        "version of Harmonia reads it); they keep the file's other values and rewrite a sectioned file flat.",
        "",
        "| setting (flat key) | section.field | environment variable | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for spec in SPECS:
        d = spec.default
        shown = ", ".join(d) if isinstance(d, list) else d
        lines.append(f"| `{spec.key}` | `{spec.section}.{spec.name}` | `{spec.env}` | `{shown!s}` | {spec.help} |")
    return "\n".join(lines) + "\n"
