"""The HTML report names its score, lays out its gallery legibly and wraps its summary."""

import re

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from keras_gex.analysis.report import NoisyLabelReport
from keras_gex.io.html_report import write_html_report
from keras_gex.io.plots import plot_gallery


def _report(score_method, n=60, k=4, seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.gamma(1.0, size=n)
    threshold = float(np.quantile(scores, 0.8))
    return NoisyLabelReport(
        scores=scores,
        threshold=threshold,
        noisy_mask=scores > threshold,
        deviations=rng.normal(size=(n, 3)),
        reference_losses=rng.gamma(1.0, size=n),
        labels=rng.integers(0, k, size=n),
        predictions=rng.normal(size=(n, k)),
        threshold_method="otsu",
        record=None,
        from_logits=True,
        score_method=score_method,
        # A margin report built by hand, without the member losses its rule counts, still
        # summarises (its threshold named as given).
        member_losses=rng.gamma(1.0, size=(n, 3)) if score_method == "member_loss" else None,
    )


@pytest.mark.parametrize(
    ("score_method", "name"),
    [
        ("member_margin", "GE member margin"),
        ("member_loss", "GE members' mean loss"),
        ("self_influence", "GEX self-influence"),
    ],
)
def test_gallery_is_titled_by_the_report_score(tmp_path, score_method, name):
    report = _report(score_method)
    images = np.random.default_rng(1).random((len(report.scores), 64))
    path = tmp_path / "report.html"
    write_html_report(report, path, images=images)
    page = path.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 2
    assert f"<h2>Most suspect examples: highest {name}</h2>" in page.replace("&#x27;", "'")
    if score_method != "self_influence":
        assert "self-influential" not in page


def test_summary_wraps_instead_of_overflowing(tmp_path):
    report = _report("member_loss")
    path = tmp_path / "report.html"
    write_html_report(report, path)
    css = re.search(r"pre \{([^}]*)\}", path.read_text(encoding="utf-8")).group(1)
    assert "white-space: pre-wrap" in css and "overflow-x" not in css


@pytest.mark.parametrize(
    ("score", "name"),
    [
        ("member_margin", "GE member margin"),
        ("member_loss", "GE members' mean loss"),
        ("self_influence", "GEX self-influence"),
    ],
)
def test_gallery_default_title_names_the_score(score, name):
    scores = np.arange(20.0)
    fig = plot_gallery(np.zeros((20, 8, 8)), scores, k=16, score=score)
    assert fig._suptitle.get_text() == f"the 16 examples with the highest {name}"
    fig = plot_gallery(np.zeros((20, 8, 8)), scores, k=5, most=False, score=score)
    assert fig._suptitle.get_text() == f"the 5 examples with the lowest {name}"
    with pytest.raises(ValueError, match="Argument `score` must be one of"):
        plot_gallery(np.zeros((20, 8, 8)), scores, score="loss")


def test_gallery_captions_clear_the_row_above():
    """Each caption ("#index" over "given → predicted") sits between its image and the
    image above it, and the figure title above the first row's captions."""
    n, cols = 24, 8
    labels = np.arange(n) % 10
    fig = plot_gallery(
        np.random.default_rng(0).random((n, 8, 8)),
        np.arange(n, 0, -1.0),
        labels,
        (labels + 1) % 10,
        k=n,
        cols=cols,
    )
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    axes = fig.axes
    assert len(axes) == n
    for pos, ax in enumerate(axes):
        caption = ax.title.get_window_extent(renderer)
        image = ax.get_window_extent(renderer)
        assert caption.y0 >= image.y1 - 1  # above its own image
        if pos >= cols:
            above = axes[pos - cols].get_window_extent(renderer)
            assert caption.y1 <= above.y0, (pos, caption, above)
        else:
            assert caption.y1 <= fig._suptitle.get_window_extent(renderer).y0
