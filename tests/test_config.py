"""Settings: defaults, TOML (flat and sectioned), environment, validation, the generated reference."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from harmonia.config import (
    SECTIONS,
    ConfigError,
    Settings,
    docs_markdown,
    load_settings,
    setting_specs,
    spec_for,
    write_settings,
)

REPO = Path(__file__).resolve().parent.parent


def test_defaults_without_file_or_env() -> None:
    s = load_settings(env={"HARMONIA_CONFIG": ""})
    assert s.rerank.kind == "none" and s.retrieval.top_k == 50 and s.router.auto_approve_threshold == 0.5
    assert "SNOMED" in s.embedding.vocabularies and s.sources["reranker"] == "default"


def test_toml_sections_then_env_override(tmp_path: Path) -> None:
    cfg = tmp_path / "h.toml"
    cfg.write_text('reranker = "llm"\n[llm]\nprovider = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
                   '[retrieval]\ntop_k = 30\n[router]\nauto_approve_threshold = 0.95\n')
    s = load_settings(env={"HARMONIA_CONFIG": str(cfg), "HARMONIA_LLM_PROVIDER": "ollama",
                           "HARMONIA_VOCABULARIES": "SNOMED, LOINC"})
    assert (s.rerank.kind, s.llm.base_url, s.retrieval.top_k, s.router.auto_approve_threshold) == \
        ("llm", "http://127.0.0.1:9/v1", 30, 0.95)
    assert s.llm.provider == "ollama" and s.sources["llm_provider"] == "HARMONIA_LLM_PROVIDER"
    assert s.embedding.vocabularies == ["SNOMED", "LOINC"]


@pytest.mark.parametrize(("env", "message"), [
    ({"HARMONIA_RETRIEVAL_TOP_K": "fifty"}, "retrieval_top_k' from HARMONIA_RETRIEVAL_TOP_K"),
    ({"HARMONIA_RERANKER": "magic"}, "'magic' is not one of none, llm, classifier"),
    ({"HARMONIA_AUTO_APPROVE_THRESHOLD": "1.5"}, "outside 0..1"),
    ({"HARMONIA_CONFIG": "/nonexistent/h.toml"}, "does not exist"),
])
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env={"HARMONIA_CONFIG": "", **env})


def test_unknown_toml_key_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "h.toml"
    cfg.write_text("[llm]\nflavour = 'x'\n")
    with pytest.raises(ConfigError, match=r"unknown setting \[llm\] flavour"):
        load_settings(env={"HARMONIA_CONFIG": str(cfg)})


def test_write_settings_keeps_other_values(tmp_path: Path) -> None:
    cfg = tmp_path / "h.toml"
    cfg.write_text('[llm]\nprovider = "openai"\n')
    write_settings({"auto_approve_threshold": 0.97}, cfg)
    s = load_settings(env={"HARMONIA_CONFIG": str(cfg)})
    assert s.router.auto_approve_threshold == 0.97 and s.llm.provider == "openai"


def test_reference_doc_lists_every_setting() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert doc == docs_markdown(), "docs/configuration.md is stale: run `harmonia config docs -o docs/configuration.md`"
    for spec in setting_specs():
        assert f"`{spec.key}`" in doc and spec.help
    assert len(setting_specs()) == sum(len(dataclasses.fields(cls)) for cls in SECTIONS.values())


# ------------------------------------------------------------------------------------ sections and flat keys


def test_every_flat_key_works_as_env_var_override_and_toml_key(tmp_path: Path) -> None:
    """The names settings have always had keep working everywhere; each lands in its section."""
    for spec in setting_specs():
        value = {"bool": "false", "int": "7", "float": "0.5"}.get(getattr(spec.type, "__name__", ""), "x")
        if spec.key == "reranker":
            value = "llm"
        elif spec.key == "retrieval_mode":
            value = "lexical"
        elif spec.key == "embedding_dtype":
            value = "bfloat16"
        elif spec.key == "retrieval_lexical_generator":
            value = "bm25"
        elif spec.key == "hnsw_storage":
            value = "halfvec"
        expected = spec.coerce(value, "test")
        from_env = load_settings(env={"HARMONIA_CONFIG": "", spec.env: value})
        assert getattr(getattr(from_env, spec.section), spec.name) == expected, spec.key
        assert from_env.sources[spec.key] == spec.env
        assert load_settings({spec.key: value}, env={"HARMONIA_CONFIG": ""}).get(spec.key) == expected
        assert load_settings({f"{spec.section}.{spec.name}": value}, env={"HARMONIA_CONFIG": ""}).get(
            spec.key) == expected
        cfg = tmp_path / f"{spec.key}.toml"
        write_settings({spec.key: value}, cfg)
        assert load_settings(env={"HARMONIA_CONFIG": str(cfg)}).get(spec.key) == expected, spec.key


def test_sectioned_and_older_section_styles_agree(tmp_path: Path) -> None:
    cfg = tmp_path / "h.toml"
    cfg.write_text('[review]\nhost = "0.0.0.0"\nport = 9000\n[benchmark]\ngate_dev_top1 = 0.7\n'
                   '[rerank]\nkind = "classifier"\ntop_n = 3\n[database]\npool_size = 4\n')
    new = load_settings(env={"HARMONIA_CONFIG": str(cfg)})
    old = tmp_path / "old.toml"
    old.write_text('serve_port = 9000\nbench_gate_dev_top1 = 0.7\nreranker = "classifier"\ndb_pool_size = 4\n'
                   '[serve]\nhost = "0.0.0.0"\n[rerank]\ntop_n = 3\n')
    legacy = load_settings(env={"HARMONIA_CONFIG": str(old)})
    assert new == legacy
    assert (new.review.host, new.review.port, new.benchmark.gate_dev_top1, new.rerank.kind, new.rerank.top_n,
            new.database.pool_size) == ("0.0.0.0", 9000, 0.7, "classifier", 3, 4)
    assert new.sources["serve_host"] == str(cfg)


def test_a_table_key_never_means_two_settings() -> None:
    """[section] field and the older [prefix] rest style must never name different settings."""
    for spec in setting_specs():
        joined = f"{spec.section}_{spec.name}"
        if joined in {s.key for s in setting_specs()}:
            assert spec_for(joined) == spec, joined


def test_write_settings_writes_the_flat_form_every_version_reads(tmp_path: Path) -> None:
    import tomllib

    cfg = tmp_path / "h.toml"
    cfg.write_text('[retrieval]\ntop_k = 30\n[review]\nport = 9000\n')
    write_settings({"auto_approve_threshold": "0.95"}, cfg)
    assert tomllib.loads(cfg.read_text()) == {"auto_approve_threshold": 0.95, "retrieval_top_k": 30,
                                              "serve_port": 9000}
    with pytest.raises(ConfigError, match="unknown setting 'nonsense'"):
        write_settings({"nonsense": 1}, cfg)


def test_components_get_sections_not_the_whole_settings() -> None:
    s = Settings()
    assert s.retrieval.top_k == 50 and s.database.data_path == s.data_path
    assert s.embedding.vocabularies is not Settings().embedding.vocabularies  # no shared mutable defaults
