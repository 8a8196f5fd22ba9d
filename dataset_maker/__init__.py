"""Your own pictures and captions made into a VSRN dataset (make_dataset.py's work).

annotations.py (the caption formats people hold, read into records), pictures.py (each picture once by
content, missing and unreadable ones said, splits), regions.py (the one place regions come from: the
detector, published rows or a photo library), layout.py (the precomputed layout written), make.py (the
steps in order), demo.py (make_dataset.py --demo).
"""
