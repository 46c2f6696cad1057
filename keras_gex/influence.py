"""Cross-influence: which training examples drove a prediction.

GEX's influence of a training example z on a query z' is
``I(z, z') = mean_m Δ(z, m) Δ(z', m)``: the kernel between the training set
and any query set is ``Δ_train (N×M) · Δ_queryᵀ (M×Q) / M``. `InfluenceKernel`
keeps the two deviation matrices and never materialises N×Q unless asked;
`top_k` works block by block over the queries.

Sign convention: positive influence means the two losses move together under
the ensemble's perturbations (z behaves like a *proponent* of z': what fits z
fits z'); negative means they move in opposition (an *opponent*). Measured
here, the sign's meaning depends on the model; the magnitude ranks reliably.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_gex import _validation

#: Largest kernel `matrix()` builds without `max_elements=` raised (~1 GiB float64).
MAX_DENSE_ELEMENTS = 2**27


@dataclasses.dataclass
class TopK:
    """Strongest proponents and opponents of each query.

    Attributes:
        proponents: `(Q, k)` training indices with the largest influence.
        proponent_scores: `(Q, k)` their influence, descending.
        opponents: `(Q, k)` training indices with the most negative influence.
        opponent_scores: `(Q, k)` their influence, ascending.
    """

    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray


class InfluenceKernel:
    """Lazy `(N, Q)` GEX influence between training and query examples.

    Args:
        train_deviations: `(N, M)` Δ of the training examples.
        query_deviations: `(Q, M)` Δ of the query examples (same members).
    """

    def __init__(self, train_deviations, query_deviations):
        self.train = np.asarray(train_deviations, dtype=np.float64)
        self.query = np.asarray(query_deviations, dtype=np.float64)
        if self.train.ndim != 2 or self.query.ndim != 2:
            raise ValueError("Deviation matrices must be 2-D (examples × members).")
        if self.train.shape[1] != self.query.shape[1]:
            raise ValueError(
                "Training and query deviations must come from the same ensemble: "
                f"{self.train.shape[1]} vs {self.query.shape[1]} members."
            )
        self.num_members = self.train.shape[1]

    @property
    def shape(self) -> tuple:
        return (self.train.shape[0], self.query.shape[0])

    def column(self, j: int) -> np.ndarray:
        """`(N,)` influence of every training example on query `j`."""
        return self.train @ self.query[j] / self.num_members

    def block(self, start: int, stop: int) -> np.ndarray:
        """`(N, stop - start)` influence on queries `start:stop`."""
        return self.train @ self.query[start:stop].T / self.num_members

    def matrix(self, max_elements: int = MAX_DENSE_ELEMENTS) -> np.ndarray:
        """The dense `(N, Q)` kernel; refuses sizes above `max_elements`."""
        n, q = self.shape
        if n * q > max_elements:
            raise ValueError(
                f"The kernel has {n}×{q} = {n * q:,} entries (more than "
                f"max_elements={max_elements:,}). Use `top_k`, `column` or `block`, or "
                "raise `max_elements`."
            )
        return self.block(0, q)

    def mean_over_queries(self) -> np.ndarray:
        """`(N,)` mean influence on all queries (paper App. F.5 detection score)."""
        return self.train @ self.query.mean(axis=0) / self.num_members

    def top_k(self, k: int, block_size: int = 256) -> TopK:
        """The `k` strongest proponents and opponents of every query.

        Args:
            k: How many of each. Defaults to none; must be <= N.
            block_size: Queries processed at once (memory N × block_size).
                Defaults to `256`.
        """
        n, q = self.shape
        k = _validation.positive_int("k", k)
        if k > n:
            raise ValueError(f"Argument `k` must be at most N={n}. Received: k={k}")
        block_size = _validation.positive_int("block_size", block_size)
        pro_i = np.empty((q, k), dtype=np.int64)
        pro_s = np.empty((q, k))
        opp_i = np.empty((q, k), dtype=np.int64)
        opp_s = np.empty((q, k))
        for start in range(0, q, block_size):
            block = self.block(start, min(q, start + block_size)).T  # (b, N)
            rows = np.arange(block.shape[0])[:, None]
            top = np.argpartition(-block, k - 1, axis=1)[:, :k]
            order = np.argsort(-block[rows, top], axis=1, kind="stable")
            pro_i[start : start + len(block)] = top[rows, order]
            pro_s[start : start + len(block)] = block[rows, top[rows, order]]
            bottom = np.argpartition(block, k - 1, axis=1)[:, :k]
            order = np.argsort(block[rows, bottom], axis=1, kind="stable")
            opp_i[start : start + len(block)] = bottom[rows, order]
            opp_s[start : start + len(block)] = block[rows, bottom[rows, order]]
        return TopK(pro_i, pro_s, opp_i, opp_s)


def influence(ensemble, train_data, query_data, *, batch_size=None, verbose="auto"):
    """GEX influence of every training example on every query example.

    Args:
        ensemble: A `GeometricEnsemble`.
        train_data: Training `(x, y)` arrays or dataset (defines rows, in order).
        query_data: Query `(x, y)` arrays or dataset (defines columns). For a
            test prediction without a label, pass the model's predicted label.
        batch_size: Scoring batch size for arrays. Defaults to `None` (256).
        verbose: 0, or 1 / "auto" for progress bars. Defaults to `"auto"`.

    Returns:
        An `InfluenceKernel` (lazy; `.matrix()`, `.column(j)`, `.top_k(k)`).
    """
    train = ensemble.loss_deviations(train_data, batch_size=batch_size, verbose=verbose)
    query = ensemble.loss_deviations(query_data, batch_size=batch_size, verbose=verbose)
    return InfluenceKernel(train, query)


def top_k(ensemble, train_data, query_data, k: int, *, batch_size=None, verbose="auto") -> TopK:
    """The `k` strongest proponents and opponents of each query example.

    Args:
        ensemble: A `GeometricEnsemble`.
        train_data: Training `(x, y)` arrays or dataset.
        query_data: Query `(x, y)` arrays or dataset.
        k: Number of proponents and of opponents per query.
        batch_size: Scoring batch size for arrays. Defaults to `None` (256).
        verbose: 0, or 1 / "auto". Defaults to `"auto"`.

    Returns:
        A `TopK` with `(Q, k)` index and score arrays.
    """
    k = _validation.positive_int("k", k)
    kernel = influence(ensemble, train_data, query_data, batch_size=batch_size, verbose=verbose)
    return kernel.top_k(k)
