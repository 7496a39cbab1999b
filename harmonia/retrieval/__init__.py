"""Candidate retrieval: vector, lexical and hybrid search, the mapping memory, fusion tuning."""
