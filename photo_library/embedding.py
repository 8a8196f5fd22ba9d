"""A library's vectors: VSRN's image and text embeddings of one checkpoint, or of several as evaluation
averages them.

evaluation.evalrank scores an ensemble of n models by the average of their similarity matrices.
Each model's embedding scaled by 1/sqrt(n) and the n of them concatenated give that average as
one inner product: sum_m (i_m / sqrt(n)) . (c_m / sqrt(n)) = (1/n) sum_m i_m . c_m. So one vector
index over the concatenated image vectors ranks photos exactly as the ensemble does.
"""

import math

import numpy as np
import torch

from inference import encode_query, encode_regions
from utils.errors import OptionError


def check_models(models, paths):
    """The library scores by inner products: models of order embeddings (`--measure order`) cannot be indexed."""
    for model, path in zip(models, paths):
        if model.measure != "cosine":
            raise OptionError(
                f"--checkpoint {path}: scores with order embeddings (--measure order), which a vector index cannot rank"
            )


def image_vectors(models, features):
    """(vectors (B, sum of D) float32, each model's region scores (B, models, regions) float32) of region
    features (B, regions, F): the rows of the library's index and the attention maps' rankings."""
    scale = 1.0 / math.sqrt(len(models))
    embeddings, scores = [], []
    for model in models:
        embedding, region_scores = encode_regions(model, features)
        embeddings.append(embedding.cpu() * scale)
        scores.append(region_scores.cpu())
    return torch.cat(embeddings, dim=1).numpy(), torch.stack(scores, dim=1).numpy()


def text_vector(models, vocab, text):
    """(the query's vector (sum of D,) float32, its Query: the tokens and the words outside the vocabulary)."""
    query = encode_query(models, vocab, text)
    scale = 1.0 / math.sqrt(len(models))
    vector = torch.cat([embedding[0] * scale for embedding in query.embeddings]).numpy().astype(np.float32)
    return vector, query
