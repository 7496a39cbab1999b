"""Deciding source terms: retrieve -> rerank -> route (run.py, route.py) and the queue workers (worker.py)."""
