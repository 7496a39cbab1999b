"""Harmonia: map clinical source codes to OMOP standard concepts."""

__version__ = "0.1.0"
