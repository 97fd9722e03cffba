//! The caption index: BM25 over each indexed image's caption and the words of its path,
//! in tantivy, persisted in its own folder beside the database (`captions.tantivy/`).
//!
//! Like the vector index it is a cache of SQLite. Each commit carries a [`TextStamp`]
//! (the library's `generation`, which covers new and changed files, and its
//! `text_generation`, which covers captions) as tantivy's commit payload;
//! [`TextIndex::load`] hands back an index only when its stamp, format and schema are
//! the library's, and otherwise says [`TextLoaded::Stale`] or [`TextLoaded::Missing`]
//! so the engine rebuilds it with [`TextIndex::rebuild`]. A tantivy commit is atomic: a
//! crash leaves the previous commit, whose stamp is then older than SQLite's.
//!
//! User text never fails to parse: the query parser runs in lenient mode, so quotes,
//! brackets or `field:` syntax the user did not mean are dropped instead of erroring.
//!
//! The writer (which holds tantivy's lock on the folder) is opened on the first write
//! and kept until [`TextIndex::release_writer`], so that a second magpie process can
//! write between two jobs of the first.
//!
//! ```
//! use magpie_index::{TextDoc, TextIndex, TextLoaded, TextStamp};
//! use std::path::Path;
//!
//! let dir = tempfile::tempdir()?;
//! let stamp = TextStamp { generation: 1, text_generation: 0 };
//! let docs = [
//!     TextDoc::new(1, Path::new("/p/2019_Wedding/IMG cake-cutting.jpg"), Path::new("/p"), None),
//!     TextDoc::new(2, Path::new("/p/dog.jpg"), Path::new("/p"), Some("a brown dog on a beach".into())),
//! ];
//! let index = TextIndex::rebuild(&dir.path().join("captions.tantivy"), &docs, stamp)?;
//! assert_eq!(index.search("wedding", 10)?[0].id, 1);
//! assert_eq!(index.search("dogs (on the BEACH", 10)?[0].id, 2); // stemmed, lenient
//!
//! index.upsert(&[TextDoc::new(1, Path::new("/p/a.jpg"), Path::new("/p"), Some("a cake".into()))])?;
//! let next = TextStamp { generation: 1, text_generation: 1 };
//! index.commit(next)?;
//! drop(index);
//! let TextLoaded::Ready(back) = TextIndex::load(&dir.path().join("captions.tantivy"), next)? else { panic!() };
//! assert_eq!(back.search("cake", 10)?.len(), 1);
//! assert!(matches!(TextIndex::load(&dir.path().join("captions.tantivy"), stamp)?, TextLoaded::Stale(_)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use magpie_core::ImageId;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tantivy::collector::TopDocs;
use tantivy::directory::error::LockError;
use tantivy::directory::{Directory, INDEX_WRITER_LOCK};
use tantivy::query::QueryParser;
use tantivy::schema::{
    Field, IndexRecordOption, NumericOptions, Schema, TextFieldIndexing, TextOptions, Value,
};
use tantivy::tokenizer::{
    AsciiFoldingFilter, Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer,
    StopWordFilter, TextAnalyzer,
};
use tantivy::{doc, Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, TantivyError, Term};

/// Written into every commit; a saved index of another format is stale. Bump it when
/// the schema, the analyzer or the path splitting changes.
pub const TEXT_FORMAT: &str = "magpie-text-1";
/// The indexing memory budget (one thread; tantivy's minimum is 15 MB per thread).
/// Captions and paths are short: this holds tens of thousands of documents per segment.
const WRITER_BUDGET: usize = 24 << 20;
const ANALYZER: &str = "magpie_en";
/// Words longer than this (hashes, base64 in file names) are not indexed.
const MAX_WORD: usize = 40;

/// Errors of the caption index. (Kept apart from [`crate::Error`], the vector index's,
/// because they come from another library; the engine wraps both.)
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("{}: caption index: {source}", path.display())]
    Tantivy {
        path: PathBuf,
        #[source]
        source: TantivyError,
    },
    #[error("{}: the caption index is being written by another magpie process", path.display())]
    Locked { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Which state of SQLite an index holds: the library's `generation` (files added or
/// changed) and `text_generation` (captions written).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextStamp {
    pub generation: u64,
    pub text_generation: u64,
}

/// The commit payload.
#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    format: String,
    #[serde(flatten)]
    stamp: TextStamp,
}

/// What [`TextIndex::load`] found.
#[derive(Debug)]
pub enum TextLoaded {
    Ready(TextIndex),
    /// No saved index in that folder.
    Missing,
    /// A saved index that cannot serve this library (why); rebuild it from SQLite.
    Stale(String),
}

