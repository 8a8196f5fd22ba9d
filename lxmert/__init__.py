"""LXMERT (Tan & Bansal, EMNLP 2019) image-text matching with VSRN's data and metrics.

loading.py (model and tokenizer, from a folder or the hub), scoring.py (pair scores with each
caption and image encoded once), rerank.py (two-stage retrieval), splits.py (recall on a split,
all pairs or VSRN's top-k reranked), pictures.py (your own pictures and captions, in one step).
"""
