-- Captions, and chat about an image (version 2).
--
-- Never edit this file once it has landed: add a new timestamped migration.

-- A second counter beside `generation`, for the caption (tantivy) index only: it grows
-- whenever a caption is written, so that the caption index can tell it is stale while
-- the vector index, which captions do not touch, stays valid. The caption index
-- stores both counters and is stale when either differs.
ALTER TABLE library ADD COLUMN text_generation INTEGER NOT NULL DEFAULT 0 CHECK (text_generation >= 0);

-- One caption per file, from the captioning model named by `model_id`; a file captioned
-- again (by another model, or on request) replaces its caption. `content_hash` is the
-- file's hash when it was captioned: re-indexing the file with other content deletes
-- the caption, so that a caption always describes the image it is shown with.
CREATE TABLE captions (
    file_id       INTEGER PRIMARY KEY REFERENCES files (id) ON DELETE CASCADE,
    model_id      TEXT NOT NULL,
    text          TEXT NOT NULL,
    content_hash  TEXT,
    created_at    TEXT NOT NULL
);
CREATE INDEX captions_model ON captions (model_id);

-- A chat about one image. `title` is the first question, set when it is asked.
CREATE TABLE conversations (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id     INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    model_id    TEXT NOT NULL,
    title       TEXT,
    created_at  TEXT NOT NULL
);
CREATE INDEX conversations_file ON conversations (file_id);

-- The turns of a conversation, in `id` order: a question and its answer are written
-- together, so that history never holds a question without its answer.
CREATE TABLE messages (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id  INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role             TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    text             TEXT NOT NULL,
    at               TEXT NOT NULL
);
CREATE INDEX messages_conversation ON messages (conversation_id, id);
