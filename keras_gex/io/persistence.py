"""Saving, loading and resuming geometric ensembles on disk.

A GE directory holds Keras `.weights.h5` files and a JSON manifest::

    manifest.json            library version, hyperparameters, calibration, loss,
                             fingerprints of the architecture and of θ*, member list
    reference.weights.h5     θ* as scored (BatchNorm statistics re-estimated)
    member_000.weights.h5    one file per member, written as soon as it is done

Every file is written under a temporary name and renamed into place, so a
crash or kill never leaves a half-written file under a final name; a resumed
collection continues at the first missing member.

Fingerprints compare shapes and dtypes of the variables in order (not layer
names, which Keras numbers per process) and the bytes of θ*'s floating-point
variables (integer state such as dropout seeds is excluded: it changes when the
model is merely called in training mode).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile

import numpy as np

from keras_gex.version import __version__
from keras_gex.weights import WeightSet

MANIFEST = "manifest.json"
REFERENCE_FILE = "reference.weights.h5"
FORMAT = "keras_gex.geometric_ensemble"
FORMAT_VERSION = 1

#: Hyperparameters that must match for a collection to resume in a directory.
RESUME_KEYS = ("steps", "batch_size", "momentum", "chain", "bn_batches", "loss", "learning_rate")
#: Values of resume keys added since format 1, for manifests written before them.
RESUME_DEFAULTS = {"weight_decay": 0.0}


def member_file(index: int) -> str:
    return f"member_{index:03d}.weights.h5"


def architecture_fingerprint(model) -> str:
    """Hash of the variables' shapes and dtypes, trainable then non-trainable."""
    desc = [[list(v.shape), str(v.dtype)] for v in model.trainable_variables] + [
        ["nt", list(v.shape), str(v.dtype)] for v in model.non_trainable_variables
    ]
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]


