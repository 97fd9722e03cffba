-- magpie library schema, version 1.
--
-- SQLite is the source of truth; the HNSW and tantivy indexes are rebuilt from these
-- tables. Never edit this file once it has landed: add a new timestamped migration.
-- Later migrations are expected to add captions, labels and chat tables, each keyed by
-- `files.id` with ON DELETE CASCADE so that purging a tombstone cleans them up too.
--
-- Times written by magpie are ISO-8601 UTC text ('2026-11-28T12:00:00.000Z').

-- One row describing the library: which model its embeddings come from, and the
-- generation counter that derived indexes store next to their data to detect staleness.
CREATE TABLE library (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    model_id    TEXT,
    model_dim   INTEGER CHECK (model_dim IS NULL OR model_dim > 0),
    generation  INTEGER NOT NULL DEFAULT 0 CHECK (generation >= 0),
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CHECK ((model_id IS NULL) = (model_dim IS NULL))
);
INSERT INTO library (id) VALUES (1);

-- Folders (or single files) the user asked to index. `path_bytes` holds the raw OS path
-- and is the identity; `path` is its (possibly lossy) UTF-8 rendering for display.
CREATE TABLE roots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    path        TEXT NOT NULL,
    path_bytes  BLOB NOT NULL UNIQUE,
    added_at    TEXT NOT NULL
);

-- One row per file ever seen under a root. AUTOINCREMENT so that a purged id is never
-- handed out again: derived indexes may still hold vectors under old ids.
CREATE TABLE files (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    root_id       INTEGER NOT NULL REFERENCES roots (id) ON DELETE CASCADE,
    path          TEXT NOT NULL,
    path_bytes    BLOB NOT NULL UNIQUE,
    size          INTEGER NOT NULL CHECK (size >= 0),
    mtime_ns      INTEGER NOT NULL,
    content_hash  TEXT,             -- blake3, lowercase hex
    width         INTEGER,
    height        INTEGER,
    format        TEXT,
    taken_at      TEXT,             -- EXIF DateTimeOriginal, ISO-8601
    camera_make   TEXT,
    camera_model  TEXT,
    orientation   INTEGER,          -- EXIF orientation 1..=8
    gps_lat       REAL,
    gps_lon       REAL,
    status        TEXT NOT NULL CHECK (status IN ('indexed', 'failed', 'pending', 'deleted')),
    error         TEXT,
    indexed_at    TEXT,
    updated_at    TEXT NOT NULL
);
CREATE INDEX files_content_hash ON files (content_hash);
CREATE INDEX files_status ON files (status);
CREATE INDEX files_root ON files (root_id);

-- Image embeddings: L2-normalised little-endian f32, one per (file, model).
CREATE TABLE embeddings (
    file_id     INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    model_id    TEXT NOT NULL,
    dim         INTEGER NOT NULL CHECK (dim > 0),
    vector      BLOB NOT NULL CHECK (length(vector) = 4 * dim),
    created_at  TEXT NOT NULL,
    PRIMARY KEY (file_id, model_id)
);

-- Append-only log of everything that failed, with its reason; `file_id` is set when the
-- failure belongs to a file row (NULL for e.g. an unreadable directory).
CREATE TABLE failures (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id     INTEGER REFERENCES files (id) ON DELETE SET NULL,
    path        TEXT NOT NULL,
    path_bytes  BLOB NOT NULL,
    reason      TEXT NOT NULL,
    at          TEXT NOT NULL
);
CREATE INDEX failures_file ON failures (file_id);
