//! The indexing pipeline. Decoding and preprocessing run on a pool of threads while the
//! model embeds the previous batch; each embedded batch is committed to SQLite in one
//! transaction and only then added to the vector index and (its path words, and any
//! caption it keeps) to the caption index.

use crate::{Error, Library, Result};
use magpie_core::{Embedding, ImageEmbedder, Pixels};
use magpie_media::DecodeOptions;
use magpie_store::{FileState, FileStatus, NewFile, RootId};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Extensions that mark a file as meant to be an image: such a file that does not decode
/// is reported as a failure; any other non-image file is silently ignored.
const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "jpe", "jfif", "png", "gif", "webp", "bmp", "dib", "tif", "tiff", "heic", "heif", "avif",
];

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct IndexOptions {
    /// Images per model call.
    pub batch_size: usize,
    /// Threads decoding and preprocessing (0: one per core).
    pub decode_threads: usize,
    /// Images declaring more pixels than this are refused (decompression bombs).
    pub max_pixels: u64,
    /// How often the vector index is saved during a long run.
    pub save_every: Duration,
}

impl Default for IndexOptions {
    fn default() -> Self {
        Self {
            batch_size: 16,
            decode_threads: 0,
            max_pixels: DecodeOptions::default().max_pixels,
            save_every: Duration::from_secs(60),
        }
    }
}

/// A snapshot of a running index job.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    /// Files that need work (new or changed), known once the walk is over.
    pub total: u64,
    /// Of those, finished (embedded or failed).
    pub done: u64,
    pub failed: u64,
    /// Files seen so far by the walk.
    pub scanned: u64,
    pub elapsed: Duration,
}

impl Progress {
    /// Files per second over the run so far.
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// What an index run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IndexReport {
    pub scanned: u64,
    pub unchanged: u64,
    pub added: u64,
    pub updated: u64,
    pub deleted: u64,
    /// Non-image files without an image extension, skipped silently.
    pub ignored: u64,
    /// New files that took over the caption, labels or conversations of a retired file
    /// with the same content (moved or renamed files).
    pub moved: u64,
    /// Files (or folders) that could not be indexed, with the reason.
    pub failed: Vec<(PathBuf, String)>,
    pub elapsed: Duration,
}

impl IndexReport {
    /// Images embedded per second in this run.
    pub fn rate(&self) -> f64 {
        (self.added + self.updated) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A file the walk found new or changed.
#[derive(Debug, Clone)]
struct Candidate {
    root_id: RootId,
    path: PathBuf,
    size: u64,
    mtime_ns: i64,
    existing: bool,
}

/// What the decode stage made of a candidate.
enum Prepared {
    Ready { cand: Candidate, hash: String, meta: magpie_store::ImageMeta, pixels: Pixels },
    Failed { cand: Candidate, reason: String },
    Ignored,
}

/// What the embed stage hands to the committing side.
enum Batch {
    Embedded(Vec<NewFile>, Vec<bool>),
    Failed(Candidate, String),
    Ignored,
}

pub(crate) fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    md.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// Strips the leading "path: " that media errors carry: the row already names the file.
fn reason(path: &Path, e: impl std::fmt::Display) -> String {
    let msg = e.to_string();
    let prefix = format!("{}: ", path.display());
    msg.strip_prefix(&prefix).map(str::to_string).unwrap_or(msg)
}

fn to_store_meta(m: &magpie_media::ImageMeta) -> magpie_store::ImageMeta {
    magpie_store::ImageMeta {
        width: m.width,
        height: m.height,
        format: m.format.as_str().to_string(),
        exif: magpie_store::Exif {
            taken_at: m.exif.taken_at.clone(),
            camera_make: m.exif.camera_make.clone(),
            camera_model: m.exif.camera_model.clone(),
            orientation: m.exif.orientation,
            gps_lat: m.exif.gps_lat,
            gps_lon: m.exif.gps_lon,
        },
    }
}

/// The first bytes of a file, enough for [`magpie_media::sniff`].
fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(4096);
    std::fs::File::open(path)?.take(4096).read_to_end(&mut head)?;
    Ok(head)
}

/// A file's bytes, read into `buf` (emptied first), with the size and modification time
/// they belong to. A file that changes while it is read (a copy still being written, an
/// editor saving) gives an error: whatever was read may be half old, half new. Its row
/// then keeps the size and time from before the read, which the changed file no longer
/// has, so the next run (or the watcher's next event) reads it again.
fn read_stable(path: &Path, buf: &mut Vec<u8>) -> std::result::Result<(u64, i64), String> {
    read_stable_with(path, buf, |f, buf| std::io::Read::read_to_end(f, buf).map(drop))
}

fn read_stable_with(
    path: &Path,
    bytes: &mut Vec<u8>,
    read: impl FnOnce(&mut std::fs::File, &mut Vec<u8>) -> std::io::Result<()>,
) -> std::result::Result<(u64, i64), String> {
    bytes.clear();
    let mut f = std::fs::File::open(path).map_err(|e| reason(path, e))?;
    let before = f.metadata().map_err(|e| reason(path, e))?;
    // Capacity for the whole file, within reason (a huge file named like an image grows
    // the buffer as it goes, and fails later, in the decoder's limits).
    bytes.reserve(before.len().min(256 << 20) as usize);
    read(&mut f, bytes).map_err(|e| reason(path, e))?;
    // By path: a file replaced by a rename during the read counts as changed too.
    let after = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(_) => return Err("vanished while being read; it will be retired on the next run".into()),
    };
    let (size, mtime) = (before.len(), mtime_ns(&before));
    if bytes.len() as u64 != size || after.len() != size || mtime_ns(&after) != mtime {
        return Err(format!(
            "changed while being read ({size} bytes when opened, {} read, {} now); it will be read again on the next run",
            bytes.len(),
            after.len()
        ));
    }
    Ok((size, mtime))
}