def weights_fingerprint(weights: WeightSet) -> str:
    """Hash of the floating-point weights' bytes (integer state excluded)."""
    digest = hashlib.sha256()
    for array in weights.trainable + weights.non_trainable:
        array = np.ascontiguousarray(array)
        if np.issubdtype(array.dtype, np.floating):
            digest.update(str(array.shape).encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _atomic_write_text(path: str, text: str) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def _assigned(model, weights: WeightSet):
    """Temporarily loads `weights` into `model`; restores its own values after."""
    saved = WeightSet.from_model(model)
    try:
        _assign(model, weights)
        yield model
    finally:
        _assign(model, saved)


def _assign(model, weights: WeightSet) -> None:
    for var, value in zip(model.trainable_variables, weights.trainable):
        var.assign(value)
    for var, value in zip(model.non_trainable_variables, weights.non_trainable):
        var.assign(value)


def write_weights(model, weights: WeightSet, path: str) -> None:
    """Writes `weights` as a Keras `.weights.h5` file, atomically."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        with _assigned(model, weights):
            model.save_weights(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_weights(model, path: str) -> WeightSet:
    """Reads a `.weights.h5` file written by `write_weights` for `model`."""
    saved = WeightSet.from_model(model)
    try:
        model.load_weights(path)
        return WeightSet.from_model(model)
    finally:
        _assign(model, saved)


#: Entries every manifest has from its first write (a complete one also has "loss").
_MANIFEST_KEYS = {
    "architecture_fingerprint": str,
    "theta_fingerprint": str,
    "config": dict,
    "members": list,
}
_LOSS_KEYS = ("name", "kind", "from_logits")


def _damaged(path: str, received: str) -> ValueError:
    return ValueError(
        f"The ensemble manifest {path!r} is damaged: expected the JSON object keras_gex "
        f"writes there. Received: {received}. Restore the file, or delete the directory "
        "(or pass another one) to collect afresh."
    )


def read_manifest(directory: str) -> dict | None:
    """The manifest of the GE directory `directory`, or None when it has none.

    Raises:
        ValueError: If the manifest is not valid JSON, not a keras_gex
            manifest, lacks an entry keras_gex writes, or was written by a
            newer keras_gex.
    """
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except json.JSONDecodeError as err:
        raise _damaged(
            path, f"invalid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from err
    except UnicodeDecodeError as err:
        raise _damaged(path, f"bytes that are not UTF-8 text ({err.reason})") from err
    if not isinstance(manifest, dict):
        raise _damaged(path, f"a JSON {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a keras_gex ensemble manifest: expected format={FORMAT!r}. "
            f"Received: format={manifest.get('format')!r}"
        )
    version = manifest.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise _damaged(path, f"format_version={version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer keras_gex (format "
            f"{manifest['format_version']}); upgrade keras_gex to read it."
        )
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            received = "no such entry" if key not in manifest else f"{key}={manifest[key]!r}"
            raise _damaged(path, f"{received} where a {kind.__name__} `{key}` is expected")
    if "calibrated_learning_rate" not in manifest:
        raise _damaged(path, "no `calibrated_learning_rate` entry")
    for entry in manifest["members"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise _damaged(path, f"member entry {entry!r} without a `file`")
        if "stats" not in entry:
            raise _damaged(path, f"member entry {entry!r} without `stats`")
    if manifest.get("complete"):
        loss = manifest.get("loss")
        if not isinstance(loss, dict) or any(key not in loss for key in _LOSS_KEYS):
            raise _damaged(path, f"loss={loss!r} where a dict with {list(_LOSS_KEYS)} is expected")
    return manifest


def check_compatible(manifest: dict, model, theta_star: WeightSet, directory: str) -> None:
    """Raises `ValueError` naming the mismatch between `model` and a manifest."""
    arch = architecture_fingerprint(model)
    if manifest["architecture_fingerprint"] != arch:
        raise ValueError(
            f"The ensemble in {directory!r} was collected for a different architecture "
            f"(fingerprint {manifest['architecture_fingerprint']}, this model {arch}: "
            "the variables' shapes or dtypes differ). Load it with the model it was "
            "collected from."
        )
    theta = weights_fingerprint(theta_star)
    if manifest["theta_fingerprint"] != theta:
        raise ValueError(
            f"The ensemble in {directory!r} was collected from different trained weights "
            f"θ* (fingerprint {manifest['theta_fingerprint']}, this model {theta}). "
            "The model was retrained or changed since; collect a new ensemble."
        )


@dataclasses.dataclass
class MemberStore:
    """The GE directory of an ongoing collection: resume state and atomic writes.

    Args:
        directory: The directory (created if missing).
        model: The model being explained (θ*).
        config: Hyperparameters of the collection (see `RESUME_KEYS`).
    """

    directory: str
    model: object
    config: dict

    def __post_init__(self):
        os.makedirs(self.directory, exist_ok=True)
        self._theta = WeightSet.from_model(self.model)
        self.manifest = read_manifest(self.directory)
        if self.manifest is None:
            self.manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "library_version": __version__,
                "architecture_fingerprint": architecture_fingerprint(self.model),
                "theta_fingerprint": weights_fingerprint(self._theta),
                "config": dict(self.config),
                "calibrated_learning_rate": None,
                "calibration": [],
                "members": [],
                "complete": False,
            }
            return
        check_compatible(self.manifest, self.model, self._theta, self.directory)
        stored = self.manifest["config"]
        for key in (*RESUME_KEYS, *RESUME_DEFAULTS):
            started = stored.get(key, RESUME_DEFAULTS.get(key))
            if started != self.config.get(key):
                raise ValueError(
                    f"Cannot resume the collection in {self.directory!r}: it was started "
                    f"with {key}={started!r}, this call has "
                    f"{key}={self.config.get(key)!r}. Use the same arguments or another "
                    "directory."
                )
        if self.config.get("seed") is not None and stored.get("seed") != self.config["seed"]:
            raise ValueError(
                f"Cannot resume the collection in {self.directory!r}: it was started "
                f"with seed={stored.get('seed')!r}, this call has seed={self.config['seed']!r}."
            )

    @property
    def seed(self):
        return self.manifest["config"].get("seed")

    def set_seed(self, seed: int) -> None:
        self.manifest["config"]["seed"] = seed
        self._write_manifest()

    @property
    def calibrated(self) -> bool:
        return self.manifest["calibrated_learning_rate"] is not None

    def save_calibration(self, learning_rate: float, weight_decay: float, calibration: list):
        self.manifest["calibrated_learning_rate"] = learning_rate
        self.manifest["calibrated_weight_decay"] = weight_decay
        self.manifest["calibration"] = calibration
        self._write_manifest()

    def saved_members(self) -> list:
        """`(WeightSet, stats dict, redone steps)` of every member on disk, in order.

        The redone steps are those of the member runs redone before the member
        was kept (0 in a store written before they were saved).
        """
        out = []
        for entry in self.manifest["members"]:
            path = os.path.join(self.directory, entry["file"])
            if not os.path.exists(path):
                break
            redone = entry.get("redone_steps", 0)
            out.append((read_weights(self.model, path), entry["stats"], redone))
        return out

    def save_member(
        self, index: int, weights: WeightSet, stats: dict, redone_steps: int = 0
    ) -> None:
        if index != len(self.manifest["members"]):
            raise RuntimeError(f"member {index} saved out of order")
        name = member_file(index)
        write_weights(self.model, weights, os.path.join(self.directory, name))
        entry = {"file": name, "stats": stats, "redone_steps": int(redone_steps)}
        self.manifest["members"].append(entry)
        self._write_manifest()

    def finalize(self, reference: WeightSet, info: dict, loss) -> None:
        write_weights(self.model, reference, os.path.join(self.directory, REFERENCE_FILE))
        self.manifest["info"] = _jsonable(info)
        self.manifest["loss"] = _loss_entry(loss)
        self.manifest["num_members"] = len(self.manifest["members"])
        self.manifest["complete"] = True
        self._write_manifest()

    def _write_manifest(self) -> None:
        _atomic_write_text(
            os.path.join(self.directory, MANIFEST), json.dumps(_jsonable(self.manifest), indent=2)
        )


def _loss_entry(loss) -> dict:
    return {
        "name": loss.name,
        "kind": loss.kind,
        "from_logits": loss.from_logits,
        "inferred": loss.inferred,
    }


def _as_collected(loss, saved: dict):
    """`loss` with the kind it was collected under where that kind was read from
    the outputs and labels (`loss_checks.read_as_classifier`), not from the loss."""
    if saved.get("inferred") and loss.kind == "other" and loss.name == saved["name"]:
        return dataclasses.replace(
            loss, kind=saved["kind"], from_logits=saved["from_logits"], inferred=True
        )
    return loss


def save_ensemble(directory: str, model, reference, members: list, loss, info: dict) -> None:
    """Writes θ* as scored, every member and the manifest to `directory`."""
    os.makedirs(directory, exist_ok=True)
    for index, member in enumerate(members):
        write_weights(model, member, os.path.join(directory, member_file(index)))
    write_weights(model, reference, os.path.join(directory, REFERENCE_FILE))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "architecture_fingerprint": architecture_fingerprint(model),
        "theta_fingerprint": weights_fingerprint(WeightSet.from_model(model)),
        "config": {k: info.get(k) for k in RESUME_KEYS},
        "calibrated_learning_rate": info.get("learning_rate"),
        "calibrated_weight_decay": info.get("weight_decay"),
        "calibration": info.get("calibration", []),
        "members": [
            {"file": member_file(i), "stats": s}
            for i, s in enumerate(info.get("member_stats") or [{}] * len(members))
        ],
        "info": info,
        "loss": _loss_entry(loss),
        "num_members": len(members),
        "complete": True,
    }
    _atomic_write_text(os.path.join(directory, MANIFEST), json.dumps(_jsonable(manifest), indent=2))


def load_ensemble(directory: str, model, loss) -> tuple:
    """`(reference, members, info, loss)` of a complete ensemble in `directory`.

    `loss` is the model's, read as the kind it was collected under where
    that kind was read from the outputs and labels (`_as_collected`).

    Raises:
        FileNotFoundError: If `directory` holds no ensemble.
        ValueError: If the model's architecture, θ* or `loss` differ from the
            saved ones, or the collection there is incomplete.
    """
    manifest = read_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(f"No keras_gex ensemble in {directory!r} ({MANIFEST} missing).")
    if not manifest.get("complete"):
        done = len(manifest.get("members", []))
        raise ValueError(
            f"The collection in {directory!r} is incomplete ({done} member(s) "
            "written). Re-run the same collection with `directory=` to resume it."
        )
    check_compatible(manifest, model, WeightSet.from_model(model), directory)
    saved = manifest["loss"]
    loss = _as_collected(loss, saved)
    if (loss.kind, loss.from_logits) != (saved["kind"], saved["from_logits"]) or (
        loss.kind == "other" and loss.name != saved["name"]
    ):
        fix = "Pass the original `loss=`."
        if loss.name == saved["name"] and loss.from_logits == saved["from_logits"]:
            fix = "This version reads that loss as another kind; collect the ensemble again."
        raise ValueError(
            f"The ensemble in {directory!r} was collected with loss "
            f"{saved['name']!r} (kind {saved['kind']}, from_logits={saved['from_logits']}), "
            f"but the model's loss is {loss.name!r} (kind {loss.kind}, "
            f"from_logits={loss.from_logits}). {fix}"
        )
    members = [
        read_weights(model, os.path.join(directory, entry["file"])) for entry in manifest["members"]
    ]
    reference = read_weights(model, os.path.join(directory, REFERENCE_FILE))
    return reference, members, manifest.get("info"), loss


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
