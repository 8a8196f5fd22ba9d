"""A library's vectors: VSRN's image and text embeddings of one checkpoint, or of several as evaluation
averages them.

evaluation.evalrank scores an ensemble of n models by the average of their similarity matrices.
Each model's embedding scaled by 1/sqrt(n) and the n of them concatenated give that average as
one inner product: sum_m (i_m / sqrt(n)) . (c_m / sqrt(n)) = (1/n) sum_m i_m . c_m. So one vector
index over the concatenated image vectors ranks photos exactly as the ensemble does.
"""

import collections
import concurrent.futures
import math
import queue
import threading
from dataclasses import dataclass

import torch

from inference import encode_regions, encode_token_lists, load_models
from utils.errors import OptionError
from vocab import vocabulary_from_words


@dataclass
class LibraryModels:
    """The checkpoints that embed a library's photos and queries, with their vocabulary."""

    vocab: object
    models: list
    feature_dim: int  # the region features their image encoder takes

    @property
    def embedding_dim(self):
        """The size of the library's vectors: the models' embeddings side by side."""
        return sum(model.img_enc.embed_size for model in self.models)


def load_library_models(paths, words=None, folder=None, vocab_path=None, device=None):
    """The LibraryModels of the checkpoints at `paths`, with the vocabulary a library keeps (`words`, of the
    library in `folder`), else their own vocabulary file (found as inference.load_models finds it)."""
    vocab = None
    if words is not None:
        vocab = vocabulary_from_words(words)
        vocab.path = f"the vocabulary kept in {folder}"
    opt, vocab, models = load_models(paths, vocab_path=vocab_path, need_data=False, device=device, vocab=vocab)
    check_models(models, paths)
    return LibraryModels(vocab, models, opt.img_dim)


def check_models(models, paths):
    """The library scores by inner products: models of order embeddings (`--measure order`) cannot be indexed."""
    for model, path in zip(models, paths):
        if model.measure != "cosine":
            raise OptionError.naming(
                "{checkpoint} {path}: scores with order embeddings (measure order), which a vector index cannot rank",
                path=path,
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


def text_vectors(models, vocab, token_lists, encoders=None):
    """The vectors (B, sum of D) float32 of tokenized sentences, encoded as one batch by each model, or
    by `encoders`, one `inference.text_encoder` per model (None: the models' own, float32)."""
    scale = 1.0 / math.sqrt(len(models))
    encoders = encoders or [None] * len(models)
    return torch.cat(
        [encode_token_lists(model, vocab, token_lists, encoder) * scale for model, encoder in zip(models, encoders)],
        dim=1,
    ).numpy()


class RecentQueries:
    """The vectors of the most recent `most` sentences, by a key that names what encoded them (the
    checkpoints' digests and the text path) and the sentence's tokens: typing a query again costs no
    encoding, and a library's new checkpoints (index.py --rebuild) make new keys, so no vector of the
    old ones is served for them. The vectors are read-only. Threads share it."""

    def __init__(self, most=1024):
        self.most = most
        self.vectors = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            vector = self.vectors.get(key)
            if vector is not None:
                self.vectors.move_to_end(key)
            return vector

    def put(self, key, vector):
        vector = vector.copy()
        vector.flags.writeable = False
        with self.lock:
            self.vectors[key] = vector
            self.vectors.move_to_end(key)
            while len(self.vectors) > self.most:
                self.vectors.popitem(last=False)
        return vector


class QueryBatcher:
    """Sentences that arrive while the text encoder is busy are encoded together, in one batch.

    A query's cost is its text encoder's recurrent weights, read once per word (50 MB for the
    released models in float32, 12.6 MB in int8), so a batch of queries costs little more than one
    does. A lone query waits for nothing: it is encoded at once.
    `encode(encoders, token_lists)`: the vectors of sentences by one set of encoders (queries begun
    before and after a library's new checkpoints are encoded each by their own). The searcher batches
    its index searches the same way: `encode(epoch, requests)` answers each request in order.
    """

    def __init__(self, encode, most=32):
        self.encode, self.most = encode, most
        self.waiting = queue.Queue()
        threading.Thread(target=self.work, daemon=True, name="query-batcher").start()

    def __call__(self, encoders, tokens):
        answer = concurrent.futures.Future()
        self.waiting.put((encoders, tokens, answer))
        return answer.result()

    def work(self):
        while True:
            batch = [self.waiting.get()]
            while len(batch) < self.most:
                try:
                    batch.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            groups = {}
            for encoders, tokens, answer in batch:
                groups.setdefault(id(encoders), (encoders, []))[1].append((tokens, answer))
            for encoders, queries in groups.values():
                try:
                    vectors = self.encode(encoders, [tokens for tokens, _ in queries])
                except Exception as e:  # noqa: BLE001  (each waiting query gets the failure)
                    for _, answer in queries:
                        answer.set_exception(e)
                    continue
                for (_, answer), vector in zip(queries, vectors):
                    answer.set_result(vector)
