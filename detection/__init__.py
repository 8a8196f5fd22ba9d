"""The bottom-up-attention detector and what runs it over pictures.

network.py (the Faster R-CNN, and what is assumed of its published weights), config.py and
weights.py (loading it), boxes.py, preprocess.py, proposals.py and selection.py (its arithmetic),
caffe_ops.py (the Caffe pipeline's decisions as it took them), policies.py (the 'caffe' and 'hf'
ways of running it), extract.py (regions of pictures), pipeline.py (folders of pictures into
obj36 rows, over torchrun processes), cache.py (the one-step jobs' region cache), check.py (the
self-check against published rows).
"""
