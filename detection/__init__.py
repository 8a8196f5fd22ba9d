"""The bottom-up-attention detector and what runs it over pictures.

network.py (the Faster R-CNN, and what is assumed of its published weights), config.py and
weights.py (loading it), boxes.py, preprocess.py, proposals.py and selection.py (its arithmetic),
caffe_ops.py (the Caffe pipeline's decisions as it took them), policies.py (the 'caffe' and 'hf'
ways of running it), settings.py (RegionSettings: a policy and its settings, checked, with the
record libraries and the cache keep), extract.py (regions of a batch of pictures), pipeline.py
(the front door for many pictures: `detect_pictures` over torchrun shares, and obj36 TSVs on it),
cache.py (the one-step jobs' region cache), check.py (the self-check against published rows).
"""
