"""keras_gex: find the training examples that matter, and the ones that are wrong.

GEX (Kim, Kim & Yang, NeurIPS 2023) fine-tunes a few copies of a trained model
with SGD (the geometric ensemble) and scores every example by how much its
loss deviates across the copies. High self-influence marks mislabeled
examples; low self-influence marks prunable ones.
"""

from keras_gex.analysis.clean import clean, compare_models
from keras_gex.analysis.detect import detect_noisy
from keras_gex.analysis.influence import InfluenceKernel, TopK, influence, top_k
from keras_gex.analysis.prune import PruneResult, prune
from keras_gex.analysis.relabel import distillation_targets, relabel
from keras_gex.analysis.report import NoisyLabelReport
from keras_gex.analysis.sources import SourceSeparation, source_separation
from keras_gex.analysis.thresholding import otsu_separability, otsu_threshold
from keras_gex.callback import GEXCollector
from keras_gex.config import CollectionConfig, CollectionRecord
from keras_gex.ensemble import Deviations, GeometricEnsemble
from keras_gex.io.export import export_scorer
from keras_gex.io.plots import plot_gallery, plot_proponents, plot_self_influence
from keras_gex.losses import SoftTargetCrossentropy
from keras_gex.version import __version__

__all__ = [
    "CollectionConfig",
    "CollectionRecord",
    "Deviations",
    "GEXCollector",
    "GeometricEnsemble",
    "InfluenceKernel",
    "NoisyLabelReport",
    "PruneResult",
    "SoftTargetCrossentropy",
    "SourceSeparation",
    "TopK",
    "__version__",
    "clean",
    "compare_models",
    "detect_noisy",
    "distillation_targets",
    "export_scorer",
    "influence",
    "otsu_separability",
    "otsu_threshold",
    "plot_gallery",
    "plot_proponents",
    "plot_self_influence",
    "prune",
    "relabel",
    "source_separation",
    "top_k",
]
