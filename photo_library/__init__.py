"""A searchable library of your photos: indexed once by index.py, kept current, searched by search.py.

A library is a folder:
  library.sqlite3  the records (store.py): photos by content digest, their files, regions, embeddings,
                   attention scores and thumbnails (each with its checksum), failures with their reason,
                   each commit's generation and token, and what made the library
  index.faiss      the embeddings' vector index (vectors.py), with the commit it holds and its checksum:
                   rebuilt from the records when it is damaged or belongs to other records
  index.lock       held while index.py writes

store.py holds the records (all the SQL), scan.py finds what changed in the folders and records it (and
what it could not look at), recipe.py checks what makes the library, lock.py keeps one index.py at a
time; indexer.py runs index.py's work: new photos (photos.py) from published rows (rows.py) or the
detector (extraction.py), embedded by embedding.py, and the vector index brought up to date (vectors.py);
check.py is index.py --check. searcher.py answers queries; server.py serves them with page.html, answering
only to its own names (hosts.py), reading only the recorded files (originals.py), drawing views in bounded
memory (views.py) and suggesting queries from the model's words (examples.py); maps.py draws attention
maps, and demo.py makes the toy world's library.
"""
