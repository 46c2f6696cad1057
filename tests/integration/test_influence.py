import matplotlib.figure
import numpy as np
import pytest
import tensorflow as tf

import keras_gex
from keras_gex.analysis.influence import InfluenceKernel


@pytest.fixture(scope="module")
def tiny_kernel(digits_ensemble, digits):
    train = (digits.x_train[:120], digits.y_train[:120])
    query = (digits.x_test[:30], digits.y_test[:30])
    return keras_gex.influence(digits_ensemble, train, query, verbose=0), train, query


def test_kernel_matches_explicit_per_pair_computation(tiny_kernel, digits_ensemble):
    kernel, train, query = tiny_kernel
    d_train = digits_ensemble.loss_deviations(train, verbose=0).astype(np.float64)
    d_query = digits_ensemble.loss_deviations(query, verbose=0).astype(np.float64)
    m = digits_ensemble.num_members
    explicit = np.empty((120, 30))
    for i in range(120):
        for j in range(30):
            explicit[i, j] = sum(d_train[i, k] * d_query[j, k] for k in range(m)) / m
    np.testing.assert_allclose(kernel.matrix(), explicit, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(kernel.column(3), explicit[:, 3], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(kernel.mean_over_queries(), explicit.mean(axis=1), rtol=1e-9)
    # self-influence is the kernel's diagonal when train == query
    same = keras_gex.influence(digits_ensemble, train, train, verbose=0)
    np.testing.assert_allclose(
        np.diag(same.matrix()), digits_ensemble.self_influence(train, verbose=0), rtol=1e-5
    )


def test_top_k_matches_brute_force_sort(tiny_kernel):
    kernel, _, _ = tiny_kernel
    dense = kernel.matrix()
    top = kernel.top_k(5, block_size=7)  # blocks that do not divide Q
    for j in range(dense.shape[1]):
        col = dense[:, j]
        np.testing.assert_allclose(top.proponent_scores[j], np.sort(col)[::-1][:5])
        np.testing.assert_allclose(top.opponent_scores[j], np.sort(col)[:5])
        np.testing.assert_allclose(col[top.proponents[j]], top.proponent_scores[j])
        np.testing.assert_allclose(col[top.opponents[j]], top.opponent_scores[j])


def test_normalized_kernel_is_cosine_of_deviation_vectors(tiny_kernel, digits_ensemble):
    _, train, query = tiny_kernel
    d_train = digits_ensemble.loss_deviations(train, verbose=0).astype(np.float64)
    d_query = digits_ensemble.loss_deviations(query, verbose=0).astype(np.float64)
    d_train[7] = 0.0  # an example the members never move stays at zero influence
    cosine = InfluenceKernel(d_train, d_query, normalize=True).matrix()
    for i in (0, 7, 50):
        for j in (0, 13):
            a, b = d_train[i], d_query[j]
            expected = 0.0 if i == 7 else a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            assert cosine[i, j] == pytest.approx(expected, abs=1e-12)
    assert np.all(np.abs(cosine) <= 1 + 1e-12)
    with pytest.raises(ValueError, match="normalize"):
        InfluenceKernel(d_train, d_query, normalize="yes")


def test_top_k_function_and_errors(digits_ensemble, tiny_kernel):
    _, train, query = tiny_kernel
    top = keras_gex.top_k(digits_ensemble, train, query, 3, verbose=0)
    assert top.proponents.shape == (30, 3)
    cosine = keras_gex.influence(digits_ensemble, train, query, normalize=True, verbose=0)
    np.testing.assert_array_equal(top.proponents, cosine.top_k(3).proponents)
    raw = keras_gex.top_k(digits_ensemble, train, query, 3, normalize=False, verbose=0)
    np.testing.assert_array_equal(raw.proponents, tiny_kernel[0].top_k(3).proponents)
    with pytest.raises(ValueError, match="at most N=120"):
        tiny_kernel[0].top_k(121)
    with pytest.raises(ValueError, match="k=0"):
        tiny_kernel[0].top_k(0)
    with pytest.raises(ValueError, match="max_elements"):
        tiny_kernel[0].matrix(max_elements=10)
    with pytest.raises(ValueError, match="same ensemble"):
        InfluenceKernel(np.ones((3, 2)), np.ones((4, 3)))


def test_prune_keeps_requested_count_and_lowest_scores_go_first(digits_ensemble, digits):
    """The lowest scores of all rows go first; with `per_class=True` each class
    loses the same share, lowest scores first within it."""
    data = (digits.x_train, digits.y_train)
    n = len(digits.x_train)
    scores = digits_ensemble.self_influence(data, verbose=0)
    for fraction in (0.0, 0.1, 0.5):
        result = keras_gex.prune(data, scores, fraction=fraction)
        assert len(result.kept_indices) == n - round(fraction * n)
        assert len(result.pruned_indices) == round(fraction * n)
        if fraction:
            assert scores[result.pruned_indices].max() <= scores[result.kept_indices].min()
        by_class = keras_gex.prune(data, digits_ensemble, fraction=fraction, per_class=True)
        assert len(by_class.pruned_indices) == round(fraction * n)
        for label in range(10):
            rows = digits.y_train == label
            pruned = np.isin(np.flatnonzero(rows), by_class.pruned_indices)
            assert abs(pruned.sum() - fraction * rows.sum()) < 1
            if 0 < pruned.sum() < rows.sum():
                in_class = scores[rows]
                assert in_class[pruned].max() <= in_class[~pruned].min()
    result = keras_gex.prune(data, digits_ensemble, fraction=0.3, verbose=0)
    x_kept, _ = result.apply(data)
    np.testing.assert_array_equal(x_kept, digits.x_train[result.kept_indices])
    ds = tf.data.Dataset.from_tensor_slices(data).batch(64)
    pruned_ds = result.apply(ds)
    ys = np.concatenate([y.numpy() for _, y in pruned_ds])
    np.testing.assert_array_equal(ys, digits.y_train[result.kept_indices])
    with pytest.raises(ValueError, match="fraction"):
        keras_gex.prune(data, scores, fraction=1.0)


def test_clean_relabel_and_drop(digits_ensemble, digits):
    data = (digits.x_train, digits.y_train)
    n = len(digits.x_train)
    report = keras_gex.detect_noisy(data, digits_ensemble, verbose=0)
    relabeled = keras_gex.clean(data, report, action="relabel", batch_size=100, shuffle=False)
    assert len(relabeled) == -(-n // 100)
    targets = np.concatenate([t.numpy() for _, t in relabeled])
    np.testing.assert_allclose(targets, report.relabeled_targets().astype(np.float32))
    ds = tf.data.Dataset.from_tensor_slices(data).batch(50)
    from_ds = keras_gex.clean(ds, report, shuffle=False)
    assert len(from_ds) == -(-n // 50)
    np.testing.assert_array_equal(np.concatenate([t.numpy() for _, t in from_ds]), targets)
    dropped = keras_gex.clean(ds, report, action="drop", shuffle=False)
    kept = int((~report.noisy_mask).sum())
    assert len(dropped) == -(-kept // 50)
    ys = np.concatenate([y.numpy() for _, y in dropped])
    np.testing.assert_array_equal(ys, digits.y_train[~report.noisy_mask])
    with pytest.raises(ValueError, match="action"):
        keras_gex.clean(data, report, action="fix")
    with pytest.raises(ValueError, match="report scored"):
        keras_gex.clean((digits.x_train[:10], digits.y_train[:10]), report)


def test_clean_shuffles_each_epoch_without_losing_rows(digits_ensemble, digits):
    data = (digits.x_train, digits.y_train)
    report = keras_gex.detect_noisy(data, digits_ensemble, verbose=0)
    ds = keras_gex.clean(data, report, action="drop", seed=0)
    first = np.concatenate([x.numpy()[:, :8] for x, _ in ds])
    second = np.concatenate([x.numpy()[:, :8] for x, _ in ds])
    kept = digits.x_train[~report.noisy_mask][:, :8]
    assert not np.array_equal(first, second)
    key = lambda a: sorted(map(bytes, a.astype(np.float32)))  # noqa: E731
    assert key(first) == key(kept) == key(second)


def test_source_separation():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.exponential(1, 200), rng.exponential(10, 100)])
    sources = np.array(["digits"] * 200 + ["fashion"] * 100)
    sep = keras_gex.source_separation(scores, sources)
    assert sep.sources == ["digits", "fashion"]
    assert sep.counts.tolist() == [200, 100]
    assert sep.auc[1] > 0.8 and np.isclose(sep.auc[0], 1 - sep.auc[1])
    assert "| fashion | 100 |" in sep.table()
    with pytest.raises(ValueError, match="two sources"):
        keras_gex.source_separation(scores, ["a"] * 300)


def test_gallery_and_proponent_plots(digits_ensemble, digits, tiny_kernel, tmp_path):
    data = (digits.x_train, digits.y_train)
    report = keras_gex.detect_noisy(data, digits_ensemble, verbose=0)
    fig = report.plot_gallery(digits.x_train, k=8, path=tmp_path / "gallery.png")
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 8
    assert (tmp_path / "gallery.png").stat().st_size > 3000
    top_ax = fig.axes[0]
    assert top_ax.get_title().startswith(f"#{np.argmax(report.scores)}")
    assert "member margin" in fig._suptitle.get_text()  # titled by the report's score
    kernel, train, query = tiny_kernel
    top = kernel.top_k(4)
    fig = keras_gex.plot_proponents(
        query[0][0],
        train[0],
        top.proponents[0],
        top.proponent_scores[0],
        top.opponents[0],
        top.opponent_scores[0],
        train_labels=train[1],
        query_label=query[1][0],
    )
    assert len(fig.axes) == 9
    with pytest.raises(ValueError, match="image_shape"):
        keras_gex.plot_gallery(np.zeros((3, 10)), np.arange(3.0))


def test_compare_models_before_after(trained_mlp, digits):
    from conftest import make_mlp

    other = make_mlp(seed=3, hidden=16)
    lines = []
    out = keras_gex.compare_models(
        {"trained": trained_mlp, "untrained": other},
        (digits.x_test, digits.y_test),
        print_fn=lines.append,
    )
    logits = np.asarray(trained_mlp(digits.x_test))
    assert out["trained"]["accuracy"] == np.mean(np.argmax(logits, 1) == digits.y_test)
    assert out["trained"]["accuracy"] > out["untrained"]["accuracy"]
    assert "| trained |" in lines[0]
    with pytest.raises(ValueError, match="non-empty dict"):
        keras_gex.compare_models({}, (digits.x_test, digits.y_test))


@pytest.mark.slow
def test_compare_models_on_one_sigmoid_output_and_a_regression(digits):
    """`(N,)` 0/1 labels against one sigmoid unit: accuracy at ½, as `fit` would count it; a
    regression has a test loss and no accuracy."""
    import keras

    parity = (digits.y_train % 2).astype("float32")
    keras.utils.set_random_seed(0)
    models = {}
    for name, loss in (("sigmoid", "binary_crossentropy"), ("regression", "mse")):
        model = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(1, activation="sigmoid" if name == "sigmoid" else None),
            ]
        )
        model.compile("adam", loss)
        model.fit(digits.x_train, parity, epochs=5, verbose=0)
        models[name] = model
    test_parity = (digits.y_test % 2).astype("float32")
    lines = []
    out = keras_gex.compare_models(models, (digits.x_test, test_parity), print_fn=lines.append)
    probs = np.asarray(models["sigmoid"](digits.x_test))[:, 0]
    assert out["sigmoid"]["accuracy"] == np.mean((probs > 0.5) == (test_parity == 1))
    assert out["sigmoid"]["accuracy"] > 0.8
    assert out["regression"]["accuracy"] is None and out["regression"]["loss"] > 0
    assert "| regression | — |" in lines[0]
