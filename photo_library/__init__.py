"""A searchable library of your photos: indexed once by index.py, kept current, searched by search.py.

A library is a folder:
  library.sqlite3  the records (store.py): photos by content digest, their files, regions, embeddings,
                   attention scores and thumbnails, failures with their reason, and what made the library
  index.faiss      the embeddings' vector index (vectors.py), rebuilt from the records when damaged
  index.lock       held while index.py writes

scan.py finds what changed in the folders, indexer.py does the work of index.py, embedding.py turns
regions into the library's vectors, searcher.py answers queries, server.py serves them with page.html.
"""
