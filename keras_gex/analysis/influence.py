"""Cross-influence: which training examples drove a prediction.

GEX's influence of a training example z on a query z' is
``I(z, z') = mean_m Δ(z, m) Δ(z', m)``: the kernel between the training set
and any query set is ``Δ_train (N×M) · Δ_queryᵀ (M×Q) / M``. `InfluenceKernel`
keeps the two deviation matrices and never materialises N×Q unless asked;
`top_k` works block by block over the queries.

Sign convention: positive influence means the two losses move together under
the ensemble's perturbations (z behaves like a *proponent* of z': what fits z
fits z'); negative means they move in opposition (an *opponent*). The sign's
meaning depends on the model.

Normalisation. The raw kernel is dominated by the training examples with the
largest deviations (the hardest and the mislabeled ones): its top proponents
are the same few examples for every query
(docs/design.md#cosine-kernel-for-top-k). With ``normalize=True`` each
deviation vector is scaled to unit length first (a cosine kernel): the top
proponents then share the query's label about twice as often and differ
across queries. `top_k` normalises by default; `influence` keeps the paper's
raw kernel unless asked.
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
        normalize: Scale every deviation vector to unit length first: entries
            become the cosine similarity in [-1, 1] (rows that are exactly
            zero stay zero). Defaults to `False`.

    >>> k = InfluenceKernel([[1.0, 0.0], [2.0, 2.0]], [[1.0, 1.0]])
    >>> k.matrix().ravel().tolist()
    [0.5, 2.0]
    >>> cosine = InfluenceKernel([[1.0, 0.0], [2.0, 2.0]], [[1.0, 1.0]], normalize=True)
    >>> np.round(cosine.matrix().ravel(), 4).tolist()
    [0.7071, 1.0]
    """

    def __init__(self, train_deviations, query_deviations, *, normalize: bool = False):
        if not isinstance(normalize, bool):
            raise ValueError(
                f"Argument `normalize` must be a bool. Received: normalize={normalize!r}"
            )
        self.normalize = normalize
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
        if normalize:
            self.train = _unit_rows(self.train) * np.sqrt(self.num_members)
            self.query = _unit_rows(self.query) * np.sqrt(self.num_members)

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


def _unit_rows(a: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.divide(a, norms, out=np.zeros_like(a), where=norms > 0)


def influence(
    ensemble, train_data, query_data, *, normalize: bool = False, batch_size=None, verbose="auto"
):
    """GEX influence of every training example on every query example.

    Args:
        ensemble: A `GeometricEnsemble`.
        train_data: Training `(x, y)` arrays or dataset (defines rows, in order).
        query_data: Query `(x, y)` arrays or dataset (defines columns). For a
            test prediction without a label, pass the model's predicted label.
        normalize: Cosine kernel instead of the paper's raw one (see the module
            docstring: it ranks proponents better). Defaults to `False`.
        batch_size: Scoring batch size for arrays. Defaults to `None` (256).
        verbose: 0, or 1 / "auto" for progress bars. Defaults to `"auto"`.

    Returns:
        An `InfluenceKernel` (lazy; `.matrix()`, `.column(j)`, `.top_k(k)`).
    """
    train = ensemble.loss_deviations(train_data, batch_size=batch_size, verbose=verbose)
    query = ensemble.loss_deviations(query_data, batch_size=batch_size, verbose=verbose)
    return InfluenceKernel(train, query, normalize=normalize)


def top_k(
    ensemble,
    train_data,
    query_data,
    k: int,
    *,
    normalize: bool = True,
    batch_size=None,
    verbose="auto",
) -> TopK:
    """The `k` strongest proponents and opponents of each query example.

    Args:
        ensemble: A `GeometricEnsemble`.
        train_data: Training `(x, y)` arrays or dataset.
        query_data: Query `(x, y)` arrays or dataset.
        k: Number of proponents and of opponents per query.
        normalize: Rank by the cosine kernel (see the module docstring: its
            top proponents share the query's label far more often); False
            ranks by the paper's raw kernel, which
            puts the same few hardest examples on top of every query.
            Defaults to `True`.
        batch_size: Scoring batch size for arrays. Defaults to `None` (256).
        verbose: 0, or 1 / "auto". Defaults to `"auto"`.

    Returns:
        A `TopK` with `(Q, k)` index and score arrays.
    """
    k = _validation.positive_int("k", k)
    kernel = influence(
        ensemble,
        train_data,
        query_data,
        normalize=normalize,
        batch_size=batch_size,
        verbose=verbose,
    )
    return kernel.top_k(k)
