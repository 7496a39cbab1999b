"""Settings: defaults, TOML (flat and sectioned), environment, validation, the generated reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from harmonia.config import ConfigError, Settings, docs_markdown, load_settings, setting_fields, write_settings

REPO = Path(__file__).resolve().parent.parent


def test_defaults_without_file_or_env() -> None:
    s = load_settings(env={"HARMONIA_CONFIG": ""})
    assert s.reranker == "none" and s.retrieval_top_k == 50 and s.auto_approve_threshold == 0.9
    assert "SNOMED" in s.vocabularies and s.sources["reranker"] == "default"


def test_toml_sections_then_env_override(tmp_path: Path) -> None:
    cfg = tmp_path / "h.toml"
    cfg.write_text('reranker = "llm"\n[llm]\nprovider = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
                   '[retrieval]\ntop_k = 30\n[router]\nauto_approve_threshold = 0.95\n')
    s = load_settings(env={"HARMONIA_CONFIG": str(cfg), "HARMONIA_LLM_PROVIDER": "ollama",
                           "HARMONIA_VOCABULARIES": "SNOMED, LOINC"})
    assert (s.reranker, s.llm_base_url, s.retrieval_top_k, s.auto_approve_threshold) == \
        ("llm", "http://127.0.0.1:9/v1", 30, 0.95)
    assert s.llm_provider == "ollama" and s.sources["llm_provider"] == "HARMONIA_LLM_PROVIDER"
    assert s.vocabularies == ["SNOMED", "LOINC"]


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
    assert s.auto_approve_threshold == 0.97 and s.llm_provider == "openai"


def test_reference_doc_lists_every_setting() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert doc == docs_markdown(), "docs/configuration.md is stale: run `harmonia config docs -o docs/configuration.md`"
    for f in setting_fields():
        assert f"`{f.name}`" in doc and f.metadata["help"]
    assert len(setting_fields()) == len([f for f in Settings.__dataclass_fields__.values()
                                         if not f.metadata.get("internal")])
