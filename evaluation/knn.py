"""Weighted k-nearest-neighbour classifier on frozen features, as DINO's `eval_knn.py`.

Cosine similarity (features L2-normalised), the k = 20 nearest training rows vote for their
label with weight exp(similarity / T), T = 0.07. Pure function on arrays; test rows are
processed in chunks so memory stays at chunk x N_train similarities.
"""

from __future__ import annotations

import numpy as np
import torch


def _normalise(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return torch.nn.functional.normalize(t, dim=1)


def knn_scores(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> np.ndarray:
    """Class scores (N_test, num_classes): sum of exp(cos / T) over the k nearest train rows.

    Labels must be integers in [0, num_classes).
    """
    if len(x_train) != len(y_train) or x_train.shape[1] != x_test.shape[1]:
        raise ValueError(
            f"kNN shapes disagree: train {x_train.shape} / {y_train.shape}, test {x_test.shape}"
        )
    if y_train.min() < 0 or y_train.max() >= num_classes:
        raise ValueError(f"kNN labels must lie in [0, {num_classes}), got {y_train.min()}..")
    train = _normalise(x_train)
    labels = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    test = _normalise(x_test)
    k = min(k, len(train))
    out = torch.zeros(len(test), num_classes, dtype=torch.float32)
    for start in range(0, len(test), chunk):
        sim = test[start : start + chunk] @ train.T  # (chunk, N_train) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        out[start : start + chunk].scatter_add_(1, labels[top_idx], weights)
    return out.numpy()


def knn_classify(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """kNN top-1 and top-5 accuracy on the test rows."""
    scores = knn_scores(
        x_train, y_train, x_test, num_classes=num_classes, k=k, temperature=temperature
    )
    order = np.argsort(-scores, axis=1)
    y = np.asarray(y_test)[:, None]
    return {
        "knn_top1": float((order[:, :1] == y).any(axis=1).mean()),
        "knn_top5": float((order[:, : min(5, num_classes)] == y).any(axis=1).mean()),
    }
