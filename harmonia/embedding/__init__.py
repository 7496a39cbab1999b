"""Sentence embeddings: the model (model.py) and its contrastive fine-tuning (train.py)."""
