"""A self-contained HTML page for a `NoisyLabelReport` (figures embedded as PNG)."""

from __future__ import annotations

import base64
import html
import io

from keras_gex.io.plots import SCORE_LABELS, plot_gallery


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_html_report(
    report,
    path,
    *,
    title: str = "keras_gex noisy-label report",
    images=None,
    class_names=None,
    max_rows: int = 100,
) -> None:
    """Writes `report` as one HTML file with its histogram (and image gallery).

    Args:
        report: A `NoisyLabelReport`.
        path: Output `.html` path.
        title: Page title. Defaults to `"keras_gex noisy-label report"`.
        images: Training inputs; when they look like images, a gallery of the
            most suspect ones is embedded. Defaults to `None`.
        class_names: Names indexed by class id. Defaults to `None`.
        max_rows: Flagged rows listed in the table. Defaults to `100`.
    """
    summary = report.summary(print_fn=None)
    score_name, formula = SCORE_LABELS[report.score_method]
    figures = [(score_name, _png(report.plot()), "")]
    try:
        given, predicted = report.given_labels(), report.suggested_labels()
    except ValueError:
        given = predicted = None  # no class per row (a regression, multi-label outputs)
    if images is not None:
        try:
            gallery = plot_gallery(
                images,
                report.scores,
                given,
                predicted,
                k=24,
                cols=6,  # captions stay legible at the page's width
                class_names=class_names,
                score=report.score_method,
            )
        except ValueError:
            pass  # not image-like inputs
        else:
            note = (
                "Each image is captioned with its index and “given → suggested” label; "
                "red marks a suggestion that differs from the given label."
            )
            caption = f"Most suspect examples: highest {score_name}"
            figures.append((caption, _png(gallery), note))

    def name(label):
        if label is None:
            return ""
        label = int(label)
        return html.escape(class_names[label]) if class_names is not None else str(label)

    rows = []
    for rank, idx in enumerate(report.noisy_indices[:max_rows]):
        rows.append(
            f"<tr><td>{rank + 1}</td><td>{idx}</td><td>{report.scores[idx]:.4g}</td>"
            f"<td>{name(None if given is None else given[idx])}</td>"
            f"<td>{name(None if predicted is None else predicted[idx])}</td></tr>"
        )
    figure_html = "\n".join(
        f'<h2>{html.escape(caption)}</h2><img alt="{html.escape(caption)}" '
        f'src="data:image/png;base64,{data}">' + (f"<p>{html.escape(note)}</p>" if note else "")
        for caption, data, note in figures
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
pre {{ background: #f4f4f4; padding: 1em; white-space: pre-wrap; overflow-wrap: anywhere; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<pre>{html.escape(summary)}</pre>
{figure_html}
<h2>Flagged examples (most suspect first; {report.num_flagged} in all)</h2>
<table><tr><th>rank</th><th>index</th><th>{html.escape(score_name)}</th><th>given</th><th>suggested</th></tr>
{"".join(rows)}
</table>
<p>Scores are the {html.escape(score_name)}, {html.escape(formula)}, over the GE members
θ_m (θ* is the trained model); higher means more likely mislabeled.</p>
</body></html>
"""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)