/// The saved index's stamp and size, read without opening it for search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TextSaved {
    pub stamp: TextStamp,
    pub docs: u64,
}

/// One document: an indexed image, its caption (if any) and its path words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextDoc {
    pub id: ImageId,
    pub caption: Option<String>,
    /// Space-separated words, as [`path_words`] makes them.
    pub path_words: String,
}

impl TextDoc {
    /// The document of the file at `path`, found under the folder `root`: its path words
    /// are those of `path` from `root`'s own name down (`/home/me/Pictures/2019_Wedding/
    /// IMG_1.jpg` under `/home/me/Pictures` gives "pictures 2019 wedding img 1 jpg").
    pub fn new(id: ImageId, path: &Path, root: &Path, caption: Option<String>) -> Self {
        let base = root.parent().unwrap_or(root);
        let rel = path.strip_prefix(base).unwrap_or(path);
        Self { id, caption, path_words: path_words(rel) }
    }
}

/// One result: an image id and its BM25 score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextHit {
    pub id: ImageId,
    pub score: f32,
}

/// Splits a path into lowercase words: at separators and every character that is not a
/// letter or digit, then at lower→upper case changes and between letters and digits,
/// keeping the unsplit run too (`BeachDay` → beach day beachday, `DSC01234` → dsc 01234
/// dsc01234), so that both spellings find it.
/// `2019_Wedding/IMG cake-cutting.jpg` → "2019 wedding img cake cutting jpg".
pub fn path_words(path: &Path) -> String {
    let mut words: Vec<String> = Vec::new();
    for part in path.components() {
        let part = part.as_os_str().to_string_lossy();
        for run in part.split(|c: char| !c.is_alphanumeric()).filter(|r| !r.is_empty()) {
            let pieces = split_run(run);
            let compound = pieces.len() > 1;
            words.extend(pieces);
            if compound {
                words.push(run.to_lowercase());
            }
        }
    }
    words.join(" ")
}

/// `BeachDay` → [beach, day]; `DSC01234` → [dsc, 01234]; `wedding` → [wedding].
fn split_run(run: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut piece = String::new();
    let mut prev: Option<char> = None;
    for c in run.chars() {
        if let Some(p) = prev {
            let case_change = p.is_lowercase() && c.is_uppercase();
            let digit_change = p.is_ascii_digit() != c.is_ascii_digit();
            if (case_change || digit_change) && !piece.is_empty() {
                pieces.push(std::mem::take(&mut piece));
            }
        }
        piece.extend(c.to_lowercase());
        prev = Some(c);
    }
    if !piece.is_empty() {
        pieces.push(piece);
    }
    pieces
}

/// Natural language uses colons ("dinner: pasta") that the query syntax reads as
/// `field:value`; only our own field names keep that meaning.
fn soften(query: &str) -> String {
    query
        .split(' ')
        .map(|token| match token.split_once(':') {
            Some((field, _)) if field == "caption" || field == "path" => token.to_string(),
            Some(_) => token.replace(':', " "),
            None => token.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Clone, Copy)]
struct Fields {
    id: Field,
    caption: Field,
    path: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let id = b.add_i64_field("id", NumericOptions::default().set_indexed().set_stored());
    let text = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(ANALYZER)
            .set_index_option(IndexRecordOption::WithFreqsAndPositions),
    );
    let caption = b.add_text_field("caption", text.clone());
    let path = b.add_text_field("path", text);
    (b.build(), Fields { id, caption, path })
}

/// Letters and digits, lowercased, accents folded, English stop words dropped, stemmed.
fn analyzer() -> TextAnalyzer {
    let builder = TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(MAX_WORD))
        .filter(LowerCaser)
        .filter(AsciiFoldingFilter);
    match StopWordFilter::new(Language::English) {
        Some(stop) => builder.filter(stop).filter(Stemmer::new(Language::English)).build(),
        None => builder.filter(Stemmer::new(Language::English)).build(),
    }
}

/// The caption index of one library.
pub struct TextIndex {
    /// The folder; `None` for an index in memory.
    dir: Option<PathBuf>,
    index: Index,
    reader: IndexReader,
    fields: Fields,
    parser: QueryParser,
    writer: Mutex<Option<IndexWriter>>,
    stamp: Mutex<TextStamp>,
}

impl std::fmt::Debug for TextIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextIndex")
            .field("dir", &self.dir)
            .field("docs", &self.len())
            .field("stamp", &self.stamp())
            .finish()
    }
}