/// A file buffer each decode thread keeps between files: a fresh one per file (2–5 MB for
/// a photo) would be new memory for the kernel to fault in and clear every time.
/// Buffers grown past this are let go after their file.
const KEEP_FILE_BUFFER: usize = 32 << 20;

thread_local! {
    static FILE_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Read, sniff, hash, decode (at reduced scale when enough) and preprocess one file.
fn prepare(cand: Candidate, embedder: &dyn ImageEmbedder, opts: &DecodeOptions) -> Prepared {
    // A file not named like an image is read only as far as sniffing needs: photo
    // folders hold videos and archives too, and ignored files are looked at every run.
    if !has_image_extension(&cand.path) {
        match read_head(&cand.path) {
            Ok(head) if magpie_media::sniff(&head).is_none() => return Prepared::Ignored,
            Ok(_) => {}
            Err(e) => {
                let r = reason(&cand.path, e);
                return Prepared::Failed { cand, reason: r };
            }
        }
    }
    let mut bytes = FILE_BUFFER.take();
    let read = read_stable(&cand.path, &mut bytes).and_then(|(size, mtime_ns)| {
        let hash = blake3::hash(&bytes).to_hex().to_string();
        let decoded = magpie_media::decode_bytes(&bytes, opts, &cand.path).map_err(|e| reason(&cand.path, e))?;
        Ok((size, mtime_ns, hash, decoded))
    });
    if bytes.capacity() <= KEEP_FILE_BUFFER {
        FILE_BUFFER.set(bytes);
    }
    let (cand, hash, decoded) = match read {
        // The file may have changed since the walk: what is stored must describe these bytes.
        Ok((size, mtime_ns, hash, decoded)) => (Candidate { size, mtime_ns, ..cand }, hash, decoded),
        Err(r) => return Prepared::Failed { cand, reason: r },
    };
    match embedder.preprocess(&decoded.image) {
        Ok(pixels) => Prepared::Ready { cand, hash, meta: to_store_meta(&decoded.meta), pixels },
        Err(e) => Prepared::Failed { reason: format!("preprocessing failed: {e}"), cand },
    }
}

/// Stops the kernel backing this process's memory with transparent huge pages, from now
/// on (Linux; elsewhere nothing).
///
/// Indexing frees and allocates megabytes per image (file, scan, planes, pixels, the
/// model's activations). The allocator hands some of them fresh address space, which it
/// has advised for huge pages, so each first touch has the kernel clear a whole 2 MB page:
/// in a sampled profile of `magpie index` over 12 MP JPEGs on a 2-core Zen 5, 15% of the
/// CPU time of the indexing went to `clear_page`. With 4 KB pages only what is touched is
/// cleared: the same runs took 9–13% less CPU time and ran 3–10% faster, and the pure
/// embedding rate did not change. Memory already faulted in (the loaded weights) keeps its
/// huge pages; a server that indexes goes on without them for its searches too.
pub(crate) fn small_pages_from_now() {
    #[cfg(target_os = "linux")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: PR_SET_THP_DISABLE takes one integer argument and the rest zero; it
            // only sets a flag on this process's memory map.
            let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
            tracing::debug!(ok = r == 0, "transparent huge pages off for indexing");
        });
    }
}

