"""New photos through the detector (detection.pipeline's front door): each process of a torchrun job extracts
and embeds its shares, and the first yields them, a step at a time, to be committed."""

import os

from detection.pipeline import detect_pictures
from photo_library.photos import FailedPhoto, embed, thumbnail
from photo_library.rows import check_feature_dim
from utils.errors import OptionError


def detector_photos(photos, recipe, models, world, device, batch_size, workers):
    """Yield, on the first process, a list per step of the EmbeddedPhoto or FailedPhoto of each NewPhoto of
    `photos`, in their order; the other processes extract and embed their shares and yield nothing."""
    from detection.weights import load_detector

    path = recipe.detector["path"]
    if not os.path.isfile(path):
        raise OptionError.naming(
            "{path}: the library's detector weights are not there; give them with {detector}", path=path
        )
    detector = load_detector(path, recipe.config_path, device)
    feature_dim = models.feature_dim

    def embedded(found, pictures):
        """The share's photos embedded where they were extracted (their pictures give the thumbnails)."""
        ready = []
        for d, picture in zip(found, pictures):
            if d.regions is not None:
                check_feature_dim(d.regions, photos[d.index].path, feature_dim)
                ready.append((photos[d.index], d.regions, thumbnail(picture)))
        done = iter(embed(models.models, recipe.features_dtype, ready))
        return [FailedPhoto(photos[d.index], d.problem) if d.problem else next(done) for d in found]

    paths = [photo.path for photo in photos]
    yield from detect_pictures(detector, paths, recipe.settings, world, batch_size, workers, finish=embedded)
