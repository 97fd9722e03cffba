-- Zero-shot labels (version 3).
--
-- Never edit this file once it has landed: add a new timestamped migration.

-- A label set (`name`, e.g. 'category') gives each labelled image one label: the class
-- zero-shot classification put first, with its probability among the set's classes.
-- Classifying again under the same name replaces that image's label. `model_id` is the
-- CLIP model whose embeddings decided it.
CREATE TABLE labels (
    name        TEXT NOT NULL CHECK (length(name) > 0),
    file_id     INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    label       TEXT NOT NULL,
    prob        REAL NOT NULL CHECK (prob >= 0 AND prob <= 1),
    model_id    TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (name, file_id)
);
CREATE INDEX labels_file ON labels (file_id);
CREATE INDEX labels_label ON labels (name, label);
