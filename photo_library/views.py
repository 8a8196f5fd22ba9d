"""The server's photo views in bounded memory, whatever the pictures and however many requests come at once.

A view is drawn from the photo's file at most VIEW_SIDE pixels wide (maps.photo_view): JPEGs are decoded
at 1/2, 1/4 or 1/8 of their size (Pillow's draft mode), so an 8000 x 8000 photo is decoded at 1000 x 1000;
other formats are decoded whole and reduced at once. At most RENDERS views are drawn at a time, the others
wait; the last views drawn are kept (CACHE_BYTES at most), and requests for a view being drawn wait for it
instead of drawing it again. A server's memory for views is thus at most RENDERS full decodes of the largest
picture Pillow reads (its 89-megapixel limit: 268 MB each, as RGB) plus the cache: measured in
docs/search.md.
"""

import threading
from collections import OrderedDict

RENDERS = 2
CACHE_BYTES = 32 << 20


class Views:
    """Views (JPEG bytes) by key, drawn by the function given, RENDERS at a time, the last ones kept."""

    def __init__(self, renders=RENDERS, cache_bytes=CACHE_BYTES):
        self.slots = threading.BoundedSemaphore(renders)
        self.cache_bytes = cache_bytes
        self.kept, self.held = OrderedDict(), 0
        self.lock = threading.Lock()
        self.drawing = {}  # key: the lock held while that view is drawn

    def get(self, key, draw):
        """The view of `key`: kept, or drawn by `draw()` (one drawing per key at a time, RENDERS in all)."""
        with self.lock:
            if key in self.kept:
                self.kept.move_to_end(key)
                return self.kept[key]
            drawing = self.drawing.setdefault(key, threading.Lock())
        with drawing:
            with self.lock:
                if key in self.kept:
                    return self.kept[key]
            with self.slots:
                view = draw()
            self.keep(key, view)
        with self.lock:
            self.drawing.pop(key, None)
        return view

    def keep(self, key, view):
        with self.lock:
            self.kept[key] = view
            self.held += len(view)
            while self.held > self.cache_bytes and len(self.kept) > 1:
                _, dropped = self.kept.popitem(last=False)
                self.held -= len(dropped)
