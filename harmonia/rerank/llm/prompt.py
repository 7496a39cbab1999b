"""A prompt version: the folder prompts/<version>/ holding the system prompt (system.md) and the rerank tool
(rerank_tool.json: name, description, input JSON Schema), and the typed answer the tool's input is parsed into.

The JSON Schema is the gate: a tool input is checked against it (jsonschema) before `RerankAnswer` parses it, so the
model never admits an answer the schema refuses. The hash covers the system prompt and the tool definition and
goes into every decision's model_version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
from pydantic import BaseModel, ConfigDict

from harmonia.paths import resource_dir


class RankedAnswer(BaseModel):
    """One entry of the tool's `ranked` list."""

    model_config = ConfigDict(extra="ignore")

    concept_id: int
    score: float
    rationale: str = ""


class RerankAnswer(BaseModel):
    """The rerank tool's input, parsed after it passed the prompt's JSON Schema (prompts/v1/rerank_tool.json): the
    schema decides what is admissible, this model is what the code reads (a later prompt version may add fields)."""

    model_config = ConfigDict(extra="ignore")

    ranked: list[RankedAnswer]
    confidence: float
    no_match: bool = False


@dataclass(frozen=True)
class Prompt:
    version: str
    system: str
    tool_name: str
    tool_description: str
    schema: dict[str, Any]
    hash: str  # sha256 of the system prompt and the tool definition, first 8 hex digits

    @classmethod
    def load(cls, version: str, directory: Path | None = None) -> Prompt:
        d = directory or resource_dir("prompts") / version
        system = (d / "system.md").read_text(encoding="utf-8")
        tool_text = (d / "rerank_tool.json").read_text(encoding="utf-8")
        tool = json.loads(tool_text)
        jsonschema.Draft202012Validator.check_schema(tool["input_schema"])
        digest = hashlib.sha256(system.encode() + b"\0" + json.dumps(tool, sort_keys=True).encode()).hexdigest()
        return cls(version, system, tool["name"], tool.get("description", ""), tool["input_schema"], digest[:8])

    def parse(self, tool_input: dict[str, Any]) -> RerankAnswer:
        """The answer of a tool input that the schema admits (check it with `validator` first)."""
        return RerankAnswer.model_validate(tool_input)

    @property
    def validator(self) -> jsonschema.Draft202012Validator:
        return jsonschema.Draft202012Validator(self.schema)