impl TextIndex {
    /// Opens the index saved in `dir` if its format, schema and stamp are `expected`.
    /// An unreadable index is `Stale`, never an error: it is rebuilt from SQLite.
    pub fn load(dir: &Path, expected: TextStamp) -> Result<TextLoaded, TextError> {
        if !dir.join("meta.json").is_file() {
            return Ok(TextLoaded::Missing);
        }
        let index = match Index::open_in_dir(dir) {
            Ok(ix) => ix,
            Err(e) => return Ok(TextLoaded::Stale(format!("cannot open the saved index: {e}"))),
        };
        let stamp = match check_saved(&index, dir) {
            Ok(stamp) => stamp,
            Err(reason) => return Ok(TextLoaded::Stale(reason)),
        };
        if stamp != expected {
            return Ok(TextLoaded::Stale(format!(
                "caption index is at generation {}/{}, the library at {}/{}",
                stamp.generation, stamp.text_generation, expected.generation, expected.text_generation
            )));
        }
        match Self::wrap(Some(dir.to_path_buf()), index, stamp) {
            Ok(ix) => {
                ix.clean_after_crash(dir);
                Ok(TextLoaded::Ready(ix))
            }
            Err(e) => Ok(TextLoaded::Stale(e.to_string())),
        }
    }

    /// The saved index's stamp and document count, or `None` if there is none (or it
    /// is not one of ours). Cheap: reads only tantivy's meta file.
    pub fn saved(dir: &Path) -> Result<Option<TextSaved>, TextError> {
        if !dir.join("meta.json").is_file() {
            return Ok(None);
        }
        let Ok(index) = Index::open_in_dir(dir) else { return Ok(None) };
        let Ok(stamp) = check_saved(&index, dir) else { return Ok(None) };
        let metas = index.load_metas().map_err(|source| TextError::Tantivy { path: dir.to_path_buf(), source })?;
        let docs = metas.segments.iter().map(|s| u64::from(s.num_docs())).sum();
        Ok(Some(TextSaved { stamp, docs }))
    }

