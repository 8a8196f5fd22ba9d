"""A searchable library of your photos: indexed once by index.py, kept current, searched by search.py.

A library is a folder:
  library.sqlite3  the records (store.py): photos by content digest, their files, regions, embeddings,
                   attention scores and thumbnails, failures with their reason, and what made the library
  index.faiss      the embeddings' vector index (vectors.py), rebuilt from the records when damaged
  index.lock       held while index.py writes

store.py holds the records (all the SQL), scan.py finds what changed in the folders and records it,
recipe.py checks what makes the library, lock.py keeps one index.py at a time; indexer.py runs
index.py's work: new photos (photos.py) from published rows (rows.py) or the detector
(extraction.py), embedded by embedding.py, and the vector index brought up to date (vectors.py).
searcher.py answers queries, server.py serves them with page.html, maps.py draws attention maps, and
demo.py makes the toy world's library.
"""
