"""Hatchling build hook: a wheel carries copies of the top-level migrations/, prompts/ and data/sample/ under
harmonia/_resources/, where harmonia.paths finds them in an installed package. An editable install gets none: it
reads the checkout's folders, so an edited migration or prompt is never shadowed by a stale copy."""

from __future__ import annotations

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

RESOURCES = {"migrations": "harmonia/_resources/migrations", "prompts": "harmonia/_resources/prompts",
             "data/sample": "harmonia/_resources/data/sample"}


class ResourcesHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name == "wheel" and version == "standard":
            build_data["force_include"].update(RESOURCES)