    /// Replaces whatever is in `dir` (creating it) with exactly `docs`, committed at
    /// `stamp`. A folder that does not hold a readable index of ours is wiped first.
    /// Fails with [`TextError::Locked`] if another process is writing it.
    pub fn rebuild(dir: &Path, docs: &[TextDoc], stamp: TextStamp) -> Result<TextIndex, TextError> {
        let tantivy = |source| TextError::Tantivy { path: dir.to_path_buf(), source };
        let io = |source| TextError::Io { path: dir.to_path_buf(), source };
        let (schema, _) = schema();
        // In place when the folder holds a sound index of ours (tantivy's lock then
        // keeps a concurrent writer out); otherwise, or if that fails for any other
        // reason than the lock, from an empty folder.
        if dir.join("meta.json").is_file() {
            if let Some(index) = Index::open_in_dir(dir).ok().filter(|ix| ix.schema() == schema) {
                match Self::wrap(Some(dir.to_path_buf()), index, TextStamp::default())
                    .and_then(|ix| ix.replace_all(docs, stamp).map(|()| ix))
                {
                    Ok(ix) => return Ok(ix),
                    Err(e @ TextError::Locked { .. }) => return Err(e),
                    Err(_) => {}
                }
            }
        }
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io)?;
        }
        std::fs::create_dir_all(dir).map_err(io)?;
        let index = Index::create_in_dir(dir, schema).map_err(tantivy)?;
        let ix = Self::wrap(Some(dir.to_path_buf()), index, TextStamp::default())?;
        ix.replace_all(docs, stamp)?;
        Ok(ix)
    }

    /// An index in memory holding `docs`: what the engine serves when the saved one is
    /// stale and another process holds its lock. Writes to it are not persisted.
    pub fn in_memory(docs: &[TextDoc], stamp: TextStamp) -> Result<TextIndex, TextError> {
        let (schema, _) = schema();
        let ix = Self::wrap(None, Index::create_in_ram(schema), TextStamp::default())?;
        ix.replace_all(docs, stamp)?;
        Ok(ix)
    }

    fn wrap(dir: Option<PathBuf>, index: Index, stamp: TextStamp) -> Result<TextIndex, TextError> {
        let path = dir.clone().unwrap_or_else(|| PathBuf::from(":memory:"));
        let tantivy = |source| TextError::Tantivy { path: path.clone(), source };
        let (schema, fields) = schema();
        if index.schema() != schema {
            return Err(tantivy(TantivyError::SchemaError("not a magpie caption index".into())));
        }
        index.tokenizers().register(ANALYZER, analyzer());
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into().map_err(tantivy)?;
        let parser = QueryParser::for_index(&index, vec![fields.caption, fields.path]);
        Ok(TextIndex { dir, index, reader, fields, parser, writer: Mutex::new(None), stamp: Mutex::new(stamp) })
    }

    /// Removes what a process killed in the middle of a commit leaves in `dir`: tantivy's
    /// temporary files, and the files of segments the last commit no longer uses (tantivy
    /// collects those at its next commit, but a library that is only searched may not
    /// commit for a long time). Left alone while another process writes the index.
    fn clean_after_crash(&self, dir: &Path) {
        let unused = {
            let Ok(_lock) = self.index.directory().acquire_lock(&INDEX_WRITER_LOCK) else { return };
            remove_temp_files(dir);
            has_unused_segment_files(&self.index, dir)
        };
        if unused {
            // tantivy's own collector, which knows which files are its own and keeps
            // those a reader is opening; it runs under the writer lock it takes again.
            // Best effort: if it cannot run now, the next commit collects them.
            if let Ok(w) = self.index.writer_with_num_threads::<TantivyDocument>(1, WRITER_BUDGET) {
                let _ = w.garbage_collect_files().wait();
            }
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| PathBuf::from(":memory:"))
    }

    fn tantivy(&self) -> impl Fn(TantivyError) -> TextError + '_ {
        move |source| TextError::Tantivy { path: self.path(), source }
    }

    /// The folder, or `None` for an index in memory.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The stamp of the last commit.
    pub fn stamp(&self) -> TextStamp {
        *self.stamp.lock().expect("stamp lock")
    }

    /// Documents visible to search (committed).
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` with the writer, opening it (and taking the folder's lock) if needed.
    fn with_writer<T>(&self, f: impl FnOnce(&mut IndexWriter) -> Result<T, TextError>) -> Result<T, TextError> {
        let mut slot = self.writer.lock().expect("writer lock");
        if slot.is_none() {
            let w = self.index.writer_with_num_threads(1, WRITER_BUDGET).map_err(|e| match e {
                TantivyError::LockFailure(LockError::LockBusy, _) => TextError::Locked { path: self.path() },
                e => self.tantivy()(e),
            })?;
            if let Some(dir) = &self.dir {
                remove_temp_files(dir);
            }
            *slot = Some(w);
        }
        f(slot.as_mut().expect("writer just opened"))
    }

    /// Adds or replaces (by id) documents. Visible to search after [`commit`](Self::commit).
    pub fn upsert(&self, docs: &[TextDoc]) -> Result<(), TextError> {
        if docs.is_empty() {
            return Ok(());
        }
        self.with_writer(|w| {
            for d in docs {
                w.delete_term(Term::from_field_i64(self.fields.id, d.id));
                w.add_document(self.document(d)).map_err(self.tantivy())?;
            }
            Ok(())
        })
    }

    /// Removes documents by id (unknown ids are ignored). Visible after a commit.
    pub fn remove(&self, ids: &[ImageId]) -> Result<(), TextError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.with_writer(|w| {
            for id in ids {
                w.delete_term(Term::from_field_i64(self.fields.id, *id));
            }
            Ok(())
        })
    }

    /// Commits pending changes atomically with `stamp`, and makes them searchable.
    pub fn commit(&self, stamp: TextStamp) -> Result<(), TextError> {
        self.with_writer(|w| {
            let payload = serde_json::to_string(&Payload { format: TEXT_FORMAT.into(), stamp }).expect("payload is JSON");
            let mut prepared = w.prepare_commit().map_err(self.tantivy())?;
            prepared.set_payload(&payload);
            prepared.commit().map_err(self.tantivy())?;
            Ok(())
        })?;
        *self.stamp.lock().expect("stamp lock") = stamp;
        self.reader.reload().map_err(self.tantivy())
    }

    /// Closes the writer, releasing the folder's lock for other processes after letting
    /// running segment merges finish. Uncommitted changes are dropped.
    pub fn release_writer(&self) -> Result<(), TextError> {
        let writer = self.writer.lock().expect("writer lock").take();
        if let Some(mut w) = writer {
            w.rollback().map_err(self.tantivy())?;
            w.wait_merging_threads().map_err(self.tantivy())?;
        }
        Ok(())
    }

    /// Replaces every document with `docs` and commits at `stamp`.
    fn replace_all(&self, docs: &[TextDoc], stamp: TextStamp) -> Result<(), TextError> {
        self.with_writer(|w| {
            w.delete_all_documents().map_err(self.tantivy())?;
            for d in docs {
                w.add_document(self.document(d)).map_err(self.tantivy())?;
            }
            Ok(())
        })?;
        self.commit(stamp)?;
        self.release_writer()
    }

    fn document(&self, d: &TextDoc) -> TantivyDocument {
        let mut document = doc!(self.fields.id => d.id, self.fields.path => d.path_words.as_str());
        if let Some(c) = &d.caption {
            document.add_text(self.fields.caption, c);
        }
        document
    }

    /// The `k` best documents for `query` by BM25 over caption and path words, best
    /// first. Any text is accepted: what the query syntax cannot use is ignored.
    pub fn search(&self, query: &str, k: usize) -> Result<Vec<TextHit>, TextError> {
        if k == 0 || query.trim().is_empty() {
            return Ok(Vec::new());
        }
        let (query, _ignored) = self.parser.parse_query_lenient(&soften(query));
        let searcher = self.reader.searcher();
        let top = searcher.search(&query, &TopDocs::with_limit(k).order_by_score()).map_err(self.tantivy())?;
        let mut hits = Vec::with_capacity(top.len());
        for (score, addr) in top {
            let doc: TantivyDocument = searcher.doc(addr).map_err(self.tantivy())?;
            if let Some(id) = doc.get_first(self.fields.id).and_then(|v| v.as_i64()) {
                hits.push(TextHit { id, score });
            }
        }
        Ok(hits)
    }
}

impl Drop for TextIndex {
    fn drop(&mut self) {
        if let Ok(slot) = self.writer.get_mut() {
            if let Some(mut w) = slot.take() {
                let _ = w.rollback();
            }
        }
    }
}

/// Removes from `dir` the temporary files of tantivy's atomic writes (`.tmpXXXXXX`, made
/// by the `tempfile` crate beside `meta.json` and `.managed.json`) that a process killed
/// in the middle of a commit left behind. Only the holder of the writer lock writes those
/// files, so call it holding that lock.
fn remove_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let temp = e.file_name().to_str().is_some_and(|n| n.starts_with(".tmp"));
        if temp && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether `dir` holds segment files (`<segment id>.<ext>`) of no segment of the last
/// commit.
fn has_unused_segment_files(index: &Index, dir: &Path) -> bool {
    let Ok(living) = index.searchable_segment_ids() else { return false };
    let living: std::collections::HashSet<String> = living.iter().map(|id| id.uuid_string()).collect();
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|e| {
        let name = e.file_name();
        let Some(name) = name.to_str() else { return false };
        let segment = name.split('.').next().unwrap_or_default();
        segment.len() == 32 && segment.bytes().all(|b| b.is_ascii_hexdigit()) && !living.contains(segment)
    })
}

/// The stamp of a saved index of ours, or why it is not usable.
fn check_saved(index: &Index, dir: &Path) -> Result<TextStamp, String> {
    let (schema, _) = schema();
    if index.schema() != schema {
        return Err(format!("{}: the caption index has another schema", dir.display()));
    }
    let metas = index.load_metas().map_err(|e| format!("{}: {e}", dir.display()))?;
    let Some(payload) = metas.payload else {
        return Err(format!("{}: the caption index has no magpie stamp", dir.display()));
    };
    let p: Payload = serde_json::from_str(&payload).map_err(|e| format!("{}: bad caption index stamp: {e}", dir.display()))?;
    if p.format != TEXT_FORMAT {
        return Err(format!("caption index format `{}` is not `{TEXT_FORMAT}`", p.format));
    }
    Ok(p.stamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colons_are_words_unless_they_name_our_fields() {
        assert_eq!(soften("dinner: pasta 18:30"), "dinner  pasta 18 30");
        assert_eq!(soften("caption:dog path:x"), "caption:dog path:x");
    }

    #[test]
    fn path_words_split_like_a_person_reads() {
        let w = |p: &str| path_words(Path::new(p));
        assert_eq!(w("2019_Wedding/IMG cake-cutting.jpg"), "2019 wedding img cake cutting jpg");
        assert_eq!(w("/home/me/BeachDay/DSC01234.JPG"), "home me beach day beachday dsc 01234 dsc01234 jpg");
        assert_eq!(w("IMG_0001"), "img 0001");
        assert_eq!(w("Été à Paris/crème brûlée.png"), "été à paris crème brûlée png");
        assert_eq!(w("___/..//x"), "x");
        assert_eq!(w(""), "");
    }
}
