"""keras_gex: find the training examples that matter, and the ones that are wrong.

GEX (Kim, Kim & Yang, NeurIPS 2023) fine-tunes a few copies of a trained model
with SGD (the geometric ensemble) and scores every example by how much its
loss deviates across the copies. High self-influence marks mislabeled
examples; low self-influence marks prunable ones.
"""

from keras_gex.callback import GEXCollector
from keras_gex.detect import detect_noisy
from keras_gex.ensemble import Deviations, GeometricEnsemble
from keras_gex.losses import SoftTargetCrossentropy
from keras_gex.relabel import distillation_targets, relabel
from keras_gex.report import NoisyLabelReport
from keras_gex.thresholding import otsu_threshold
from keras_gex.version import __version__

__all__ = [
    "Deviations",
    "GEXCollector",
    "GeometricEnsemble",
    "NoisyLabelReport",
    "SoftTargetCrossentropy",
    "__version__",
    "detect_noisy",
    "distillation_targets",
    "otsu_threshold",
    "relabel",
]
