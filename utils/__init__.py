"""Helpers that import no top-level module of the project, and three command-line tools.

atomic.py      writes that never leave a half-written file: temporary file, then rename
cache.py       `cache_dir`: where recomputable things are kept (VSRN_CACHE)
captions.py    caption files (UTF-8, one caption per line)
checkpoint.py  safe checkpoint reading and writing, ours and the original release's
device.py      `check_device`, `configure_backends` (float32 on CUDA unless --tf32)
digest.py      `file_digest`: SHA-256 of a file, read a megabyte at a time
distributed.py data-parallel training under torchrun: process group, gathered embeddings, agreements
errors.py      the one-line errors (in the library's words, worded as each script's flags) and the Ctrl-C line
figures.py     pictures laid out to be read: dimming, numbered boxes, titled tiles, PNG with its title
genome.py      Visual Genome's 1600 object names, the detector's output order
hub.py         model hub names: a local folder first, the hub only when it answers, its cache otherwise
images.py      `read_image`, `list_images`, `pillow`: pictures as upright RGB arrays, every format
meters.py      running averages, printed in the original's log format
obj36.py       the obj36 / generate_tsv TSV row format: `parse_row`, `format_obj36_line`, resumable files
optim.py       the original's optimizer: Adam with the caption branch updated twice per step
options.py     train.py's flags with the original's defaults, the demo's preset, requests made of flags
text.py        counts and durations in messages
threads.py     how torch's CPU threads wait, set before torch loads

Tools, run as modules: `python3 -m utils.tsv_to_precomp` (TSV features and captions to the precomputed
layout), `python3 -m utils.make_toy_data` (the toy dataset of the demo and the tests), `python3 -m
utils.make_toy_images` (the toy dataset as pictures, an obj36 TSV and captions).
"""
