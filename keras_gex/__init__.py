"""keras_gex: find the training examples that matter, and the ones that are wrong.

GEX (Kim, Kim & Yang, NeurIPS 2023) fine-tunes a few copies of a trained model
with SGD (the geometric ensemble) and scores every example by how much its
loss deviates across the copies. High self-influence marks mislabeled
examples; low self-influence marks prunable ones.
"""

# The public names are imported on first use (PEP 562), not here: `import keras_gex`
# (and so the `keras-gex` command, whose `--help` needs no TensorFlow) stays light,
# and TensorFlow starts with the first name that needs it.

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

from keras_gex.version import __version__

#: Public name (each in `__all__` but the submodules) -> the module that defines it.
_EXPORTS = {
    "clean": "keras_gex.analysis.clean",
    "compare_models": "keras_gex.analysis.clean",
    "detect_noisy": "keras_gex.analysis.detect",
    "InfluenceKernel": "keras_gex.analysis.influence",
    "TopK": "keras_gex.analysis.influence",
    "influence": "keras_gex.analysis.influence",
    "top_k": "keras_gex.analysis.influence",
    "PruneResult": "keras_gex.analysis.prune",
    "prune": "keras_gex.analysis.prune",
    "distillation_targets": "keras_gex.analysis.relabel",
    "relabel": "keras_gex.analysis.relabel",
    "NoisyLabelReport": "keras_gex.analysis.report",
    "SourceSeparation": "keras_gex.analysis.sources",
    "source_separation": "keras_gex.analysis.sources",
    "min_error_threshold": "keras_gex.analysis.thresholding",
    "otsu_separability": "keras_gex.analysis.thresholding",
    "otsu_threshold": "keras_gex.analysis.thresholding",
    "GEXCollector": "keras_gex.callback",
    "CollectionConfig": "keras_gex.config",
    "CollectionRecord": "keras_gex.config",
    "Deviations": "keras_gex.ensemble",
    "GeometricEnsemble": "keras_gex.ensemble",
    "export_scorer": "keras_gex.io.export",
    "plot_gallery": "keras_gex.io.plots",
    "plot_proponents": "keras_gex.io.plots",
    "plot_self_influence": "keras_gex.io.plots",
    "SoftTargetCrossentropy": "keras_gex.losses",
}

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
    "baselines",
    "clean",
    "compare_models",
    "datasets",
    "detect_noisy",
    "distillation_targets",
    "export_scorer",
    "influence",
    "min_error_threshold",
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


if "keras" in sys.modules:
    # Keras is loaded already, so this is cheap: register `SoftTargetCrossentropy`
    # for `keras.models.load_model`, as the eager package did on import.
    from keras_gex import losses  # noqa: F401


def __getattr__(name: str):
    """Imports a public name (or a submodule, e.g. `keras_gex.losses`) on first use."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise  # the submodule exists but one of its imports is missing
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see; the same names as `__all__`
    from keras_gex import baselines, datasets
    from keras_gex.analysis.clean import clean, compare_models
    from keras_gex.analysis.detect import detect_noisy
    from keras_gex.analysis.influence import InfluenceKernel, TopK, influence, top_k
    from keras_gex.analysis.prune import PruneResult, prune
    from keras_gex.analysis.relabel import distillation_targets, relabel
    from keras_gex.analysis.report import NoisyLabelReport
    from keras_gex.analysis.sources import SourceSeparation, source_separation
    from keras_gex.analysis.thresholding import (
        min_error_threshold,
        otsu_separability,
        otsu_threshold,
    )
    from keras_gex.callback import GEXCollector
    from keras_gex.config import CollectionConfig, CollectionRecord
    from keras_gex.ensemble import Deviations, GeometricEnsemble
    from keras_gex.io.export import export_scorer
    from keras_gex.io.plots import plot_gallery, plot_proponents, plot_self_influence
    from keras_gex.losses import SoftTargetCrossentropy
