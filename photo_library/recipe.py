"""What made a library: its checkpoints, vocabulary, detector and region settings, recorded when it is
made. An update or a query with other ones would mix vectors that cannot be compared: it is refused in
one line naming both, and `index.py --rebuild` re-embeds the kept regions with new checkpoints.

Files are named by the SHA-256 of their content; the digest of a file whose path, size and
modification time are those recorded is not computed again (a rerun reads no checkpoint).
"""

import dataclasses
import os
from dataclasses import dataclass

from detection.settings import RegionSettings
from utils.digest import file_digest
from utils.errors import OptionError
from vocab import vocab_digest

SETTINGS_FIELDS = ("policy", "boxes", "min_size", "max_size", "proposals")  # the region settings a run may give


def file_record(path, known=None):
    """{path (absolute), size, mtime_ns, digest} of a file; the digest of a record in `known` with the
    same path, size and modification time is taken as it is."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        return None
    status = os.stat(path)
    for record in known or ():
        if (record["path"], record["size"], record["mtime_ns"]) == (path, status.st_size, status.st_mtime_ns):
            return dict(record)
    return {"path": path, "size": status.st_size, "mtime_ns": status.st_mtime_ns, "digest": file_digest(path)}


def short(record):
    return f"{record['path']} (sha256 {record['digest'][:12]})"


def checkpoint_records(paths, recorded, library, rebuild=False):
    """The checkpoints' records for this run: `paths` (the command's, or None for the recorded ones),
    checked against the library's unless `rebuild`."""
    if paths:
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            raise OptionError.naming("{checkpoint} {path}: checkpoint not found", path=missing[0])
        records = [file_record(path, recorded) for path in paths]
    elif recorded:
        records = [file_record(record["path"], recorded) for record in recorded]
        gone = [old for old, new in zip(recorded, records) if new is None]
        if gone:
            raise OptionError.naming(
                "{library}: its checkpoint {path} is not there any more; give the same file (digest {digest}) with "
                "{checkpoint}, or another one with {rebuild}",
                library=library,
                path=gone[0]["path"],
                digest=gone[0]["digest"][:12],
            )
    else:
        raise OptionError.naming(
            "{library}: give the VSRN checkpoint(s) that embed the photos: {checkpoint} M [M ...]", library=library
        )
    if recorded and not rebuild:
        ours = [record["digest"] for record in recorded]
        if [record["digest"] for record in records] != ours:
            made = ", ".join(short(record) for record in recorded)
            given = ", ".join(short(record) for record in records)
            raise OptionError.naming(
                "{library} was made with {made}; {given} would embed other vectors: give the library's checkpoints, "
                "or {rebuild} to re-embed its kept regions with these",
                library=library,
                made=made,
                given=given,
            )
    return records


def check_same(library, what, recorded, given, hint):
    """Refuse `given` (settings, or a file record: compared by its digest, wherever the file lies) when the
    library recorded other ones."""
    if recorded is None or given is None:
        return
    if ("digest" in recorded and recorded["digest"] != given["digest"]) or (
        "digest" not in recorded and recorded != given
    ):
        raise OptionError(
            f"{library} was made with {what} {describe(recorded)}; this run's is {describe(given)}: {hint}"
        )


def describe(value):
    if isinstance(value, dict) and "digest" in value:
        return short(value)
    if isinstance(value, dict):
        return ", ".join(f"{key} {item}" for key, item in sorted(value.items()))
    return str(value)


@dataclass
class Recipe:
    """What this run makes the library's photos with: checkpoint records, the detector's record and config,
    the region settings and how the kept region features are stored."""

    checkpoints: list
    detector: dict | None
    config_path: str | None
    config_digest: str | None
    settings: RegionSettings
    features_dtype: str

    def settings_record(self):
        """The region settings as the library records them: with the digest of the detector's config."""
        return {**self.settings.record(), "config": self.config_digest}

    def record(self, library, vocab, feature_dim, embedding_dim):
        """Write what made the library (before its first photos, and again by --rebuild): from then on other
        models are refused."""
        library.set_meta(
            checkpoints=self.checkpoints,
            vocab_words=[vocab.idx2word[i] for i in range(len(vocab))],
            vocab_digest=vocab_digest(vocab),
            models=[os.path.basename(record["path"]) for record in self.checkpoints],
            embedding_dim=embedding_dim,
            feature_dim=feature_dim,
            settings=self.settings_record(),
            features_dtype=self.features_dtype,
            detector=self.detector,
            detector_config=self.config_path and os.path.abspath(self.config_path),
        )


def check_recipe(request, library=None):
    """This run's Recipe: the request's (an IndexRequest) checkpoints, detector and region settings, checked
    against those `library` records (None: a new library), or the recorded ones where the request gives none.
    A library that holds no photos yet takes the request's whatever it recorded."""
    folder = request.library
    recorded = (lambda key: library.meta(key)) if library is not None else (lambda key: None)
    holds = library is not None and library.count() > 0  # a library without photos takes any recipe
    checkpoints = checkpoint_records(request.checkpoints, recorded("checkpoints"), folder, request.rebuild or not holds)
    recorded_detector = recorded("detector")
    detector = recorded_detector
    if request.detector:
        detector = file_record(request.detector, [recorded_detector] if recorded_detector else [])
        if detector is None:
            raise OptionError.naming("{detector} {path}: detector weights not found", path=request.detector)
    config = None
    if request.detector_config:
        config = file_record(request.detector_config)
        if config is None:
            raise OptionError.naming("{detector_config} {path}: file not found", path=request.detector_config)
    made = recorded("settings")
    given = {key: getattr(request, key) for key in SETTINGS_FIELDS if getattr(request, key) is not None}
    settings = dataclasses.replace(RegionSettings.from_record(made) if made else RegionSettings(), **given)
    recipe = Recipe(
        checkpoints=checkpoints,
        detector=detector,
        config_path=request.detector_config or recorded("detector_config"),
        config_digest=config["digest"] if config else made and made["config"],
        settings=settings,
        features_dtype=request.features_dtype or recorded("features_dtype") or "float32",
    )
    if holds:
        hint = "regions of other settings cannot share this library; make a new one"
        if request.detector and recorded_detector:  # the same weights elsewhere are the same detector
            check_same(folder, "the detector", recorded_detector, detector, hint)
        check_same(folder, "the region settings", made, recipe.settings_record(), hint)
        if recorded("features_dtype") not in (None, recipe.features_dtype):
            raise OptionError.naming(
                "{features_dtype} {dtype}: {folder} keeps its region features as {kept}; it is chosen when a "
                "library is made",
                dtype=recipe.features_dtype,
                folder=folder,
                kept=recorded("features_dtype"),
            )
    return recipe