/// Decode stage on `threads` threads, embed stage on one, results on `out`.
fn run_pipeline(
    cands: Vec<Candidate>,
    embedder: Arc<dyn ImageEmbedder>,
    opts: IndexOptions,
    cancel: Arc<AtomicBool>,
    out: tokio::sync::mpsc::Sender<Batch>,
) {
    let threads = if opts.decode_threads == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
    } else {
        opts.decode_threads
    };
    small_pages_from_now();
    let decode = DecodeOptions { max_pixels: opts.max_pixels, min_side: Some(embedder.input_side()) };
    let cands = Arc::new(cands);
    let next = Arc::new(AtomicUsize::new(0));
    let batch = opts.batch_size.max(1);
    let (tx, rx) = mpsc::sync_channel::<Prepared>(batch * 2);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (cands, next, tx, embedder, cancel) = (cands.clone(), next.clone(), tx.clone(), embedder.clone(), cancel.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= cands.len() || cancel.load(Ordering::Relaxed) {
                    break;
                }
                if tx.send(prepare(cands[i].clone(), embedder.as_ref(), &decode)).is_err() {
                    break;
                }
            })
        })
        .collect();
    drop(tx);
    let mut pending: Vec<(Candidate, String, magpie_store::ImageMeta, Pixels)> = Vec::with_capacity(batch);
    let flush = |pending: &mut Vec<(Candidate, String, magpie_store::ImageMeta, Pixels)>| -> bool {
        if pending.is_empty() {
            return true;
        }
        let (items, pixels): (Vec<_>, Vec<Pixels>) =
            std::mem::take(pending).into_iter().map(|(cand, hash, meta, pixels)| ((cand, hash, meta), pixels)).unzip();
        let model = embedder.model().id.clone();
        let msg = match embedder.embed_pixels(&pixels) {
            Ok(vectors) if vectors.len() == items.len() => {
                let mut files = Vec::with_capacity(items.len());
                let mut existing = Vec::with_capacity(items.len());
                let mut failures = Vec::new();
                for ((cand, hash, meta), v) in items.into_iter().zip(vectors) {
                    match Embedding::normalized(model.clone(), v) {
                        Ok(embedding) => {
                            existing.push(cand.existing);
                            files.push(NewFile {
                                root_id: cand.root_id,
                                path: cand.path,
                                size: cand.size,
                                mtime_ns: cand.mtime_ns,
                                content_hash: hash,
                                meta,
                                embedding,
                            });
                        }
                        Err(e) => failures.push(Batch::Failed(cand, format!("embedding failed: {e}"))),
                    }
                }
                let mut ok = out.blocking_send(Batch::Embedded(files, existing)).is_ok();
                for f in failures {
                    ok &= out.blocking_send(f).is_ok();
                }
                return ok;
            }
            Ok(v) => format!("model returned {} vectors for {} images", v.len(), items.len()),
            Err(e) => format!("embedding failed: {e}"),
        };
        items.into_iter().all(|(cand, ..)| out.blocking_send(Batch::Failed(cand, msg.clone())).is_ok())
    };
    for p in rx.iter() {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        let sent = match p {
            Prepared::Ready { cand, hash, meta, pixels } => {
                pending.push((cand, hash, meta, pixels));
                pending.len() < batch || flush(&mut pending)
            }
            Prepared::Failed { cand, reason } => out.blocking_send(Batch::Failed(cand, reason)).is_ok(),
            Prepared::Ignored => out.blocking_send(Batch::Ignored).is_ok(),
        };
        if !sent {
            cancel.store(true, Ordering::Relaxed);
            break;
        }
    }
    if !cancel.load(Ordering::Relaxed) {
        flush(&mut pending);
    }
    drop(rx);
    for w in workers {
        let _ = w.join();
    }
}

