"""A prompt version: the folder prompts/<version>/ holding the system prompt (system.md), the rerank tool
(rerank_tool.json: name, description, input JSON Schema) and, from v2 on, the user message template (user.md),
and the typed answer the tool's input is parsed into.

The JSON Schema is the gate: a tool input is checked against it (jsonschema) before `RerankAnswer` parses it, so the
model never admits an answer the schema refuses. The hash covers the system prompt and the tool definition and
goes into every decision's model_version (a folder without user.md hashes as before: v1 keeps its hash).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict

from harmonia.paths import resource_dir


class RankedAnswer(BaseModel):
    """One entry of the tool's `ranked` list."""

    model_config = ConfigDict(extra="ignore")

    concept_id: int
    score: float
    rationale: str = ""


class AdditionalAnswer(BaseModel):
    """One entry of the v2 tool's `additional` list: a further target beside the first choice."""

    model_config = ConfigDict(extra="ignore")

    concept_id: int
    mapping_type: Literal["MAPS_TO", "MAPS_TO_VALUE", "MAPS_TO_UNIT"] = "MAPS_TO"
    equivalence: Literal["EQUAL", "EQUIVALENT", "WIDER", "NARROWER", "INEXACT", "UNMATCHED",
                         "UNREVIEWED"] = "UNREVIEWED"
    rationale: str = ""


class RerankAnswer(BaseModel):
    """The rerank tool's input, parsed after it passed the prompt's JSON Schema (prompts/v1/rerank_tool.json): the
    schema decides what is admissible, this model is what the code reads (a later prompt version may add fields)."""

    model_config = ConfigDict(extra="ignore")

    ranked: list[RankedAnswer]
    confidence: float
    no_match: bool = False
    # v2: the first choice's equivalence and further targets (a second 'Maps to', a 'Maps to value')
    equivalence: Literal["EQUAL", "EQUIVALENT", "WIDER", "NARROWER", "INEXACT", "UNMATCHED",
                         "UNREVIEWED"] | None = None
    additional: list[AdditionalAnswer] = []


@dataclass(frozen=True)
class Prompt:
    version: str
    system: str
    tool_name: str
    tool_description: str
    schema: dict[str, Any]
    hash: str  # sha256 of the system prompt and the tool definition (and user.md), first 8 hex digits
    user_template: str | None = None  # user.md: the user message with {placeholders}; None: the v1 message

    @classmethod
    def load(cls, version: str, directory: Path | None = None) -> Prompt:
        d = directory or resource_dir("prompts") / version
        system = (d / "system.md").read_text(encoding="utf-8")
        tool_text = (d / "rerank_tool.json").read_text(encoding="utf-8")
        tool = json.loads(tool_text)
        jsonschema.Draft202012Validator.check_schema(tool["input_schema"])
        h = hashlib.sha256(system.encode() + b"\0" + json.dumps(tool, sort_keys=True).encode())
        user = d / "user.md"
        template = user.read_text(encoding="utf-8") if user.exists() else None
        if template is not None:
            h.update(b"\0" + template.encode())
        return cls(version, system, tool["name"], tool.get("description", ""), tool["input_schema"],
                   h.hexdigest()[:8], template)

    def parse(self, tool_input: dict[str, Any]) -> RerankAnswer:
        """The answer of a tool input that the schema admits (check it with `validator` first)."""
        return RerankAnswer.model_validate(tool_input)

    def problem(self, tool_input: dict[str, Any] | None, text: str = "") -> str | None:
        """Why an answer is unusable (None when the schema admits it)."""
        if tool_input is None:
            return f"no {self.tool_name} tool call; the answer was prose: {text[:300]!r}"
        errors = sorted(self.validator.iter_errors(tool_input), key=lambda e: list(e.path))
        if errors:
            return "; ".join(f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in errors[:5])
        return None

    @property
    def validator(self) -> jsonschema.Draft202012Validator:
        return jsonschema.Draft202012Validator(self.schema)
