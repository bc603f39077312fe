"""Evaluation metrics: distances between sample sets (:mod:`.distances`)."""