/// After a removal that took SQLite from generation `before` to `after`: the index, which
/// has just dropped the same files, is at `after` too, if it was current before. (If it
/// was not, it stays behind and the next open rebuilds it.)
fn follow_generation(ix: &mut magpie_index::VectorIndex, before: u64, after: u64) {
    if ix.generation() == before {
        ix.set_generation(after);
    }
}

/// Walks one root, comparing with what the store knows. Returns the candidates and the
/// known paths that were not seen (deleted).
fn walk_root(
    root: &Path,
    root_id: RootId,
    known: &HashMap<PathBuf, FileState>,
    report: &mut IndexReport,
    cands: &mut Vec<Candidate>,
    seen: &mut std::collections::HashSet<PathBuf>,
    walk_errors: &mut Vec<(PathBuf, String)>,
) {
    // follow_links: photos folders often link elsewhere; walkdir detects loops and
    // reports them as errors instead of descending forever.
    for entry in walkdir::WalkDir::new(root).follow_links(true).sort_by_file_name() {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let path = e.path().map(Path::to_path_buf).unwrap_or_else(|| root.to_path_buf());
                let msg = if e.loop_ancestor().is_some() {
                    "symbolic link loop, not followed".to_string()
                } else {
                    e.io_error().map(|io| io.to_string()).unwrap_or_else(|| e.to_string())
                };
                walk_errors.push((path, msg));
                continue;
            }
        };
        if !entry.file_type().is_file() {
            continue;
        }
        let path = entry.path().to_path_buf();
        let md = match entry.metadata() {
            Ok(m) => m,
            Err(e) => {
                walk_errors.push((path, e.to_string()));
                continue;
            }
        };
        if !seen.insert(path.clone()) {
            continue; // already walked under another root of this run
        }
        report.scanned += 1;
        let (size, mtime) = (md.len(), mtime_ns(&md));
        let prior = known.get(&path);
        if let Some(k) = prior {
            let same = k.size == size && k.mtime_ns == mtime;
            if same && matches!(k.status, FileStatus::Indexed | FileStatus::Failed) {
                report.unchanged += 1;
                continue;
            }
        }
        cands.push(Candidate {
            root_id,
            path,
            size,
            mtime_ns: mtime,
            existing: prior.is_some_and(|k| k.status != FileStatus::Deleted),
        });
    }
}

impl Library {
    /// Indexes the folders `roots`: new files are embedded, changed ones re-embedded,
    /// unchanged ones skipped, vanished ones turned into tombstones. A file that fails is
    /// recorded with its reason and the run goes on. Progress goes to `progress`.
    pub async fn index(
        &self,
        roots: &[PathBuf],
        embedder: Arc<dyn ImageEmbedder>,
        opts: &IndexOptions,
        progress: &(dyn Fn(&Progress) + Sync),
    ) -> Result<IndexReport> {
        self.index_cancellable(roots, embedder, opts, progress, Arc::new(AtomicBool::new(false))).await
    }

