"""The LLM reranker: the reranker, its prompt and the providers."""
