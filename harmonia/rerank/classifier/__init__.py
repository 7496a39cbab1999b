"""The local classifier reranker: the cross-encoder scorer, the stacker and training."""
