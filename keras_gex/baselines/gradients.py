"""Gradient-based baselines: GEX-lin, TracInRP and RandProj."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_gex import _validation
from keras_gex._tracing import compiled, free_batch, quiet_loop_fallback
from keras_gex.baselines._common import _collect, _scoring_args, _shared_doc
from keras_gex.data import DataSource
from keras_gex.ensemble import GeometricEnsemble
from keras_gex.loss_checks import check_per_example
from keras_gex.losses import resolve_loss
from keras_gex.weights import WeightSet, stateless_call

_CURVATURES = ("identity", "fisher")


def _check_ensemble(ensemble) -> None:
    if not isinstance(ensemble, GeometricEnsemble):
        raise TypeError(
            "Argument `ensemble` must be a `GeometricEnsemble` (see "
            "`GeometricEnsemble.collect`). "
            f"Received: ensemble of type {type(ensemble).__name__}"
        )


def _projection_args(projection_dim, seed) -> tuple[int | None, int]:
    """Validated `projection_dim` (None: exact gradient norms) and `seed` of Q_R."""
    if projection_dim is not None:
        projection_dim = _validation.positive_int("projection_dim", projection_dim)
    return projection_dim, _validation.non_negative_int("seed", seed)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"Argument `{name}` must be a boolean. Received: {name}={value!r}")
    return bool(value)


def _tensors(weights: WeightSet) -> tuple[list, list]:
    """A weight set as eager tensors, passed to the compiled steps as arguments."""
    return (
        [tf.convert_to_tensor(w) for w in weights.trainable],
        [tf.convert_to_tensor(w) for w in weights.non_trainable],
    )


def _specs(tensors) -> list:
    return [tf.TensorSpec(t.shape, t.dtype) for t in tensors]


def _losses(model, loss, tv, ntv, x, y):
    """Per-example losses at the weights `(tv, ntv)`, in inference mode."""
    pred, _ = stateless_call(model, tv, ntv, x, training=False)
    return loss(y, pred)


def _jvp(model, loss, tv, ntv, x, y, tangents):
    """`(B,)` directional derivatives ``∇_θ ℓ(z, θ)ᵀ v`` by forward-mode AD."""
    with tf.autodiff.ForwardAccumulator(tv, tangents) as acc:
        values = _losses(model, loss, tv, ntv, x, y)
    return acc.jvp(values, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def _direction(index, seed, tv, projection_dim: int) -> list:
    """Column `index` of the projection Q_R, entries i.i.d. N(0, 1/R), split like `tv`.

    Generated from `(seed, index)` by a stateless op, so Q_R is never stored
    and is the same for every checkpoint and every batch.
    """
    sizes = [int(np.prod(t.shape)) for t in tv]
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64)])
    flat = tf.random.stateless_normal([sum(sizes)], seed=key, dtype=tf.float32)
    flat = flat / np.sqrt(projection_dim)
    return [
        tf.cast(tf.reshape(part, t.shape), t.dtype) for part, t in zip(tf.split(flat, sizes), tv)
    ]


def _projection_matrix(weights: WeightSet, projection_dim: int, seed: int) -> np.ndarray:
    """The `(P, R)` projection Q_R the scores use, as one float64 matrix (tests)."""
    tv, _ = _tensors(weights)
    blocks = _projection_blocks(tv, projection_dim, seed)
    return np.concatenate([np.asarray(b, np.float64) for b in blocks], axis=0)


#: Memory the per-example-gradient route may hold at once, in bytes: the
#: materialised projection Q_R (P × R floats) plus a chunk of per-example
#: gradients (rows × P floats). A model whose Q_R alone takes more than half of
#: it is projected by R forward-mode JVPs per batch instead (memory O(P + B × R)).
_PER_EXAMPLE_BYTES = 512 * 2**20


def _per_example_fn(model, loss, signature, projected: bool):
    """Compiled per-example gradient statistics, vectorised over the batch.

    With `projected`, `(x, y, tv, ntv, q) -> (B, R)` ``Q_Rᵀ ∇_θ ℓ(z, θ)`` for
    `q`, Q_R split like `tv` into `(size, R)` blocks; otherwise `(x, y, tv,
    ntv) -> (B,)` exact ``||∇_θ ℓ(z, θ)||²``. Each example's gradient is taken
    alone (`tf.vectorized_map` over a one-example loss), so memory is
    O(B × P) and the cost about one batched backward pass.
    """

    def gradients(tv, ntv):
        """One example's flat float32 gradient blocks, for `tf.vectorized_map`."""

        def one(example):
            xi, yi = tf.nest.map_structure(lambda t: t[None], example)
            with tf.GradientTape() as tape:
                tape.watch(tv)
                value = _losses(model, loss, tv, ntv, xi, yi)[0]
            grads = tape.gradient(value, tv, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return [tf.reshape(tf.cast(g, "float32"), [-1]) for g in grads]

        return one

    if projected:

        def step(x, y, tv, ntv, q):
            # (B, size) per-example gradient blocks, then one matrix product per
            # block: faster than projecting inside the vectorised map.
            blocks = tf.vectorized_map(gradients(tv, ntv), (x, y))
            return tf.add_n([g @ block for g, block in zip(blocks, q)])

        q_specs = [tf.TensorSpec([s.shape.num_elements(), None], tf.float32) for s in signature[2]]
        return compiled(step, input_signature=[*signature, q_specs])

    def norms(x, y, tv, ntv):
        one = gradients(tv, ntv)
        return tf.vectorized_map(
            lambda example: tf.add_n([tf.reduce_sum(tf.square(g)) for g in one(example)]),
            (x, y),
        )

    return compiled(norms, input_signature=signature)


def _projection_blocks(tv, projection_dim: int, seed: int) -> list:
    """Q_R as float32 `(size, R)` blocks split like `tv`: the columns `_direction` makes."""
    seed_t = tf.constant(seed, tf.int64)
    columns = [_direction(index, seed_t, tv, projection_dim) for index in range(projection_dim)]
    return [
        tf.stack([tf.reshape(tf.cast(c[k], "float32"), [-1]) for c in columns], axis=1)
        for k in range(len(tv))
    ]


def _chunks(x, y, rows: int):
    """`(x, y)` in slices of at most `rows` examples (nested inputs sliced alike)."""
    size = int(tf.shape(tf.nest.flatten(x)[0])[0])
    for start in range(0, size, rows):
        cut = lambda t: t[start : start + rows]  # noqa: B023, E731
        yield tf.nest.map_structure(cut, x), tf.nest.map_structure(cut, y)


def _per_example_batch(fn, x, y, rows: int, *args) -> np.ndarray:
    """`fn(x, y, *args)` of a `_per_example_fn` over chunks of `rows`, concatenated."""
    with quiet_loop_fallback():
        return np.concatenate([fn(xc, yc, *args).numpy() for xc, yc in _chunks(x, y, rows)])


def _projected_gradients_fn(model, loss, signature, projection_dim: int, seed: int):
    """`(x, y, tv, ntv) -> (B, R)` numpy ``Q_Rᵀ ∇_θ ℓ(z, θ)``, by the cheaper route.

    Models whose Q_R fits half of `_PER_EXAMPLE_BYTES` take per-example
    gradients projected by the materialised Q_R, larger ones R forward-mode
    JVPs per batch. Both routes use the same Q_R and agree within float32
    rounding (a test compares them); `benchmarks/gradients.py` times them.
    """
    weights = sum(s.shape.num_elements() for s in signature[2])
    q_bytes = 4 * weights * projection_dim
    if q_bytes <= _PER_EXAMPLE_BYTES // 2:
        fn = _per_example_fn(model, loss, signature, projected=True)
        rows = max(1, (_PER_EXAMPLE_BYTES - q_bytes) // (4 * weights))
        cache = {}

        def project(x, y, tv, ntv):
            if "q" not in cache:  # Q_R depends on the shapes only: built once
                cache["q"] = _projection_blocks(tv, projection_dim, seed)
            return _per_example_batch(fn, x, y, rows, tv, ntv, cache["q"])

        return project
    return _jvp_projection_fn(model, loss, signature, projection_dim, seed)


def _jvp_projection_fn(model, loss, signature, projection_dim: int, seed: int):
    """`(x, y, tv, ntv) -> (B, R)` ``Q_Rᵀ ∇_θ ℓ(z, θ)`` as R forward-mode JVPs."""

    def step(x, y, tv, ntv):
        seed_t = tf.constant(seed, tf.int64)

        def body(index, out):
            tangents = _direction(index, seed_t, tv, projection_dim)
            value = tf.cast(_jvp(model, loss, tv, ntv, x, y, tangents), "float32")
            return index + 1, out.write(index, value)

        out = tf.TensorArray(tf.float32, size=projection_dim)
        _, out = tf.while_loop(lambda i, _: i < projection_dim, body, (tf.constant(0), out))
        return tf.transpose(out.stack())

    fn = compiled(step, input_signature=signature)
    return lambda x, y, tv, ntv: fn(x, y, tv, ntv).numpy()


def _squared_gradient_norms_fn(model, loss, signature):
    """`(x, y, tv, ntv) -> (B,)` numpy exact ``||∇_θ ℓ(z, θ)||²`` (per-example gradients)."""
    weights = sum(s.shape.num_elements() for s in signature[2])
    rows = max(1, _PER_EXAMPLE_BYTES // (4 * weights))
    fn = _per_example_fn(model, loss, signature, projected=False)
    return lambda x, y, tv, ntv: _per_example_batch(fn, x, y, rows, tv, ntv)


def _prepare(model, per_example, data, batch_size, weights: WeightSet):
    """Validated ordered source and the compiled steps' input signature."""
    source = DataSource(data, batch_size=batch_size)
    source.check_against_model(model)
    source.check_ordered()
    x0, y0 = source.first_batch()
    tv, ntv = _tensors(weights)
    check_per_example(per_example, y0, stateless_call(model, tv, ntv, x0, training=False)[0])
    spec = source.element_spec
    signature = [*free_batch(spec), _specs(tv), _specs(ntv)]
    return source, signature


def _linearized_deviations(
    ensemble, data, batch_size: int | None = None, verbose: int = 0
) -> np.ndarray:
    """`(N, M)` ``∇_θ ℓ(z, θ*)ᵀ (θ_m − θ*)`` in dataset order (float64)."""
    model, per_example = ensemble.model, ensemble.loss
    source, signature = _prepare(model, per_example, data, batch_size, ensemble.reference)
    tv, ntv = _tensors(ensemble.reference)
    tangents = [
        [
            tf.convert_to_tensor((np.asarray(w, np.float64) - ref).astype(ref.dtype))
            for w, ref in zip(member.trainable, ensemble.reference.trainable)
        ]
        for member in ensemble.members
    ]

    def step(x, y, tv, ntv, tangent):
        return _jvp(model, per_example, tv, ntv, x, y, tangent)

    fn = compiled(step, input_signature=[*signature, signature[2]])

    def batch(x, y):
        return np.stack([fn(x, y, tv, ntv, t).numpy() for t in tangents], axis=1)

    return _collect(source, batch, "linearised loss deviation", verbose)


@_shared_doc
def gex_lin_scores(ensemble, data, *, batch_size: int | None = None, verbose="auto") -> np.ndarray:
    """GEX-lin self-influence: GEX with linearised loss deviations (paper §5.1).

    The paper's ablation I_GEX-lin keeps the GE members θ_m but replaces each
    loss deviation by its first-order Taylor expansion around θ* (its eq. 11
    with LA samples replaced by GE members):

        Δ_lin(z, m) = ∇_θ ℓ(z, θ*)ᵀ (θ_m − θ*),   score(z) = mean_m Δ_lin(z, m)².

    Each Δ_lin is one forward-mode JVP (`tf.autodiff.ForwardAccumulator`) of
    the batch's per-example losses along θ_m − θ*, so a batch costs M
    forward-mode passes and no per-example gradient is ever materialised.
    The expansion point is θ* as scored (`ensemble.reference`, with its
    BatchNorm statistics), in inference mode; the derivative is taken with
    respect to the trainable weights only, so the members' re-estimated
    BatchNorm statistics play no part. The result is a bilinear form of
    gradients (paper Prop. 3.1) and shows what de-linearisation gains.

    Args:
        ensemble: A `GeometricEnsemble`.
        {data}
        {scoring_args}

    {scores}

    {ensemble_errors}
    """
    _check_ensemble(ensemble)
    batch_size, verbose = _scoring_args(batch_size, verbose)
    deviations = _linearized_deviations(ensemble, data, batch_size, verbose)
    return np.mean(deviations * deviations, axis=1)


def _squared_norm_scores(
    model, per_example, data, batch_size, checkpoints, projection_dim, seed, verbose=0
):
    """``mean_c ||Q_Rᵀ ∇ℓ(z, θ_c)||²`` (or the exact norm when `projection_dim` is None)."""
    source, signature = _prepare(model, per_example, data, batch_size, checkpoints[0])
    weights = [_tensors(c) for c in checkpoints]
    if projection_dim is None:
        fn = _squared_gradient_norms_fn(model, per_example, signature)

        def batch(x, y):
            return np.mean([fn(x, y, tv, ntv) for tv, ntv in weights], axis=0)

    else:
        fn = _projected_gradients_fn(model, per_example, signature, projection_dim, seed)

        def batch(x, y):
            norms = [
                np.sum(np.square(fn(x, y, tv, ntv), dtype=np.float64), axis=1)
                for tv, ntv in weights
            ]
            return np.mean(norms, axis=0)

    return _collect(source, batch, "projected gradient", verbose)


@_shared_doc
def tracin_scores(
    ensemble,
    data,
    *,
    projection_dim: int | None = 64,
    seed: int = 0,
    include_reference: bool = False,
    batch_size: int | None = None,
    verbose="auto",
) -> np.ndarray:
    """TracInRP self-influence with the GE members as checkpoints (paper App. F.6).

    TracIn (Pruthi et al., 2020) sums ``η_c ||∇_θ ℓ(z, θ_c)||²`` over
    checkpoints θ_c of the training trajectory; TracInRP replaces the
    gradient by a random projection ``Q_Rᵀ g`` with i.i.d. N(0, 1/R) entries,
    an unbiased estimate since ``E[Q_R Q_Rᵀ] = I``. The paper's App. F.6 makes
    it post hoc by taking the geometric-ensemble members as the checkpoints
    (as the official code's `--tracinrp_fge`). Here

        score(z) = 1/C Σ_c ||Q_Rᵀ ∇_θ ℓ(z, θ_c)||²,

    with θ_c the M members (plus θ* when `include_reference`), each
    evaluated with its own BatchNorm statistics in inference mode. The
    checkpoints are weighted equally, as in the paper's eq. 6: GE members
    have no per-checkpoint step size η_c, and a common one only rescales the
    scores. The same Q_R serves every checkpoint.

    ``Q_Rᵀ g`` is computed from per-example gradients and the materialised
    Q_R, or for large models as R forward-mode JVPs per batch (see the
    `keras_gex.baselines` docstring); either way once per checkpoint. With
    `projection_dim=None` the exact squared gradient norm (TracIn without
    projection) is computed instead, from per-example gradients in chunks of
    rows within `_PER_EXAMPLE_BYTES`.

    Args:
        ensemble: A `GeometricEnsemble`.
        {data}
        projection_dim: Number R of random projections, or None for exact
            gradient norms (the paper uses 20). Defaults to `64`.
        seed: Seed of the projection Q_R. Defaults to `0`.
        include_reference: Also use θ* as a checkpoint. Defaults to `False`.
        {scoring_args}

    {scores}

    {ensemble_errors}
    """
    _check_ensemble(ensemble)
    projection_dim, seed = _projection_args(projection_dim, seed)
    include_reference = _check_bool("include_reference", include_reference)
    batch_size, verbose = _scoring_args(batch_size, verbose)
    checkpoints = list(ensemble.members)
    if include_reference:
        checkpoints = [ensemble.reference, *checkpoints]
    return _squared_norm_scores(
        ensemble.model,
        ensemble.loss,
        data,
        batch_size,
        checkpoints,
        projection_dim,
        seed,
        verbose,
    )


@_shared_doc
def randproj_scores(
    model,
    data,
    *,
    projection_dim: int | None = 64,
    seed: int = 0,
    curvature: str = "identity",
    damping: float = 0.01,
    loss=None,
    batch_size: int | None = None,
    verbose="auto",
) -> np.ndarray:
    """RandProj self-influence: randomly projected gradients at θ* (paper §5.1).

    The paper's I_RandProj is the influence function with the Hessian
    replaced by the identity and the gradient by a random projection, at
    the final checkpoint θ* only (TracInRP with one checkpoint; App. F.6,
    and the official code's `randproj`, after Pruthi et al., 2020, App. E and
    Schioppa et al., 2022, §4). With `curvature="identity"` (the paper's):

        score(z) = ||Q_Rᵀ g_z||²,   g_z = ∇_θ ℓ(z, θ*),

    with Q_R of i.i.d. N(0, 1/R) entries, an unbiased estimate of
    ``||g_z||²``. With `curvature="fisher"` the Hessian is instead
    approximated inside the projected space by the empirical Fisher of
    `data` (influence sketching, Wojnowicz et al., 2016):

        F_R = 1/N Σ_n (Q_Rᵀ g_n)(Q_Rᵀ g_n)ᵀ,   λ = damping · tr(F_R) / R,
        score(z) = (Q_Rᵀ g_z)ᵀ (F_R + λ I)⁻¹ (Q_Rᵀ g_z),

    i.e. the damping is relative to the mean eigenvalue of F_R. This keeps
    the `(N, R)` projected gradients in memory (float32) and should be given
    the training set as `data`.

    ``Q_Rᵀ g`` is computed as in `tracin_scores` (per-example gradients and
    the materialised Q_R, or R forward-mode JVPs per batch for large models).
    With `projection_dim=None` (identity curvature only), the exact
    ``||g_z||²`` is computed from per-example gradients.

    Args:
        model: The trained, built Keras model θ*, evaluated in inference mode
            with its own weights and BatchNorm statistics, or a
            `GeometricEnsemble`, whose θ* as scored (`reference`) and loss
            are used.
        {data}
        projection_dim: Number R of random projections, or None for the
            exact gradient norm (the paper uses 20). Defaults to `64`.
        seed: Seed of the projection Q_R. Defaults to `0`.
        curvature: `"identity"` (the paper's RandProj) or `"fisher"`
            (projected empirical Fisher). Defaults to `"identity"`.
        damping: Relative damping of the Fisher (only with
            `curvature="fisher"`). Defaults to `0.01`.
        loss: Loss to use instead of the compiled one (a Keras model only).
            Defaults to `None`.
        {scoring_args}

    {scores}

    Raises:
        TypeError: If `model` is neither a `keras.Model` nor a
            `GeometricEnsemble`, or `data` has the wrong type.
        ValueError: For invalid data or arguments, or non-finite values.
    """
    if isinstance(model, GeometricEnsemble):
        if loss is not None:
            raise ValueError(
                "Argument `loss` applies to a `keras.Model` only: a `GeometricEnsemble` "
                "is scored with the loss it was collected with. Received: loss="
                f"{loss!r}"
            )
        keras_model, per_example, weights = model.model, model.loss, model.reference
    else:
        _validation.check_model(model, need_loss=True, loss=loss)
        keras_model, per_example = model, resolve_loss(model, loss)
        weights = WeightSet.from_model(model)
    projection_dim, seed = _projection_args(projection_dim, seed)
    curvature = _validation.one_of("curvature", curvature, _CURVATURES)
    damping = _validation.positive_float("damping", damping)
    batch_size, verbose = _scoring_args(batch_size, verbose)
    if curvature == "identity":
        return _squared_norm_scores(
            keras_model, per_example, data, batch_size, [weights], projection_dim, seed, verbose
        )
    if projection_dim is None:
        raise ValueError(
            "Argument `projection_dim` must be a positive integer with "
            "curvature='fisher' (the Fisher is inverted in the projected space). "
            "Received: projection_dim=None"
        )
    source, signature = _prepare(keras_model, per_example, data, batch_size, weights)
    fn = _projected_gradients_fn(keras_model, per_example, signature, projection_dim, seed)
    tv, ntv = _tensors(weights)
    projected = _collect(source, lambda x, y: fn(x, y, tv, ntv), "projected gradient", verbose)
    fisher = projected.T @ projected / len(projected)
    scale = np.trace(fisher) / projection_dim
    if not scale > 0:
        raise ValueError(
            "Every gradient of `data` is zero at θ*, so the projected Fisher is "
            "zero; RandProj with curvature='fisher' is undefined."
        )
    fisher[np.diag_indices(projection_dim)] += damping * scale
    solved = np.linalg.solve(fisher, projected.T)
    return np.einsum("nr,rn->n", projected, solved)
