"""Settings: defaults < TOML file < environment variables.

Every setting is a field of `Settings` with its default and a one-line help text; `docs/configuration.md` is
generated from this class (`harmonia config docs`) and a test keeps the two in step.

TOML: top-level keys use the field name (`reranker = "llm"`), or a section plus key where the field name starts
with the section (`[llm] provider = "openai"` sets `llm_provider`). Environment: `HARMONIA_<FIELD>` in upper case
(`HARMONIA_LLM_PROVIDER=openai`); lists are comma-separated, booleans 1/0/true/false.
The TOML file is `HARMONIA_CONFIG` if set, else `./harmonia.toml` if present, else `<data_dir>/harmonia.toml`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field, fields
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


def _f(default: Any, help: str, section: str = "", **kw: Any) -> Any:
    meta = {"help": help, "section": section}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class Settings:
    # --- storage ---
    database_url: str = _f("", "PostgreSQL URL (needs pgvector). Empty: start the embedded server in data_dir.",
                           "database")
    data_dir: str = _f("", "Where the embedded database, models, checkpoints and caches live. "
                           "Empty: the user data dir (e.g. ~/.local/share/harmonia).", "database")
    db_pool_size: int = _f(8, "Largest connection pool per process (API server, worker).", "database")
    # --- embedding ---
    embedding_model: str = _f("", "sentence-transformers model name or path. Empty: the bundled "
                                  "all-MiniLM-L6-v2 (offline). E.g. BAAI/bge-base-en-v1.5 with internet.",
                              "embedding")
    embedding_query_prefix: str = _f("auto", "Text put before queries (not documents). 'auto': the BGE "
                                             "retrieval instruction for BGE models, nothing otherwise.",
                                     "embedding")
    embedding_batch_size: int = _f(256, "Concepts encoded and written per batch by `harmonia embed`.",
                                   "embedding")
    embedding_device: str = _f("auto", "torch device for models: auto (cuda when present), cpu, cuda, mps.",
                               "embedding")
    vocabularies: list[str] = _f(DEFAULT_VOCABULARIES, "vocabulary_id values whose valid standard concepts "
                                                       "are embedded and retrieved.", "embedding")
    # --- retrieval ---
    retrieval_top_k: int = _f(50, "Candidates retrieved per source term.", "retrieval")
    retrieval_mode: str = _f("vector", "vector | lexical | hybrid.", "retrieval")
    hnsw_ef_search: int = _f(200, "hnsw.ef_search; must exceed top_k or fewer rows come back.", "retrieval")
    hnsw_m: int = _f(16, "HNSW m (graph degree) used when the index is built.", "retrieval")
    hnsw_ef_construction: int = _f(128, "HNSW ef_construction used when the index is built.", "retrieval")
    maintenance_work_mem: str = _f("1GB", "maintenance_work_mem for index builds.", "retrieval")
    retrieval_lexical_k: int = _f(100, "Candidates the lexical generator returns before fusion.", "retrieval")
    retrieval_vector_k: int = _f(100, "Candidates the vector generator returns before fusion.", "retrieval")
    # The fusion defaults are what `harmonia retrieve tune` found on the bundled sample's development part
    # (500 sources, mapping memory built); tune on your own vocabulary and mappings.
    retrieval_weight_vector: float = _f(0.71, "Fusion weight of the normalised semantic score (vector, memory).",
                                        "retrieval")
    retrieval_weight_lexical: float = _f(0.12, "Fusion weight of the normalised lexical score.", "retrieval")
    retrieval_weight_rrf: float = _f(0.23, "Fusion weight of reciprocal-rank fusion.", "retrieval")
    retrieval_rrf_k: float = _f(68.0, "k of reciprocal-rank fusion (1/(k+rank)).", "retrieval")
    retrieval_boost_name: float = _f(1.0, "Lexical field boost for concept names.", "retrieval")
    retrieval_boost_synonym: float = _f(0.8, "Lexical field boost for concept synonyms.", "retrieval")
    retrieval_boost_memory: float = _f(0.95, "Hybrid: a remembered source counts as a name of its target at this "
                                             "share of its similarity (needs `harmonia memory build`; 0: off).",
                                       "retrieval")
    retrieval_parallel: bool = _f(True, "Hybrid: run the lexical query on a second connection while the vector and "
                                        "memory searches run on the first.", "retrieval")
    retrieval_memory_k: int = _f(20, "Remembered sources whose targets join the hybrid pool (0: memory off).",
                                 "retrieval")
    retrieval_domains: list[str] = _f([], "Only retrieve concepts of these domain_id values (empty: all).",
                                      "retrieval")
    # --- reranking ---
    reranker: str = _f("none", "none (retrieval order, similarity as confidence) | llm | classifier.",
                       "rerank")
    rerank_top_n: int = _f(5, "How many ranked candidates a decision keeps.", "rerank")
    # --- LLM ---
    llm_provider: str = _f("anthropic", "anthropic | openai | ollama (openai also serves any "
                                        "OpenAI-compatible server via llm_base_url).", "llm")
    llm_model: str = _f("claude-sonnet-4-5", "Model name sent to the provider.", "llm")
    llm_base_url: str = _f("", "Provider endpoint override (vLLM, LM Studio, llama.cpp, a proxy).", "llm")
    llm_temperature: float = _f(0.0, "Sampling temperature.", "llm")
    llm_max_tokens: int = _f(1024, "Largest response, in tokens.", "llm")
    llm_timeout_s: float = _f(60.0, "Per-request timeout in seconds.", "llm")
    llm_max_retries: int = _f(5, "Retries on rate limits, 5xx and timeouts before the code goes to review.",
                              "llm")
    llm_retry_max_wait_s: float = _f(60.0, "Longest single back-off wait, Retry-After included.", "llm")
    llm_api_key_env: str = _f("", "Environment variable holding the API key. Empty: the provider's usual one "
                                  "(ANTHROPIC_API_KEY, OPENAI_API_KEY).", "llm")
    llm_api_key_file: str = _f("", "File holding the API key (read at start, never logged).", "llm")
    llm_prompt_version: str = _f("v1", "Folder under prompts/ holding system.md and rerank_tool.json.", "llm")
    llm_concurrency: int = _f(8, "LLM calls in flight per worker process.", "llm")
    llm_requests_per_minute: int = _f(0, "Shared request-rate limit per process (0: none).", "llm")
    llm_tokens_per_minute: int = _f(0, "Shared token-rate limit per process (0: none).", "llm")
    llm_price_input_per_mtok: float = _f(3.0, "Price per million input tokens, for cost reports.", "llm")
    llm_price_output_per_mtok: float = _f(15.0, "Price per million output tokens, for cost reports.", "llm")
    # --- classifier reranker ---
    classifier_base_model: str = _f("", "Base checkpoint for `harmonia reranker train` (HF name or path). "
                                         "Empty: the bundled all-MiniLM-L6-v2.", "classifier")
    classifier_checkpoint: str = _f("", "Trained classifier to use. Empty: <data_dir>/reranker/latest.",
                                    "classifier")
    classifier_batch_size: int = _f(64, "Pairs scored per forward pass.", "classifier")
    classifier_max_length: int = _f(64, "Token limit per (source, candidate) pair.", "classifier")
    classifier_dtype: str = _f("auto", "Precision of the classifier's matrix work: auto (bfloat16 where the "
                                       "hardware does it natively: AVX512-BF16/AMX CPUs, recent GPUs), float32, "
                                       "bfloat16.", "classifier")
    # --- routing ---
    auto_approve_threshold: float = _f(0.9, "Confidence at or above which a top-1 is auto-approved "
                                            "(`harmonia bench calibrate` sets it).", "router")
    # --- worker ---
    worker_batch_size: int = _f(16, "Queue items claimed per batch.", "worker")
    worker_lease_s: float = _f(120.0, "Lease length; renewed while working, reclaimed after expiry.", "worker")
    worker_max_attempts: int = _f(3, "Failed attempts before an item goes to review.", "worker")
    worker_poll_s: float = _f(2.0, "Poll interval when LISTEN/NOTIFY brings nothing.", "worker")
    # --- review service ---
    serve_host: str = _f("127.0.0.1", "Review service bind address.", "serve")
    serve_port: int = _f(8000, "Review service port.", "serve")
    # --- benchmark ---
    bench_target_precision: float = _f(0.98, "Auto-approved precision the calibration aims for.", "bench")
    bench_gate_dev_top1: float = _f(0.60, "Gate: development set top-1.", "bench")
    bench_gate_dev_top5: float = _f(0.85, "Gate: development set top-5.", "bench")
    bench_gate_hard_top1: float = _f(0.50, "Gate: harder set top-1.", "bench")
    bench_gate_hard_top5: float = _f(0.75, "Gate: harder set top-5.", "bench")

    # Where each value came from (field -> "default" | file path | env var); not a setting.
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False,
                                    metadata={"internal": True})
    config_file: str = field(default="", repr=False, compare=False, metadata={"internal": True})

    # ---- derived paths ----
    @property
    def data_path(self) -> Path:
        p = Path(self.data_dir).expanduser() if self.data_dir else Path(platformdirs.user_data_dir("harmonia"))
        return p

    def ensure_data_path(self) -> Path:
        p = self.data_path
        p.mkdir(parents=True, exist_ok=True)
        return p


def setting_fields() -> list[dataclasses.Field]:
    return [f for f in fields(Settings) if not f.metadata.get("internal")]


_HINTS = typing.get_type_hints(Settings)


def _coerce(name: str, value: Any, source: str) -> Any:
    hint = _HINTS[name]
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
        raise ConfigError(f"setting {name!r} from {source}: cannot read {value!r} as {hint}") from exc
    return value


def config_file_path(settings_data_dir: str | None = None) -> Path:
    if os.environ.get(ENV_PREFIX + "CONFIG"):  # write_settings targets the file the user named
        return Path(os.environ[ENV_PREFIX + "CONFIG"]).expanduser()
    local = Path("harmonia.toml")
    if local.exists():
        return local
    base = Path(settings_data_dir).expanduser() if settings_data_dir else Path(
        platformdirs.user_data_dir("harmonia"))
    return base / "harmonia.toml"


def _flatten_toml(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    names = {f.name for f in setting_fields()}
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                full = f"{key}_{sub}" if f"{key}_{sub}" in names else sub
                if full not in names:
                    raise ConfigError(f"{path}: unknown setting [{key}] {sub}")
                out[full] = v
        else:
            if key not in names:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            out[key] = value
    return out


def load_settings(overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Settings:
    """Build Settings from defaults, the TOML file, the environment, then explicit overrides."""
    env = dict(os.environ if env is None else env)
    s = Settings()
    for f in setting_fields():
        s.sources[f.name] = "default"
    # data_dir decides where the default config file lives, so read it from the env first.
    data_dir_env = str((overrides or {}).get("data_dir") or "") or env.get(ENV_PREFIX + "DATA_DIR")
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
        for name, value in _flatten_toml(doc, path).items():
            setattr(s, name, _coerce(name, value, str(path)))
            s.sources[name] = str(path)
    for f in setting_fields():
        key = ENV_PREFIX + f.name.upper()
        if key in env:
            setattr(s, f.name, _coerce(f.name, env[key], key))
            s.sources[f.name] = key
    for name, value in (overrides or {}).items():
        if name not in _HINTS or name in ("sources", "config_file"):
            raise ConfigError(f"unknown setting {name!r}")
        setattr(s, name, _coerce(name, value, "override"))
        s.sources[name] = "override"
    validate(s)
    return s


def validate(s: Settings) -> None:
    if s.reranker not in ("none", "llm", "classifier"):
        raise ConfigError(f"setting 'reranker' ({s.sources.get('reranker')}): {s.reranker!r} is not one of "
                          "none, llm, classifier")
    if s.retrieval_mode not in ("vector", "lexical", "hybrid"):
        raise ConfigError(f"setting 'retrieval_mode': {s.retrieval_mode!r} is not vector, lexical or hybrid")
    if not 0.0 <= s.auto_approve_threshold <= 1.0:
        raise ConfigError(f"setting 'auto_approve_threshold': {s.auto_approve_threshold} is outside 0..1")
    if s.retrieval_top_k < 1:
        raise ConfigError("setting 'retrieval_top_k' must be at least 1")


def write_settings(updates: dict[str, Any], path: Path | None = None) -> Path:
    """Write settings into the TOML config file, keeping what else it holds (used by calibrate and tune)."""
    path = path or config_file_path(os.environ.get(ENV_PREFIX + "DATA_DIR"))
    doc: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
    flat = _flatten_toml(doc, path) if doc else {}
    for name, value in updates.items():
        if name not in _HINTS:
            raise ConfigError(f"unknown setting {name!r}")
        flat[name] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(tomli_w.dumps(dict(sorted(flat.items()))))
    tmp.replace(path)
    return path


def docs_markdown() -> str:
    """The table in docs/configuration.md."""
    lines = [
        "# Configuration",
        "",
        "Generated from `harmonia/config.py` by `harmonia config docs`; do not edit by hand.",
        "",
        "Order: defaults < TOML file < environment < command-line options. The TOML file is `$HARMONIA_CONFIG`,",
        "else `./harmonia.toml`, else `<data_dir>/harmonia.toml`. A setting `llm_provider` is written",
        "`llm_provider = \"openai\"` at top level or `provider = \"openai\"` under `[llm]`, and in the",
        "environment `HARMONIA_LLM_PROVIDER=openai` (lists comma-separated).",
        "",
        "| setting | environment variable | default | meaning |",
        "|---|---|---|---|",
    ]
    defaults = Settings()
    for f in setting_fields():
        d = getattr(defaults, f.name)
        shown = ", ".join(d) if isinstance(d, list) else d
        lines.append(f"| `{f.name}` | `{ENV_PREFIX}{f.name.upper()}` | `{shown!s}` | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"
