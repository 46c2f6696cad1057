"""Export the ensemble's scorer as a TensorFlow SavedModel for production gates.

The exported artifact scores new `(x, y)` batches with the trained model θ*
and every GE member — self-influence, the deviation matrix and θ*'s loss —
using TensorFlow alone: no keras_gex, no training code, no Python model
definition. Load it with `tf.saved_model.load(path)` and call
`artifact.score(x, y)` (or serve the `serving_default` signature).
"""

from __future__ import annotations

import os

import tensorflow as tf

from keras_gex.weights import stateless_call


class _ExportedScorer(tf.Module):
    def __init__(self, ensemble, x_spec, y_spec):
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

        def score(x, y):
            ref_pred, _ = stateless_call(model, self._ref_t, self._ref_n, x, training=False)
            if y_spec.shape.rank is None:  # one sigmoid output: (N,) or (N, 1) labels
                y = tf.reshape(y, tf.shape(ref_pred))
            ref_loss = loss(y, ref_pred)
            losses = [
                loss(y, stateless_call(model, tv, ntv, x, training=False)[0])
                for tv, ntv in self._members
            ]
            deviations = tf.stack(losses, axis=1) - ref_loss[:, None]
            return {
                "self_influence": tf.reduce_mean(tf.square(deviations), axis=1),
                "deviations": deviations,
                "reference_loss": ref_loss,
                "predictions": ref_pred,
            }

        self.score = tf.function(score, input_signature=[x_spec, y_spec], autograph=False)


def _default_label_spec(ensemble):
    out = ensemble.model.outputs[0] if getattr(ensemble.model, "outputs", None) else None
    if ensemble.loss.kind == "sparse_categorical_crossentropy":
        return tf.TensorSpec([None], tf.int64, name="y")
    if out is None:
        raise ValueError("Pass `label_spec=`: the model has no symbolic output shape.")
    if tuple(out.shape[1:]) == (1,):  # labels as `fit` takes them, (N,) or (N, 1)
        return tf.TensorSpec(None, tf.float32, name="y")
    return tf.TensorSpec([None, *out.shape[1:]], tf.float32, name="y")


def export_scorer(ensemble, path, *, input_spec=None, label_spec=None) -> str:
    """Saves a TensorFlow-only scorer of `ensemble` as a SavedModel at `path`.

    Args:
        ensemble: A `GeometricEnsemble`.
        path: Output directory.
        input_spec: `tf.TensorSpec` of an input batch. Defaults to `None`
            (the model's input with a free batch dimension).
        label_spec: `tf.TensorSpec` of a label batch. Defaults to `None`
            (int64 class ids for sparse cross-entropy; float32 labels `(N,)` or
            `(N, 1)` for one output unit, as `fit` takes them; otherwise float32
            shaped like the model's output).

    Returns:
        The path written.

    Example:

    ```python
    keras_gex.export_scorer(ensemble, "gex_scorer")
    # later, anywhere with TensorFlow:
    scorer = tf.saved_model.load("gex_scorer")
    scores = scorer.score(x_batch, y_batch)["self_influence"]
    ```
    """
    model = ensemble.model
    if input_spec is None:
        inputs = getattr(model, "inputs", None)
        if not inputs or len(inputs) != 1:
            raise ValueError(
                "Pass `input_spec=`: the model has no single symbolic input to read the "
                "input shape from."
            )
        input_spec = tf.TensorSpec([None, *inputs[0].shape[1:]], inputs[0].dtype, name="x")
    if label_spec is None:
        label_spec = _default_label_spec(ensemble)
    for name, spec in (("input_spec", input_spec), ("label_spec", label_spec)):
        if not isinstance(spec, tf.TensorSpec):
            raise TypeError(f"Argument `{name}` must be a `tf.TensorSpec`. Received: {spec!r}")
    module = _ExportedScorer(ensemble, input_spec, label_spec)
    path = os.fspath(path)
    tf.saved_model.save(module, path, signatures={"serving_default": module.score})
    return path
