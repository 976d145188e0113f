"""Evaluation: features, ranking metrics (CMC, mAP, mINP), k-reciprocal re-ranking and ranked-result figures."""

from laga_jax.evaluation.features import extract_features, load_features, save_features
from laga_jax.evaluation.figures import pick_queries, ranked_gallery, save_ranked_results
from laga_jax.evaluation.metrics import (aggregate, cosine_distance, evaluate_draws, evaluate_features,
                                         evaluate_ranking, query_metrics, summarize)
from laga_jax.evaluation.rerank import KReciprocal, k_reciprocal, re_ranking

__all__ = [
    "KReciprocal", "aggregate", "cosine_distance", "evaluate_draws", "evaluate_features", "evaluate_ranking",
    "extract_features", "k_reciprocal", "load_features", "pick_queries", "query_metrics", "ranked_gallery",
    "re_ranking", "save_features", "save_ranked_results", "summarize",
]
