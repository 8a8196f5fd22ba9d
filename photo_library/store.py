"""A photo library's records, in SQLite (LIB/library.sqlite3).

A photo is known by the SHA-256 digest of its file's content: copies share one photo, a moved or
renamed file keeps its photo, an edited one becomes a new photo. Each file under the library's
folders has a row with the size and modification time it had when it was read, so an unchanged
file is recognised without reading it, and a failed one (with its reason) is not retried until it
changes.

Every change is a transaction: a process killed at any moment leaves the records as the last
commit left them. Each commit that adds or removes photos takes the next `generation`; a vector
index built at generation G catches up from the photos written and removed after G. Photo ids are
never reused, so an id in a vector index names one photo for ever.
"""

import contextlib
import json
import os
import sqlite3

import numpy as np

from utils.errors import DataError, OptionError, first_line

DATABASE = "library.sqlite3"
FORMAT = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS roots (path TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS photos (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    digest TEXT NOT NULL UNIQUE,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    boxes BLOB NOT NULL,
    objects BLOB NOT NULL,
    region_scores BLOB NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS photos_generation ON photos (generation);
CREATE TABLE IF NOT EXISTS features (photo INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS thumbnails (photo INTEGER PRIMARY KEY, jpeg BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    digest TEXT,
    photo INTEGER,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS files_photo ON files (photo);
CREATE INDEX IF NOT EXISTS files_digest ON files (digest);
CREATE TABLE IF NOT EXISTS removed (photo INTEGER PRIMARY KEY, generation INTEGER NOT NULL);
"""


@contextlib.contextmanager
def database_errors(folder):
    """SQLite's failures (a full disk, an I/O error, a damaged page) as one line naming the library's records."""
    try:
        yield
    except sqlite3.Error as e:
        raise DataError(f"{os.path.join(folder, DATABASE)}: {first_line(e)}") from None


def blob(array, dtype):
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


class Library:
    """The records of the library in `folder`. `Library.create`, or `Library.open` (read-only unless `writable`)."""

    def __init__(self, folder, connection):
        self.folder, self.db = folder, connection

    @classmethod
    def create(cls, folder):
        """A new, empty library: its records made under a temporary name and renamed into place, so that a
        process killed meanwhile leaves no database without its tables."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, DATABASE)
        making = path + ".new"
        if os.path.exists(making):
            os.remove(making)
        connection = sqlite3.connect(making, isolation_level=None)
        for statement in SCHEMA.split(";"):
            if statement.strip():
                connection.execute(statement)
        library = cls(folder, connection)
        with library.transaction():
            library.set_meta(format=FORMAT, generation=0, epoch=0, history_since=0)
        connection.close()
        os.replace(making, path)
        library = cls.open(folder, writable=True)
        library.db.execute("PRAGMA journal_mode=WAL")
        return library

    @classmethod
    def open(cls, folder, writable=False):
        path = os.path.join(folder, DATABASE)
        if not os.path.isfile(path):
            raise OptionError.naming(
                "{library} {folder}: not a photo library (no {database}); make one with index.py",
                folder=folder,
                database=DATABASE,
            )
        uri = f"file:{path}" + ("" if writable else "?mode=ro")
        try:
            connection = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA busy_timeout=30000")
            found = connection.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.DatabaseError as e:
            raise DataError(f"{path}: not a readable photo library ({e})") from None
        if found is None or json.loads(found[0]) != FORMAT:
            raise DataError(
                f"{path}: a photo library of another format ({found and found[0]}); this version reads {FORMAT}"
            )
        return cls(folder, connection)

    def close(self):
        self.db.close()

    @contextlib.contextmanager
    def transaction(self):
        """One atomic change: all of it is committed, or none of it (also when the process is killed)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @contextlib.contextmanager
    def snapshot(self):
        """Reads that all see one state of the records, whatever index.py commits meanwhile (WAL readers
        keep the snapshot of their transaction's first read)."""
        self.db.execute("BEGIN")
        try:
            yield self
        finally:
            self.db.execute("COMMIT")

    # ---- what made the library

    def meta(self, key, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, **values):
        for key, value in values.items():
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def roots(self):
        return [row[0] for row in self.db.execute("SELECT path FROM roots ORDER BY path")]

    def add_roots(self, paths):
        self.db.executemany("INSERT OR IGNORE INTO roots (path) VALUES (?)", [(path,) for path in paths])

    # ---- files and photos

    def files(self):
        """{path: (size, mtime_ns, digest, photo, reason)} of every file the library knows."""
        rows = self.db.execute("SELECT path, size, mtime_ns, digest, photo, reason FROM files")
        return {path: rest for path, *rest in rows}

    def photo_of_digest(self, digest):
        row = self.db.execute("SELECT id FROM photos WHERE digest = ?", (digest,)).fetchone()
        return row[0] if row else None

    def failed_digest(self, digest):
        """The reason a file of this content failed, when one did (content that fails fails again)."""
        row = self.db.execute("SELECT reason FROM files WHERE digest = ? AND photo IS NULL", (digest,)).fetchone()
        return row[0] if row else None

    def set_file(self, path, size, mtime_ns, digest, photo=None, reason=None):
        self.db.execute(
            "INSERT OR REPLACE INTO files (path, size, mtime_ns, digest, photo, reason) VALUES (?, ?, ?, ?, ?, ?)",
            (path, size, mtime_ns, digest, photo, reason),
        )

    def forget_file(self, path):
        """Drop a file's row, whatever photo it showed (a changed file, until its new content is committed)."""
        self.db.execute("DELETE FROM files WHERE path = ?", (path,))

    def forget_files(self, paths, generation):
        """Drop these files; their photos go when no other file shows them (recorded as removed at `generation`)."""
        photos = set()
        for path in paths:
            row = self.db.execute("SELECT photo FROM files WHERE path = ?", (path,)).fetchone()
            self.db.execute("DELETE FROM files WHERE path = ?", (path,))
            if row and row[0] is not None:
                photos.add(row[0])
        return self.drop_unshown(photos, generation)

    def drop_unshown(self, photos, generation):
        """Remove the photos no file shows any longer; their count."""
        dropped = 0
        for photo in photos:
            if self.db.execute("SELECT 1 FROM files WHERE photo = ? LIMIT 1", (photo,)).fetchone():
                continue
            for table, column in (("photos", "id"), ("features", "photo"), ("thumbnails", "photo")):
                self.db.execute(f"DELETE FROM {table} WHERE {column} = ?", (photo,))
            self.db.execute("INSERT OR REPLACE INTO removed (photo, generation) VALUES (?, ?)", (photo, generation))
            dropped += 1
        return dropped

    def add_photo(self, digest, regions, embedding, region_scores, thumbnail, generation, features_dtype):
        """Insert a photo with its regions (a regions dict), vector, attention scores and thumbnail; its id."""
        objects = regions.get("objects_id")
        objects = np.full(len(regions["boxes"]), -1) if objects is None else objects
        cursor = self.db.execute(
            "INSERT INTO photos (digest, width, height, generation, boxes, objects, region_scores, embedding) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                digest,
                int(regions["img_w"]),
                int(regions["img_h"]),
                generation,
                blob(regions["boxes"], np.float32),
                blob(objects, np.int64),
                blob(region_scores, np.float32),
                blob(embedding, np.float32),
            ),
        )
        photo = cursor.lastrowid
        self.db.execute(
            "INSERT INTO features (photo, data) VALUES (?, ?)", (photo, blob(regions["features"], features_dtype))
        )
        self.db.execute("INSERT INTO thumbnails (photo, jpeg) VALUES (?, ?)", (photo, thumbnail))
        return photo

    def count(self):
        return self.db.execute("SELECT COUNT(*) FROM photos").fetchone()[0]

    def photo_ids(self):
        """Every photo's id, in order."""
        return [row[0] for row in self.db.execute("SELECT id FROM photos ORDER BY id")]

    def set_embedding(self, photo, embedding, region_scores, generation):
        """A photo's new vector and attention scores (index.py --rebuild), written at `generation`."""
        self.db.execute(
            "UPDATE photos SET embedding = ?, region_scores = ?, generation = ? WHERE id = ?",
            (blob(embedding, np.float32), blob(region_scores, np.float32), generation, photo),
        )

    # ---- vectors

    def embeddings(self, since=None, dim=None):
        """(ids (n,) int64, vectors (n, dim) float32) of every photo, or of those written after generation `since`."""
        query = (
            "SELECT id, embedding FROM photos" + (" WHERE generation > ?" if since is not None else "") + " ORDER BY id"
        )
        rows = self.db.execute(query, () if since is None else (since,)).fetchall()
        dim = dim or self.meta("embedding_dim")
        ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
        vectors = np.empty((len(rows), dim), dtype=np.float32)
        for i, (_, data) in enumerate(rows):
            vectors[i] = np.frombuffer(data, dtype=np.float32)
        return ids, vectors

    def removed_since(self, generation):
        return [row[0] for row in self.db.execute("SELECT photo FROM removed WHERE generation > ?", (generation,))]

    def forget_removals(self, up_to):
        """History an index written at generation `up_to` no longer needs."""
        self.db.execute("DELETE FROM removed WHERE generation <= ?", (up_to,))
        self.set_meta(history_since=up_to)

    # ---- what a search result shows

    def photo(self, photo):
        """A photo's record as a dict (None when it is gone): id, digest, path (its first file), width,
        height, boxes, objects, region_scores, embedding."""
        row = self.db.execute(
            "SELECT id, digest, width, height, boxes, objects, region_scores, embedding FROM photos WHERE id = ?",
            (photo,),
        ).fetchone()
        if row is None:
            return None
        path = self.db.execute("SELECT path FROM files WHERE photo = ? ORDER BY path LIMIT 1", (photo,)).fetchone()
        models = self.meta("models")
        return {
            "id": row[0],
            "digest": row[1],
            "path": path[0] if path else None,
            "width": row[2],
            "height": row[3],
            "boxes": np.frombuffer(row[4], dtype=np.float32).reshape(-1, 4),
            "objects": np.frombuffer(row[5], dtype=np.int64),
            "region_scores": np.frombuffer(row[6], dtype=np.float32).reshape(len(models), -1),
            "embedding": np.frombuffer(row[7], dtype=np.float32),
        }

    def embedding_of(self, photos):
        """{id: vector} of the photos that still exist."""
        marks = ",".join("?" * len(photos))
        rows = (
            self.db.execute(f"SELECT id, embedding FROM photos WHERE id IN ({marks})", list(photos)) if photos else []
        )
        return {photo: np.frombuffer(data, dtype=np.float32) for photo, data in rows}

    def features(self, photo):
        """The kept region features (R, F) float32 of a photo."""
        row = self.db.execute("SELECT data FROM features WHERE photo = ?", (photo,)).fetchone()
        dtype = np.dtype(self.meta("features_dtype"))
        return np.frombuffer(row[0], dtype=dtype).astype(np.float32).reshape(-1, self.meta("feature_dim"))

    def thumbnail(self, photo):
        row = self.db.execute("SELECT jpeg FROM thumbnails WHERE photo = ?", (photo,)).fetchone()
        return row[0] if row else None

    def photo_of_path(self, path):
        """The photo the file at `path` shows, when the records hold it as it is now (same size and
        modification time); None otherwise."""
        row = self.db.execute("SELECT size, mtime_ns, photo FROM files WHERE path = ?", (path,)).fetchone()
        if row is None or row[2] is None:
            return None
        status = os.stat(path)
        return row[2] if (row[0], row[1]) == (status.st_size, status.st_mtime_ns) else None
