"""LXMERT (Tan & Bansal, EMNLP 2019) image-text matching with VSRN's data and metrics.

loading.py (model and tokenizer, from a folder or the hub), request.py (what every LXMERT job is
asked: model, mode, batches), scoring.py (pair scores with each caption and image encoded once),
rerank.py (two-stage retrieval), splits.py (SplitRequest, evaluate: recall on a split, all pairs or
VSRN's top-k reranked), pictures.py (PicturesRequest, match_pictures: your own pictures and
captions, in one step).
"""
