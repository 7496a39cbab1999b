"""Rerankers: base.py (the interface and `none`), llm/ and classifier/."""
