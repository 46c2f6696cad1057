"""Export the ensemble's scorer as a TensorFlow SavedModel for production gates.

The exported artifact scores new `(x, y)` batches with the trained model θ*
and every GE member — the scores `detect_noisy` ranks by (the member loss and,
for labels of mutually exclusive classes, the member margin), self-influence,
the deviation matrix and θ*'s loss — using TensorFlow alone: no keras_gex, no
training code, no Python model definition. Load it with
`tf.saved_model.load(path)` and call `artifact.score(x, y)` (or serve the
`serving_default` signature). Exported with a `NoisyLabelReport`, the artifact
also applies its cut: `artifact.flag(x, y)` (the "flag" signature).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from keras_gex.analysis.scores import OTHER_CLASS_WEIGHT, exclusive_classes
from keras_gex.weights import stateless_call


class _ExportedScorer(tf.Module):
    def __init__(self, ensemble, x_spec, y_spec, report=None):
        super().__init__(name="keras_gex_scorer")
        model, loss = ensemble.model, ensemble.loss
        self._ref_t = [tf.Variable(w, trainable=False) for w in ensemble.reference.trainable]
        self._ref_n = [tf.Variable(w, trainable=False) for w in ensemble.reference.non_trainable]
        self._members = [
            (
                [tf.Variable(w, trainable=False) for w in m.trainable],
                [tf.Variable(w, trainable=False) for w in m.non_trainable],
            )
            for m in ensemble.members
        ]
        self._member_vars = [v for pair in self._members for group in pair for v in group]
        self.num_members = tf.constant(len(ensemble.members))

        margin = _has_margin(ensemble, y_spec)

        def score(x, y):
            ref_pred, _ = stateless_call(model, self._ref_t, self._ref_n, x, training=False)
            if y_spec.shape.rank is None:  # one sigmoid output: (N,) or (N, 1) labels
                y = tf.reshape(y, tf.shape(ref_pred))
            ref_loss = loss(y, ref_pred)
            preds = [
                stateless_call(model, tv, ntv, x, training=False)[0] for tv, ntv in self._members
            ]
            member_losses = tf.stack([loss(y, pred) for pred in preds], axis=1)
            deviations = member_losses - ref_loss[:, None]
            member_loss = tf.reduce_mean(tf.cast(member_losses, tf.float64), axis=1)
            out = {
                "member_loss": member_loss,
                "self_influence": tf.reduce_mean(tf.square(deviations), axis=1),
                "deviations": deviations,
                "reference_loss": ref_loss,
                "predictions": ref_pred,
            }
            if margin:
                mean_probs = tf.add_n([loss.probabilities(p) for p in preds]) / len(preds)
                other = _other_class_log_probs(loss.kind, y, mean_probs)
                out["member_margin"] = member_loss + OTHER_CLASS_WEIGHT * other
            return out

        self.score = tf.function(score, input_signature=[x_spec, y_spec], autograph=False)
        if report is None:
            return
        # The report's cut on its own score: a row above it is one its rule flags.
        self.score_method = tf.Variable(report.score_method, trainable=False)
        self.threshold = tf.Variable(_gate_cut(report), dtype=tf.float64, trainable=False)
        name = report.score_method

        def flag(x, y):
            return tf.cast(score(x, y)[name], tf.float64) > self.threshold

        self.flag = tf.function(flag, input_signature=[x_spec, y_spec], autograph=False)


def _gate_cut(report) -> float:
    """The cut `flag` applies: midway between the report's highest score not
    flagged and its lowest flagged one, where it has both.

    `report.threshold` is the highest score not flagged itself, so the float
    rounding of TensorFlow's route could flag that row; midway, the rows
    flagged are the report's.

    >>> from types import SimpleNamespace as Report
    >>> scores = np.array([0.1, 0.2, 0.5, 0.9])
    >>> _gate_cut(Report(scores=scores, noisy_mask=scores > 0.2, threshold=0.2))
    0.35
    >>> _gate_cut(Report(scores=scores, noisy_mask=scores > 0.9, threshold=0.9))  # none flagged
    0.9
    """
    scores = np.asarray(report.scores, dtype=np.float64)
    flagged = np.asarray(report.noisy_mask, bool)
    if not flagged.any() or flagged.all():
        return float(report.threshold)
    return float((scores[~flagged].max() + scores[flagged].min()) / 2)


def _check_report(report, ensemble, label_spec) -> None:
    """Refuses a `report` whose cut the artifact of `ensemble` cannot carry."""
    from keras_gex.analysis.report import NoisyLabelReport

    if report is None:
        return
    if not isinstance(report, NoisyLabelReport):
        raise TypeError(
            "Argument `report` must be a `NoisyLabelReport` (from `detect_noisy`). "
            f"Received: report of type {type(report).__name__}"
        )
    if report.ensemble is not ensemble:
        raise ValueError(
            "Argument `report` must be scored with the ensemble being exported: its "
            "threshold is a cut on that ensemble's scores. Pass the report that "
            "`detect_noisy(data, ensemble)` returned."
        )
    if report.score_method == "member_margin" and not _has_margin(ensemble, label_spec):
        raise ValueError(
            'Argument `report` ranks by "member_margin", which labels of '
            f"`label_spec={label_spec}` (several per row) do not have."
        )


def _has_margin(ensemble, label_spec) -> bool:
    """Whether labels of `label_spec` are one of mutually exclusive classes per
    row (`scores.exclusive_classes`), so the member margin is defined.

    A dimension of unknown size past the batch may hold several labels per
    row: read as 2, so that only a spec that fixes one label per row has one.
    """
    if not ensemble.loss.is_classification:
        return False
    if label_spec.shape.rank is None:  # one sigmoid output (`_default_label_spec`)
        return True
    shape = [1, *(d if d is not None else 2 for d in label_spec.shape.as_list()[1:])]
    return exclusive_classes(ensemble.loss.kind, np.zeros(shape))


def _other_class_log_probs(kind: str, y, probabilities):
    """`(N,)` float64 log of the likeliest class other than the label `y` (traced).

    `scores.other_class_log_probs` in TensorFlow: the same classes, the same
    floor for a class the members rule out.
    """
    p = tf.cast(probabilities, tf.float64)
    p = tf.reshape(p, [tf.shape(p)[0], -1])
    if kind == "binary_crossentropy":
        p = tf.concat([1.0 - p, p], axis=1)
        given = tf.cast(tf.reshape(tf.cast(y, tf.float64), [-1]) > 0.5, tf.int64)
    elif kind == "categorical_crossentropy":
        given = tf.argmax(y, axis=-1)
    else:
        given = tf.reshape(tf.cast(y, tf.int64), [-1])
    is_given = tf.one_hot(given, tf.shape(p)[1], on_value=True, off_value=False)
    others = tf.where(is_given, tf.constant(-np.inf, tf.float64), p)
    return tf.math.log(tf.maximum(tf.reduce_max(others, axis=1), np.finfo(np.float64).tiny))


def _default_input_spec(model):
    """The model's symbolic inputs as specs with a free batch dimension, in the
    structure the model takes (one spec, or a dict or list for several)."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            "Pass `input_spec=`: the model has no symbolic inputs to read the input "
            "shape from (a subclassed model)."
        )

    def spec(tensor, name):
        return tf.TensorSpec([None, *tensor.shape[1:]], tensor.dtype, name=name)

    if len(inputs) == 1:
        return spec(inputs[0], "x")
    structure = model.input  # a functional model's dict or list of inputs
    if isinstance(structure, dict):
        return {key: spec(tensor, key) for key, tensor in structure.items()}
    return [spec(tensor, f"x{i}") for i, tensor in enumerate(inputs)]