    /// [`index`](Self::index) that stops early (after committing what is done) when
    /// `cancel` becomes true.
    pub async fn index_cancellable(
        &self,
        roots: &[PathBuf],
        embedder: Arc<dyn ImageEmbedder>,
        opts: &IndexOptions,
        progress: &(dyn Fn(&Progress) + Sync),
        cancel: Arc<AtomicBool>,
    ) -> Result<IndexReport> {
        self.check_model(embedder.model())?;
        self.check_recorded_model().await?;
        let start = Instant::now();
        let mut report = IndexReport::default();
        let mut cands = Vec::new();
        let mut deleted = Vec::new();
        let mut walk_errors = Vec::new();
        let mut walked = Vec::with_capacity(roots.len());
        for root in roots {
            let root = std::fs::canonicalize(root).map_err(|e| Error::path(root, e))?;
            if !root.is_dir() {
                return Err(Error::path(&root, "not a directory"));
            }
            let r = self.store.add_root(&root).await?;
            walked.push((root, r.id));
        }
        // What the library knows, by path, whichever root a file was found under: a
        // folder indexed both on its own and as part of a parent must not be re-embedded
        // (or counted as new) each time the other root is walked.
        let mut known = self.known_files().await?;
        let mut seen: std::collections::HashSet<PathBuf> = Default::default();
        for (root, rid) in &walked {
            let (root2, rid) = (root.clone(), *rid);
            let (rep, cs, seen2, errs, known2) = tokio::task::spawn_blocking(move || {
                let (mut rep, mut cs, mut errs) = (IndexReport::default(), Vec::new(), Vec::new());
                walk_root(&root2, rid, &known, &mut rep, &mut cs, &mut seen, &mut errs);
                (rep, cs, seen, errs, known)
            })
            .await
            .map_err(|e| Error::Task(e.to_string()))?;
            (seen, known) = (seen2, known2);
            report.scanned += rep.scanned;
            report.unchanged += rep.unchanged;
            cands.extend(cs);
            walk_errors.extend(errs);
        }
        deleted.extend(
            known
                .values()
                .filter(|k| k.status != FileStatus::Deleted && !seen.contains(&k.path))
                .filter(|k| walked.iter().any(|(root, _)| k.path.starts_with(root)))
                // A folder that could not be read this time (permissions, a disk
                // hiccup) says nothing about its files: keep them.
                .filter(|k| !walk_errors.iter().any(|(p, _): &(PathBuf, String)| p.is_dir() && k.path.starts_with(p)))
                .map(|k| k.id),
        );
        self.process(report, cands, deleted, walk_errors, embedder, opts, progress, cancel, start).await
    }

