"""A photo library's records, in SQLite (LIB/library.sqlite3).

A photo is known by the SHA-256 digest of its file's content: copies share one photo, a moved or
renamed file keeps its photo, an edited one becomes a new photo. Each file under the library's
folders has a row with the size and modification time it had when it was read, so an unchanged
file is recognised without reading it, and a failed one (with its reason) is not retried until it
changes (a file that could not be read at all is retried by every run).

Every change is a transaction: a process killed at any moment leaves the records as the last
commit left them. Each commit that adds or removes photos takes the next `generation` and a random
token (table `commits`): a vector index built at generation G records G's token, so an index that
belongs to other records (records restored from a backup, or rolled back by a lost -wal file) is
known, however their generations compare. It catches up from the photos written and removed after G.
Photo ids are not reused while the records go forward (records restored from a backup give the next
ids again: the index is then rebuilt, as its token tells).

Each photo's row, its features and its thumbnail, each file's row and each value of `meta` carry a
CRC-32 checksum of their content, checked whenever they are read: a damaged photo is a DamagedRecord,
never a wrong score; a damaged file row is read as a file that changed (the next run reads the file
again), and a damaged value of what made the library is a DataError. Libraries made before
the checksums and tokens existed get their tables and columns when index.py next opens them (their
old rows have no checksum: they are read as they are).
"""

import contextlib
import json
import os
import sqlite3
import urllib.parse
import uuid
import zlib
from dataclasses import dataclass

import numpy as np

from utils.errors import DataError, OptionError, first_line