def _default_label_spec(ensemble):
    out = ensemble.model.outputs[0] if getattr(ensemble.model, "outputs", None) else None
    if ensemble.loss.kind == "sparse_categorical_crossentropy":
        return tf.TensorSpec([None], tf.int64, name="y")
    if out is None:
        raise ValueError("Pass `label_spec=`: the model has no symbolic output shape.")
    if tuple(out.shape[1:]) == (1,):  # labels as `fit` takes them, (N,) or (N, 1)
        return tf.TensorSpec(None, tf.float32, name="y")
    return tf.TensorSpec([None, *out.shape[1:]], tf.float32, name="y")


def export_scorer(ensemble, path, *, input_spec=None, label_spec=None, report=None) -> str:
    """Saves a TensorFlow-only scorer of `ensemble` as a SavedModel at `path`.

    Args:
        ensemble: A `GeometricEnsemble`.
        path: Output directory.
        input_spec: `tf.TensorSpec` of an input batch, or a dict or list of
            them for a model with several inputs, as the model takes them.
            Defaults to `None` (the model's inputs with a free batch
            dimension: a dict by input name for a model built on a dict of
            inputs, else a list).
        label_spec: `tf.TensorSpec` of a label batch. Defaults to `None`
            (int64 class ids for sparse cross-entropy; float32 labels `(N,)` or
            `(N, 1)` for one output unit, as `fit` takes them; otherwise float32
            shaped like the model's output).
        report: A `NoisyLabelReport` of `ensemble` whose cut the artifact
            carries: its `flag(x, y)` is True for a row whose
            `report.score_method` score lies above the report's cut (a row
            that report's rule would flag), and `score_method` and
            `threshold` hold the two. The cut lies midway between the
            report's highest score not flagged (`report.threshold`) and its
            lowest flagged one, so that float rounding flags the report's
            rows. `flag` is also the artifact's "flag" signature. Defaults to
            `None` (scores only).

    The artifact's `score(x, y)` returns, per row: "member_loss" (the members'
    mean loss on the label) and, where each row's label is one of mutually
    exclusive classes, "member_margin" (that loss less half the loss of the
    likeliest other class under the members' mean prediction): the scores
    `detect_noisy` ranks by, "member_margin" where present (higher is more
    suspect; a row above a report's `threshold` is one its rule would
    flag). Also "self_influence", "deviations" `(N, M)`, "reference_loss"
    (θ*'s loss) and "predictions" (θ*'s outputs).

    Returns:
        The path written.

    Example:

    ```python
    keras_gex.export_scorer(ensemble, "gex_scorer")
    # later, anywhere with TensorFlow:
    scorer = tf.saved_model.load("gex_scorer")
    out = scorer.score(x_batch, y_batch)
    scores = out.get("member_margin", out["member_loss"])  # what detect_noisy ranks by
    # or, exported with `report=report`, that report's cut too:
    suspect = scorer.flag(x_batch, y_batch)
    ```

    Raises:
        TypeError: If a spec is not a `tf.TensorSpec` (or, for the input, a
            dict or list of them), or `report` is not a `NoisyLabelReport`.
        ValueError: If the model has no symbolic inputs to read `input_spec`
            from, two specs share a name, or `report` was not scored with
            `ensemble` or ranks by a score these labels do not have.
    """
    if input_spec is None:
        input_spec = _default_input_spec(ensemble.model)
    if label_spec is None:
        label_spec = _default_label_spec(ensemble)
    leaves = tf.nest.flatten(input_spec)
    if not leaves or not all(isinstance(spec, tf.TensorSpec) for spec in leaves):
        raise TypeError(
            "Argument `input_spec` must be a `tf.TensorSpec`, or a dict or list of them "
            f"for a model with several inputs. Received: {input_spec!r}"
        )
    if not isinstance(label_spec, tf.TensorSpec):
        raise TypeError(
            f"Argument `label_spec` must be a `tf.TensorSpec`. Received: {label_spec!r}"
        )
    names = [spec.name for spec in leaves if spec.name] + [label_spec.name or "y"]
    if len(set(names)) != len(names):  # the signatures take every spec by its name
        raise ValueError(
            f"The input and label specs must have distinct names; received {names}. "
            "Pass `input_spec=` or `label_spec=` with other names."
        )
    _check_report(report, ensemble, label_spec)
    module = _ExportedScorer(ensemble, input_spec, label_spec, report)
    path = os.fspath(path)
    signatures = {"serving_default": module.score}
    if report is not None:
        signatures["flag"] = module.flag
    tf.saved_model.save(module, path, signatures=signatures)
    return path