    /// Indexes only `paths` (what file-system events named) under `roots`: a path that
    /// is a file is checked against what the library knows (new or changed: embedded), a
    /// folder is walked (a folder moved in), a path that no longer exists retires what
    /// the library had there (a file, or everything under a folder moved away). Paths
    /// outside `roots` are ignored. The rest of the tree is not walked.
    pub async fn index_paths(
        &self,
        roots: &[PathBuf],
        paths: &[PathBuf],
        embedder: Arc<dyn ImageEmbedder>,
        opts: &IndexOptions,
        cancel: Arc<AtomicBool>,
    ) -> Result<IndexReport> {
        self.check_model(embedder.model())?;
        self.check_recorded_model().await?;
        let start = Instant::now();
        let mut walked = Vec::with_capacity(roots.len());
        for root in roots {
            let root = std::fs::canonicalize(root).map_err(|e| Error::path(root, e))?;
            let r = self.store.add_root(&root).await?;
            walked.push((root, r.id));
        }
        let known = self.known_files().await?;
        // Outermost first, each once: a folder's walk covers the paths under it.
        let mut todo: Vec<PathBuf> = paths.to_vec();
        todo.sort();
        todo.dedup();
        let mut kept: Vec<PathBuf> = Vec::new();
        for p in todo {
            if !kept.iter().any(|k| p.starts_with(k) && k.is_dir()) {
                kept.push(p);
            }
        }
        let (report, cands, deleted, walk_errors) = tokio::task::spawn_blocking(move || {
            let mut report = IndexReport::default();
            let (mut cands, mut deleted, mut walk_errors) = (Vec::new(), Vec::new(), Vec::new());
            let mut seen = std::collections::HashSet::new();
            for p in kept {
                let Some((root, rid)) = walked.iter().filter(|(r, _)| p.starts_with(r)).max_by_key(|(r, _)| r.as_os_str().len())
                else {
                    continue;
                };
                let exists = std::fs::metadata(&p).is_ok();
                if exists {
                    let before = walk_errors.len();
                    walk_root(&p, *rid, &known, &mut report, &mut cands, &mut seen, &mut walk_errors);
                    let unreadable: Vec<PathBuf> = walk_errors[before..].iter().map(|(e, _): &(PathBuf, String)| e.clone()).collect();
                    // Known files under a walked folder that the walk did not see are gone.
                    deleted.extend(
                        known
                            .values()
                            .filter(|k| k.status != FileStatus::Deleted && k.path.starts_with(&p) && !seen.contains(&k.path))
                            .filter(|k| !unreadable.iter().any(|u| u.is_dir() && k.path.starts_with(u)))
                            .map(|k| k.id),
                    );
                } else {
                    // Gone: a file, or a folder and everything the library had under it.
                    deleted.extend(
                        known
                            .values()
                            .filter(|k| k.status != FileStatus::Deleted && (k.path == p || k.path.starts_with(&p)))
                            .filter(|k| k.path.starts_with(root))
                            .map(|k| k.id),
                    );
                }
            }
            deleted.sort_unstable();
            deleted.dedup();
            (report, cands, deleted, walk_errors)
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?;
        self.process(report, cands, deleted, walk_errors, embedder, opts, &|_| {}, cancel, start).await
    }

    /// What the library knows, by path, whichever root a file was found under.
    async fn known_files(&self) -> Result<HashMap<PathBuf, FileState>> {
        let mut known = HashMap::new();
        for r in self.store.roots().await? {
            known.extend(self.store.files_under_root(r.id).await?.into_iter().map(|f| (f.path.clone(), f)));
        }
        Ok(known)
    }

    /// The second half of an index run: records walk errors, retires `deleted`, then
    /// decodes, embeds and commits `cands`.
    #[allow(clippy::too_many_arguments)]
    async fn process(
        &self,
        mut report: IndexReport,
        cands: Vec<Candidate>,
        deleted: Vec<magpie_core::ImageId>,
        walk_errors: Vec<(PathBuf, String)>,
        embedder: Arc<dyn ImageEmbedder>,
        opts: &IndexOptions,
        progress: &(dyn Fn(&Progress) + Sync),
        cancel: Arc<AtomicBool>,
        start: Instant,
    ) -> Result<IndexReport> {
        for (path, msg) in walk_errors {
            self.store.log_failure(&path, &msg).await?;
            report.failed.push((path, msg));
        }
        if !deleted.is_empty() {
            // SQLite bumps the generation for the removal: the indexes follow it together
            // with the removal, so that no save can show one without the other.
            let _text_guard = self.text_write.lock().await;
            let before = self.store.generation().await?;
            report.deleted = self.store.mark_deleted(&deleted).await?;
            let after = self.store.generation().await?;
            {
                let mut ix = self.index.write().expect("index lock");
                for id in &deleted {
                    ix.remove(*id);
                }
                follow_generation(&mut ix, before, after);
            }
            self.text().remove(&deleted)?;
        }

        let mut prog = Progress { total: cands.len() as u64, scanned: report.scanned, ..Default::default() };
        progress(&prog);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(4);
        let pipeline = {
            let (embedder, opts, cancel) = (embedder.clone(), opts.clone(), cancel.clone());
            tokio::task::spawn_blocking(move || run_pipeline(cands, embedder, opts, cancel, tx))
        };
        let mut last_save = Instant::now();
        let mut dirty = report.deleted > 0;
        let mut text_dirty = report.deleted > 0;
        while let Some(b) = rx.recv().await {
            match b {
                Batch::Embedded(files, existing) => {
                    let text_guard = self.text_write.lock().await;
                    let committed = self.store.commit_batch(&files).await?;
                    {
                        let items: Vec<(i64, &[f32])> =
                            committed.ids.iter().zip(&files).map(|(id, f)| (*id, f.embedding.vector())).collect();
                        let mut ix = self.index.write().expect("index lock");
                        ix.insert(&items)?;
                        ix.set_generation(committed.generation);
                    }
                    // A new file with the content of a retired one is that file moved:
                    // its caption, labels and conversations follow it.
                    for ((id, f), was) in committed.ids.iter().zip(&files).zip(&existing) {
                        if *was {
                            continue;
                        }
                        if let Some(old) = self.store.tombstone_by_hash(&f.content_hash).await? {
                            if self.store.adopt_annotations(old, *id).await?.any() {
                                report.moved += 1;
                            }
                        }
                    }
                    self.refresh_text(&committed.ids).await?;
                    drop(text_guard);
                    dirty = true;
                    text_dirty = true;
                    for e in existing {
                        if e {
                            report.updated += 1
                        } else {
                            report.added += 1
                        }
                    }
                    prog.done += files.len() as u64;
                }
                Batch::Failed(cand, why) => {
                    let text_guard = self.text_write.lock().await;
                    let before = self.store.generation().await?;
                    let id = self.store.record_failure(cand.root_id, &cand.path, cand.size, cand.mtime_ns, &why).await?;
                    // A file that was indexed and now fails leaves the indexes (SQLite
                    // bumped the generation for it); save that.
                    let after = self.store.generation().await?;
                    let was_indexed = {
                        let mut ix = self.index.write().expect("index lock");
                        let removed = ix.remove(id);
                        if removed {
                            follow_generation(&mut ix, before, after);
                        }
                        removed
                    };
                    if was_indexed {
                        self.text().remove(&[id])?;
                        text_dirty = true;
                    }
                    drop(text_guard);
                    dirty |= was_indexed;
                    report.failed.push((cand.path, why));
                    prog.done += 1;
                    prog.failed += 1;
                }
                Batch::Ignored => {
                    report.ignored += 1;
                    prog.done += 1;
                }
            }
            prog.elapsed = start.elapsed();
            progress(&prog);
            if dirty && last_save.elapsed() >= opts.save_every {
                self.save_index().await?;
                if text_dirty {
                    // Stays set: the end of the run commits again and closes the writer.
                    let _guard = self.text_write.lock().await;
                    self.commit_text().await?;
                }
                last_save = Instant::now();
                dirty = false;
            }
        }
        pipeline.await.map_err(|e| Error::Task(e.to_string()))?;
        if dirty {
            self.save_index().await?;
        }
        if text_dirty {
            self.finish_text().await?;
        }
        report.elapsed = start.elapsed();
        Ok(report)
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_changing_or_vanishing_mid_read_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("growing.jpg");
        std::fs::write(&p, vec![1u8; 5000]).unwrap();
        // Unchanged: the bytes with their size and time.
        let mut bytes = vec![9u8; 7000]; // a buffer's old contents go
        let (size, mtime) = read_stable(&p, &mut bytes).unwrap();
        assert_eq!((bytes.len(), size), (5000, 5000));
        assert!(bytes.iter().all(|&b| b == 1));
        assert_eq!(mtime, mtime_ns(&std::fs::metadata(&p).unwrap()));
        // A writer appends while we read.
        let e = read_stable_with(&p, &mut bytes, |f, buf| {
            std::io::Read::read_to_end(f, buf)?;
            std::fs::OpenOptions::new().append(true).open(&p)?.write_all(&[2u8; 100])?;
            Ok(())
        })
        .unwrap_err();
        assert!(e.contains("changed while being read") && e.contains("5000 bytes when opened") && e.contains("5100 now"), "{e}");
        // Rewritten in place (same size, new time) during the read.
        let e = read_stable_with(&p, &mut bytes, |f, buf| {
            std::io::Read::read_to_end(f, buf)?;
            let f2 = std::fs::OpenOptions::new().write(true).open(&p)?;
            f2.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))?;
            Ok(())
        })
        .unwrap_err();
        assert!(e.contains("changed while being read"), "{e}");
        // Truncated during the read: fewer bytes than the size it was opened with.
        let e = read_stable_with(&p, &mut bytes, |f, buf| {
            std::fs::OpenOptions::new().write(true).open(&p)?.set_len(10)?;
            std::io::Read::read_to_end(f, buf).map(drop)
        })
        .unwrap_err();
        assert!(e.contains("changed while being read"), "{e}");
        // Deleted during the read.
        let e = read_stable_with(&p, &mut bytes, |f, buf| {
            std::io::Read::read_to_end(f, buf)?;
            std::fs::remove_file(&p)
        })
        .unwrap_err();
        assert!(e.contains("vanished while being read"), "{e}");
        // And gone before the open: the OS error.
        assert!(read_stable(&p, &mut bytes).unwrap_err().contains("No such file"));
    }

    use std::io::Write;
}