DATABASE = "library.sqlite3"
FORMAT = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL, checksum INTEGER);
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
    embedding BLOB NOT NULL,
    checksum INTEGER
);
CREATE INDEX IF NOT EXISTS photos_generation ON photos (generation);
CREATE TABLE IF NOT EXISTS features (photo INTEGER PRIMARY KEY, data BLOB NOT NULL, checksum INTEGER);
CREATE TABLE IF NOT EXISTS thumbnails (photo INTEGER PRIMARY KEY, jpeg BLOB NOT NULL, checksum INTEGER);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    digest TEXT,
    photo INTEGER,
    reason TEXT,
    checksum INTEGER
);
CREATE INDEX IF NOT EXISTS files_photo ON files (photo);
CREATE INDEX IF NOT EXISTS files_digest ON files (digest);
CREATE TABLE IF NOT EXISTS removed (photo INTEGER PRIMARY KEY, generation INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS commits (generation INTEGER PRIMARY KEY, token TEXT NOT NULL);
"""
CHECKSUMMED = ("photos", "features", "thumbnails", "files", "meta")  # rows with a checksum (added to older libraries)
FILE_COLUMNS = "path, size, mtime_ns, digest, photo, reason, checksum"
PHOTO_COLUMNS = "id, digest, width, height, boxes, objects, region_scores, embedding, checksum"
ID_CHUNK = 900  # under SQLite's oldest limit on a statement's parameters (999)


@contextlib.contextmanager
def database_errors(folder):
    """SQLite's failures (a full disk, an I/O error, a damaged page) as one line naming the library's records."""
    try:
        yield
    except sqlite3.Error as e:
        raise DataError(f"{os.path.join(folder, DATABASE)}: {first_line(e)}") from None


def blob(array, dtype):
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def checksum(*parts):
    """CRC-32 of the parts (bytes, or values written as text) one after another."""
    crc = 0
    for part in parts:
        crc = zlib.crc32(part if isinstance(part, bytes) else str(part).encode("utf-8"), crc)
    return crc


class DamagedRecord(DataError):
    """A photo's row, features or thumbnail whose content does not match its checksum."""


def id_chunks(ids):
    """`ids` without repeats, as ints, in lists of at most ID_CHUNK: the parameters of one `IN (...)`."""
    ids = list(dict.fromkeys(int(photo) for photo in ids))
    return [ids[start : start + ID_CHUNK] for start in range(0, len(ids), ID_CHUNK)]


@dataclass
class Records:
    """Photos' records read together: {id: record}, and {id: DamagedRecord} of those whose rows are damaged."""

    records: dict
    damaged: dict


def _connect(path, writable):
    """(a connection to the records at `path`, whether it is immutable): read-write, read-only, or, where a
    read-only connection cannot make the files WAL readers share (a folder this process cannot write),
    immutable."""

    def connect(query):
        uri = f"file:{urllib.parse.quote(path)}{query}"
        connection = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA busy_timeout=30000")
        return connection

    if writable:
        return connect(""), False
    connection = connect("?mode=ro")
    try:
        connection.execute("SELECT 1 FROM meta LIMIT 1").fetchone()
        return connection, False
    except sqlite3.OperationalError as e:
        connection.close()
        if "readonly" not in str(e) and "unable to open" not in str(e):
            raise
    return connect("?mode=ro&immutable=1"), True


class Library:
    """The records of the library in `folder`. `Library.create`, or `Library.open` (read-only unless `writable`)."""

    def __init__(self, folder, connection, immutable=False):
        self.folder, self.db = folder, connection
        self.immutable = immutable  # opened as a file nobody changes (the folder cannot be written)
        self.checksummed = self.tables_with_checksums()

    def tables_with_checksums(self):
        """The tables whose rows carry checksums (all, but in a library made before them and not yet upgraded)."""
        return {
            table
            for table in CHECKSUMMED
            if "checksum" in [row[1] for row in self.db.execute(f"PRAGMA table_info({table})")]
        }

    @property
    def path(self):
        return os.path.join(self.folder, DATABASE)

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
            library.commit_generation(0)
        connection.close()
        os.replace(making, path)
        library = cls.open(folder, writable=True)
        library.db.execute("PRAGMA journal_mode=WAL")
        return library

    @classmethod
    def open(cls, folder, writable=False):
        """The records, read-only unless `writable`. A library whose folder this process cannot write (a
        read-only mount, another user's folder) cannot hold the files SQLite's readers share: it is opened
        immutable, as it is on disk (commits index.py may still make there are not seen)."""
        path = os.path.join(folder, DATABASE)
        if not os.path.isfile(path):
            raise OptionError.naming(
                "{library} {folder}: not a photo library (no {database}); make one with index.py",
                folder=folder,
                database=DATABASE,
            )
        try:
            connection, immutable = _connect(path, writable)
            found = connection.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.DatabaseError as e:
            raise DataError(f"{path}: not a readable photo library ({first_line(e)})") from None
        if found is None or found[0] != str(FORMAT):
            raise DataError(
                f"{path}: a photo library of another format ({found and found[0]}); this version reads {FORMAT}"
            )
        library = cls(folder, connection, immutable)
        if writable:
            library.upgrade()
        return library

    def upgrade(self):
        """The tables and columns added since the library was made (commits' tokens, checksums)."""
        self.db.execute("CREATE TABLE IF NOT EXISTS commits (generation INTEGER PRIMARY KEY, token TEXT NOT NULL)")
        for table in set(CHECKSUMMED) - self.checksummed:
            self.db.execute(f"ALTER TABLE {table} ADD COLUMN checksum INTEGER")
        self.checksummed = set(CHECKSUMMED)
        if self.token(self.meta("generation")) is None:
            with self.transaction():
                self.commit_generation(self.meta("generation"))

    @property
    def read_only(self):
        """Whether this process cannot change the library (index.py could not update it from here)."""
        return self.immutable or not (os.access(self.path, os.W_OK) and os.access(self.folder, os.W_OK))

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

    def quick_check(self):
        """SQLite's quick_check of the records' file: ["ok"], or the problems it found."""
        return [row[0] for row in self.db.execute("PRAGMA quick_check")]

    # ---- generations: each commit that changes the photos

    def next_generation(self):
        return self.meta("generation") + 1

    def commit_generation(self, generation):
        """Make `generation` the records' (in the caller's transaction), with a new random token."""
        self.db.execute(
            "INSERT OR REPLACE INTO commits (generation, token) VALUES (?, ?)", (generation, uuid.uuid4().hex)
        )
        self.set_meta(generation=generation)

    def new_generation(self):
        """The next generation, made the records' (in the caller's transaction)."""
        generation = self.next_generation()
        self.commit_generation(generation)
        return generation

    def token(self, generation):
        """The token of the commit that made `generation` (None when these records never made it, or have
        forgotten it, or are of a library made before tokens)."""
        try:
            row = self.db.execute("SELECT token FROM commits WHERE generation = ?", (generation,)).fetchone()
        except sqlite3.OperationalError:  # a library made before tokens, opened read-only
            return None
        return row[0] if row else None

    def state(self):
        """(generation, its token): which state of the records this is."""
        generation = self.meta("generation")
        return generation, self.token(generation)

    # ---- what made the library

    def meta(self, key, default=None):
        columns = "value, checksum" if "meta" in self.checksummed else "value"
        row = self.db.execute(f"SELECT {columns} FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            return default
        if len(row) > 1 and row[1] is not None and row[1] != checksum(key, row[0]):
            raise DataError(f"{self.path}: its record of {key} is damaged (it does not match its checksum)")
        try:
            return json.loads(row[0])
        except ValueError:
            raise DataError(f"{self.path}: its record of {key} is damaged (not JSON)") from None

    def set_meta(self, **values):
        for key, value in values.items():
            text = json.dumps(value)
            if "meta" in self.checksummed:
                self.db.execute(
                    "INSERT OR REPLACE INTO meta (key, value, checksum) VALUES (?, ?, ?)",
                    (key, text, checksum(key, text)),
                )
            else:  # the records of a library being made, before its tables are upgraded
                self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, text))

    def roots(self):
        return [row[0] for row in self.db.execute("SELECT path FROM roots ORDER BY path")]

    def add_roots(self, paths):
        self.db.executemany("INSERT OR IGNORE INTO roots (path) VALUES (?)", [(path,) for path in paths])

    # ---- files and photos

    def file_rows(self, where="", arguments=()):
        """The rows (path, size, mtime_ns, digest, photo, reason) of the files `where` says, each one whose
        checksum does not match as (path, None, None, None, None, None): a file to read again."""
        checked = "files" in self.checksummed
        columns = FILE_COLUMNS if checked else FILE_COLUMNS.replace(", checksum", ", NULL")
        for *row, crc in self.db.execute(f"SELECT {columns} FROM files {where}", arguments):
            yield tuple(row) if crc is None or crc == checksum(*row) else (row[0], None, None, None, None, None)

    def files(self):
        """{path: (size, mtime_ns, digest, photo, reason)} of every file the library knows."""
        return {path: tuple(rest) for path, *rest in self.file_rows()}

    def files_under(self, path):
        """The recorded files at `path` or under it (a folder), by path."""
        folder = os.path.join(path, "")
        rows = self.db.execute(
            "SELECT path FROM files WHERE path = ? OR (path >= ? AND path < ?) ORDER BY path",
            (path, folder, folder[:-1] + chr(ord(os.sep) + 1)),
        )
        return [row[0] for row in rows]

    def files_of(self, photo):
        """(path, size, mtime_ns) of each file that shows the photo, by path (damaged rows left out)."""
        rows = self.file_rows("WHERE photo = ? ORDER BY path", (photo,))
        return [(path, size, mtime_ns) for path, size, mtime_ns, _, shown, _ in rows if shown == photo]

    def remove_roots(self, paths):
        self.db.executemany("DELETE FROM roots WHERE path = ?", [(path,) for path in paths])

    def photo_of_digest(self, digest):
        row = self.db.execute("SELECT id FROM photos WHERE digest = ?", (digest,)).fetchone()
        return row[0] if row else None

    def failed_digest(self, digest):
        """The reason a file of this content failed, when one did (content that fails fails again)."""
        row = self.db.execute("SELECT reason FROM files WHERE digest = ? AND photo IS NULL", (digest,)).fetchone()
        return row[0] if row else None

    def set_file(self, path, size, mtime_ns, digest, photo=None, reason=None):
        row = (path, size, mtime_ns, digest, photo, reason)
        self.db.execute(
            f"INSERT OR REPLACE INTO files ({FILE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", (*row, checksum(*row))
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
        columns = (
            digest,
            int(regions["img_w"]),
            int(regions["img_h"]),
            blob(regions["boxes"], np.float32),
            blob(objects, np.int64),
            blob(region_scores, np.float32),
            blob(embedding, np.float32),
        )
        cursor = self.db.execute(
            "INSERT INTO photos (digest, width, height, boxes, objects, region_scores, embedding, generation, "
            "checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*columns, generation, checksum(*columns)),
        )
        photo = cursor.lastrowid
        features = blob(regions["features"], features_dtype)
        self.db.execute(
            "INSERT INTO features (photo, data, checksum) VALUES (?, ?, ?)", (photo, features, checksum(features))
        )
        self.db.execute(
            "INSERT INTO thumbnails (photo, jpeg, checksum) VALUES (?, ?, ?)", (photo, thumbnail, checksum(thumbnail))
        )
        return photo

    def count(self):
        return self.db.execute("SELECT COUNT(*) FROM photos").fetchone()[0]

    def photo_ids(self):
        """Every photo's id, in order."""
        return [row[0] for row in self.db.execute("SELECT id FROM photos ORDER BY id")]

    def set_embedding(self, photo, embedding, region_scores, generation):
        """A photo's new vector and attention scores (index.py --rebuild), written at `generation`."""
        row = self._photo_row(photo)
        region_scores, embedding = blob(region_scores, np.float32), blob(embedding, np.float32)
        self.db.execute(
            "UPDATE photos SET embedding = ?, region_scores = ?, generation = ?, checksum = ? WHERE id = ?",
            (embedding, region_scores, generation, checksum(*row[1:6], region_scores, embedding), photo),
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
        self.db.execute("DELETE FROM commits WHERE generation < ?", (up_to,))
        self.set_meta(history_since=up_to)

    # ---- what a search result shows (each row checked against its checksum)

    def _photo_row(self, photo):
        return self.db.execute(f"SELECT {PHOTO_COLUMNS} FROM photos WHERE id = ?", (photo,)).fetchone()

    def damaged(self, photo, what):
        error = DamagedRecord(
            f"{self.path}: the {what} of photo {photo} is damaged (it does not match its checksum); "
            "index.py --check names its files"
        )
        error.public = f"the {what} of photo {photo} is damaged in the library's records"  # no path: for a server
        return error

    def photo(self, photo):
        """A photo's record as a dict (None when it is gone): id, digest, path (its first file), width,
        height, boxes, objects, region_scores, embedding. DamagedRecord when it does not match its checksum."""
        found = self.photos([photo])
        if photo in found.damaged:
            raise found.damaged[photo]
        return found.records.get(photo)

    def photos(self, ids):
        """The records of the photos among `ids` that are there, read together (a search's hits: the number of
        models, then their rows and their files, ID_CHUNK photos a query; not three queries a photo), as Records:
        {id: record} and {id: DamagedRecord}."""
        found = Records({}, {})
        models = len(self.meta("models", []))
        for chunk in id_chunks(ids):
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(f"SELECT {PHOTO_COLUMNS} FROM photos WHERE id IN ({marks})", chunk).fetchall()
            first_paths = {}
            for path, _, _, _, shown, _ in self.file_rows(f"WHERE photo IN ({marks}) ORDER BY path", chunk):
                if shown is not None:
                    first_paths.setdefault(shown, path)
            for row in rows:
                if row[8] is not None and row[8] != checksum(*row[1:8]):
                    found.damaged[row[0]] = self.damaged(row[0], "record")
                    continue
                found.records[row[0]] = {
                    "id": row[0],
                    "digest": row[1],
                    "path": first_paths.get(row[0]),
                    "width": row[2],
                    "height": row[3],
                    "boxes": np.frombuffer(row[4], dtype=np.float32).reshape(-1, 4),
                    "objects": np.frombuffer(row[5], dtype=np.int64),
                    "region_scores": np.frombuffer(row[6], dtype=np.float32).reshape(models, -1),
                    "embedding": np.frombuffer(row[7], dtype=np.float32),
                }
        return found

    def embedding_of(self, photos):
        """{id: vector} of the photos that still exist."""
        found = {}
        for chunk in id_chunks(photos):
            marks = ",".join("?" * len(chunk))
            for photo, data in self.db.execute(f"SELECT id, embedding FROM photos WHERE id IN ({marks})", chunk):
                found[photo] = np.frombuffer(data, dtype=np.float32)
        return found

    def features(self, photo):
        """The kept region features (R, F) float32 of a photo."""
        row = self.db.execute("SELECT data, checksum FROM features WHERE photo = ?", (photo,)).fetchone()
        if row is None or (row[1] is not None and row[1] != checksum(row[0])):
            raise self.damaged(photo, "region features")
        dtype = np.dtype(self.meta("features_dtype"))
        return np.frombuffer(row[0], dtype=dtype).astype(np.float32).reshape(-1, self.meta("feature_dim"))

    def thumbnail(self, photo):
        row = self.db.execute("SELECT jpeg, checksum FROM thumbnails WHERE photo = ?", (photo,)).fetchone()
        if row is not None and row[1] is not None and row[1] != checksum(row[0]):
            raise self.damaged(photo, "thumbnail")
        return row[0] if row else None

    def photo_of_path(self, path):
        """The photo the file at `path` shows, when the records hold it as it is now (same size and
        modification time); None otherwise."""
        row = next(self.file_rows("WHERE path = ?", (path,)), None)
        if row is None or row[4] is None:
            return None
        status = os.stat(path)
        return row[4] if (row[1], row[2]) == (status.st_size, status.st_mtime_ns) else None

    # ---- index.py --check

    def damaged_photos(self):
        """Yield (photo, what) of each row whose content does not match its checksum, reading every photo's row,
        features and thumbnail once (rows of a library made before checksums are not checked)."""
        for table, columns, what in (
            ("photos", "id, digest, width, height, boxes, objects, region_scores, embedding, checksum", "record"),
            ("features", "photo, data, checksum", "region features"),
            ("thumbnails", "photo, jpeg, checksum", "thumbnail"),
        ):
            for row in self.db.execute(f"SELECT {columns} FROM {table} ORDER BY 1"):
                if row[-1] is not None and row[-1] != checksum(*row[1:-1]):
                    yield row[0], what

    def damaged_settings(self):
        """(the keys of `meta` whose values do not match their checksums, the number of damaged file rows)."""
        rows = (
            self.db.execute("SELECT key, value, checksum FROM meta ORDER BY key") if "meta" in self.checksummed else []
        )
        keys = [key for key, value, crc in rows if crc is not None and crc != checksum(key, value)]
        return keys, sum(row[1] is None for row in self.file_rows())

    def unmatched(self):
        """(photos without their features or thumbnail, files that name a photo the records lack)."""
        incomplete = self.db.execute(
            "SELECT COUNT(*) FROM photos WHERE id NOT IN (SELECT photo FROM features) "
            "OR id NOT IN (SELECT photo FROM thumbnails)"
        ).fetchone()[0]
        dangling = self.db.execute(
            "SELECT COUNT(*) FROM files WHERE photo IS NOT NULL AND photo NOT IN (SELECT id FROM photos)"
        ).fetchone()[0]
        return incomplete, dangling
