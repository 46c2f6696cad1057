"""Collecting the geometric ensemble: fine-tuned copies of θ*.

`driver.collect` runs the one collection loop; `tuner` holds what every
fine-tuner shares, `local` / `replicated` what differs on one device and under
`tf.distribute`, and `step_size` the whole member rule.
"""

from keras_gex.collection.driver import CollectionResult, collect

__all__ = ["CollectionResult", "collect"]
