"""The bottom-up-attention detector and what runs it over pictures.

network.py (the Faster R-CNN), config.py and weights.py (loading it), boxes.py, preprocess.py,
proposals.py and selection.py (its arithmetic), policies.py (the 'caffe' and 'hf' ways of running
it), extract.py (regions of pictures), pipeline.py (folders of pictures into obj36 rows, over
torchrun processes), cache.py (the one-step jobs' region cache).
"""
