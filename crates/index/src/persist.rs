//! Saving and reloading a [`VectorIndex`] beside the database.
//!
//! Files in `dir`, for a `basename` such as `vectors`:
//!
//! | file | kind | content |
//! |---|---|---|
//! | `vectors.meta.json` | both | [`IndexMeta`], format/ABI tags, counts, and the length and BLAKE3 of every file below |
//! | `vectors.exact.bin` | exact | `MGPXACT1`, dim: u64, n: u64, n image ids (i64), n·dim f32 (all little-endian) |
//! | `vectors.hnsw.ids` | hnsw | `MGPHIDS1`, n: u64, n image ids (i64 LE, indexed by hnsw data id), n live flags (u8) |
//! | `vectors.hnsw.graph`, `vectors.hnsw.data` | hnsw | hnsw_rs' `file_dump` (native-endian; absent when the graph is empty) |
//!
//! Every file is written under a temporary name (`vectors.tmp-<pid>-<n>.*`), synced, then
//! renamed over the old one, the meta file last: it is the commit record. A crash between
//! renames leaves a meta whose checksums do not match, which loads as stale (the engine
//! rebuilds from SQLite) and never as a mixed index. Temporary files are removed on error;
//! those of a process killed while saving are removed by the next save (or
//! [`VectorIndex::remove_stale_temp_files`]) once that process is gone.
//! The checksums also keep hnsw_rs' loader, which asserts or even exits the process on a
//! malformed file, away from anything we did not write.

use crate::exact::ExactIndex;
use crate::hnsw::HnswIndex;
use crate::types::{IndexKind, IndexMeta, IndexParams, IndexSpec};
use crate::vector::{Inner, VectorIndex};
use crate::{Error, Result};
use magpie_core::ImageId;
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// 2: the graph's distance is `magpie_index::dot::UnitDot` (hnsw_rs reloads a dump only
/// under the distance type it was written with; 1 used anndists' `DistDot`).
const FORMAT: u32 = 2;
const EXACT_MAGIC: &[u8; 8] = b"MGPXACT1";
const IDS_MAGIC: &[u8; 8] = b"MGPHIDS1";

/// What [`VectorIndex::load`] found.
#[derive(Debug)]
pub enum Loaded {
    Ready(VectorIndex),
    /// No saved index under this name.
    Missing,
    /// A saved index that cannot serve this library; rebuild it from SQLite.
    Stale(StaleReason),
}

impl Loaded {
    pub fn ready(self) -> Option<VectorIndex> {
        match self {
            Loaded::Ready(ix) => Some(ix),
            _ => None,
        }
    }
}

/// Why a saved index was not used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StaleReason {
    #[error("index file format `{found}` is not `{expected}`")]
    Format { expected: String, found: String },
    #[error("index was built for model `{found}`, the library uses `{expected}`")]
    Model { expected: String, found: String },
    #[error("index holds {found}-d vectors, the library's model gives {expected}-d")]
    Dimension { expected: usize, found: usize },
    #[error("index graph was built with m={}, ef_construction={}; configured m={}, ef_construction={}",
        found.m, found.ef_construction, expected.m, expected.ef_construction)]
    Params { expected: IndexParams, found: IndexParams },
    #[error("index is at generation {found}, the library at {expected}")]
    Generation { expected: u64, found: u64 },
    #[error("{}: missing", path.display())]
    MissingFile { path: PathBuf },
    #[error("{}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
}

#[derive(Debug, Serialize, Deserialize)]
struct MetaFile {
    format: String,
    #[serde(flatten)]
    meta: IndexMeta,
    live: usize,
    points: usize,
    files: Vec<FileSum>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FileSum {
    name: String,
    bytes: u64,
    blake3: String,
}

/// Format version plus what hnsw_rs' native-endian, usize-sized dump depends on.
fn format_tag() -> String {
    let endian = if cfg!(target_endian = "little") { "le" } else { "be" };
    format!("magpie-index/{FORMAT} {}-bit {endian}", usize::BITS)
}

fn meta_name(base: &str) -> String {
    format!("{base}.meta.json")
}

/// All final file names a save under `base` may produce, meta last.
fn all_names(base: &str) -> [String; 5] {
    ["exact.bin", "hnsw.ids", "hnsw.graph", "hnsw.data", "meta.json"].map(|s| format!("{base}.{s}"))
}

fn check_basename(base: &str) -> Result<()> {
    let ok = !base.is_empty() && !base.starts_with('.') && !base.contains(['/', '\\']) && !base.contains(".tmp-");
    if ok {
        Ok(())
    } else {
        Err(Error::Params(format!("invalid index basename `{base}`")))
    }
}

/// A `Write` that hashes and counts what goes through it.
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Temporary files of one save; whatever was not renamed into place is removed on drop.
struct Staged<'a> {
    dir: &'a Path,
    tmp_base: String,
    base: &'a str,
    /// (suffix, sum) in rename order
    files: Vec<(&'static str, Option<FileSum>)>,
    committed: usize,
}

impl<'a> Staged<'a> {
    fn new(dir: &'a Path, base: &'a str) -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp_base = format!("{base}.tmp-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        Self { dir, tmp_base, base, files: Vec::new(), committed: 0 }
    }

    fn tmp_path(&self, suffix: &str) -> PathBuf {
        self.dir.join(format!("{}.{suffix}", self.tmp_base))
    }

    fn final_name(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.base)
    }

    /// Registers a file before it is created, so a failure half-way still cleans it up.
    fn expect(&mut self, suffix: &'static str) -> PathBuf {
        self.files.push((suffix, None));
        self.tmp_path(suffix)
    }

    fn done(&mut self, suffix: &str, bytes: u64, hash: blake3::Hash) {
        let name = self.final_name(suffix);
        let slot = self.files.iter_mut().find(|(s, _)| *s == suffix).expect("registered");
        slot.1 = Some(FileSum { name, bytes, blake3: hash.to_hex().to_string() });
    }

    fn sums(&self) -> Vec<FileSum> {
        self.files.iter().filter_map(|(_, s)| s.clone()).collect()
    }

    /// Writes one of our own files through a hashing, buffered writer, then syncs it.
    fn write(&mut self, suffix: &'static str, body: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<()> {
        let path = self.expect(suffix);
        let io_err = |e| Error::io(&path, e);
        let file = File::create(&path).map_err(io_err)?;
        let mut w = Hashing { inner: BufWriter::with_capacity(1 << 20, file), hasher: blake3::Hasher::new(), bytes: 0 };
        body(&mut w).map_err(io_err)?;
        let file = w.inner.into_inner().map_err(|e| io_err(e.into_error()))?;
        file.sync_all().map_err(io_err)?;
        let (bytes, hash) = (w.bytes, w.hasher.finalize());
        self.done(suffix, bytes, hash);
        Ok(())
    }

    /// Hashes and syncs a file somebody else (hnsw_rs) wrote.
    fn adopt(&mut self, suffix: &'static str) -> Result<()> {
        let path = self.tmp_path(suffix);
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        let (bytes, hash) = hash_reader(file).map_err(|e| Error::io(&path, e))?;
        self.done(suffix, bytes, hash);
        Ok(())
    }

    /// Renames everything into place, meta last, then syncs the directory.
    fn commit(mut self) -> Result<()> {
        for i in 0..self.files.len() {
            let suffix = self.files[i].0;
            let (from, to) = (self.tmp_path(suffix), self.dir.join(self.final_name(suffix)));
            fs::rename(&from, &to).map_err(|e| Error::io(&to, e))?;
            self.committed = i + 1;
        }
        // Durability of the renames; not every platform can open a directory.
        if let Ok(d) = File::open(self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        for (suffix, _) in &self.files[self.committed..] {
            let _ = fs::remove_file(self.tmp_path(suffix));
        }
    }
}

/// Whether process `pid` runs, where the system says (`/proc`); `None` elsewhere. Our own
/// process counts as running: its saves clean up after themselves.
fn process_alive(pid: u32) -> Option<bool> {
    if pid == std::process::id() {
        return Some(true);
    }
    let proc = Path::new("/proc");
    proc.join("self").exists().then(|| proc.join(pid.to_string()).exists())
}

fn hash_reader(mut r: impl Read) -> io::Result<(u64, blake3::Hash)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((bytes, hasher.finalize()))
}

fn write_exact(ix: &ExactIndex, w: &mut dyn Write) -> io::Result<()> {
    let (ids, vectors) = ix.parts();
    w.write_all(EXACT_MAGIC)?;
    w.write_all(&(ix.dim() as u64).to_le_bytes())?;
    w.write_all(&(ids.len() as u64).to_le_bytes())?;
    for id in ids {
        w.write_all(&id.to_le_bytes())?;
    }
    let mut buf = Vec::with_capacity(1 << 16);
    for chunk in vectors.chunks(1 << 14) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
        w.write_all(&buf)?;
    }
    Ok(())
}

fn write_ids(ix: &HnswIndex, w: &mut dyn Write) -> io::Result<()> {
    let (ids, live) = ix.id_table();
    w.write_all(IDS_MAGIC)?;
    w.write_all(&(ids.len() as u64).to_le_bytes())?;
    for id in ids {
        w.write_all(&id.to_le_bytes())?;
    }
    let flags: Vec<u8> = live.iter().map(|&l| l as u8).collect();
    w.write_all(&flags)
}

/// A little-endian reader over a verified byte buffer.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().expect("take(8) gives 8 bytes")))
    }
    fn len(&mut self, each: usize) -> Option<usize> {
        let n = usize::try_from(self.u64()?).ok()?;
        (n.checked_mul(each)? <= self.0.len()).then_some(n)
    }
    fn ids(&mut self, n: usize) -> Option<Vec<ImageId>> {
        Some(self.take(n * 8)?.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("chunks of 8 bytes"))).collect())
    }
}

fn read_exact_file(bytes: &[u8], dim: usize) -> Option<ExactIndex> {
    let mut c = Cursor(bytes);
    if c.take(8)? != EXACT_MAGIC || c.u64()? != dim as u64 {
        return None;
    }
    let n = c.len(8 + 4 * dim)?;
    let ids = c.ids(n)?;
    let vectors: Vec<f32> =
        c.take(n * dim * 4)?.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("chunks of 4 bytes"))).collect();
    let unique = ids.iter().collect::<std::collections::HashSet<_>>().len() == n;
    (c.0.is_empty() && unique).then(|| ExactIndex::from_parts(dim, ids, vectors))
}

fn read_ids_file(bytes: &[u8]) -> Option<(Vec<ImageId>, Vec<bool>)> {
    let mut c = Cursor(bytes);
    if c.take(8)? != IDS_MAGIC {
        return None;
    }
    let n = c.len(9)?;
    let ids = c.ids(n)?;
    let live: Vec<bool> = c.take(n)?.iter().map(|&b| b != 0).collect();
    c.0.is_empty().then_some((ids, live))
}

/// What a save says about itself, read without loading or verifying the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedIndex {
    pub meta: IndexMeta,
    /// Live images.
    pub live: usize,
    /// Dead points still in the saved graph.
    pub tombstones: usize,
}

impl VectorIndex {
    /// The meta file of a save under `basename`, if there is one: cheap (no vector is
    /// read, no checksum verified), for status reports. Whether the index is usable is
    /// for [`load`](Self::load) to say.
    pub fn saved_meta(dir: &Path, basename: &str) -> Result<Option<SavedIndex>> {
        check_basename(basename)?;
        let path = dir.join(meta_name(basename));
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        let mf: MetaFile =
            serde_json::from_slice(&text).map_err(|e| Error::BadMeta { path, message: e.to_string() })?;
        Ok(Some(SavedIndex { meta: mf.meta, live: mf.live, tombstones: mf.points.saturating_sub(mf.live) }))
    }

    /// Writes the index as `dir/<basename>.*` (see the table in the module docs),
    /// atomically replacing a previous save. No temporary file survives, success or not,
    /// and those of earlier saves killed half-way are removed.
    pub fn save(&self, dir: &Path, basename: &str) -> Result<()> {
        check_basename(basename)?;
        Self::remove_stale_temp_files(dir, basename)?;
        let mut staged = Staged::new(dir, basename);
        let points = match &self.inner {
            Inner::Exact(e) => {
                staged.write("exact.bin", |w| write_exact(e, w))?;
                e.len()
            }
            Inner::Hnsw(h) => {
                staged.write("hnsw.ids", |w| write_ids(h, w))?;
                staged.expect("hnsw.graph");
                staged.expect("hnsw.data");
                let tmp_base = staged.tmp_base.clone();
                if h.dump(dir, &tmp_base)? {
                    staged.adopt("hnsw.graph")?;
                    staged.adopt("hnsw.data")?;
                } else {
                    staged.files.retain(|(_, s)| s.is_some());
                }
                h.points()
            }
        };
        let meta = MetaFile { format: format_tag(), meta: self.meta(), live: self.len(), points, files: staged.sums() };
        let json = serde_json::to_vec_pretty(&meta).expect("meta serialises");
        staged.write("meta.json", |w| w.write_all(&json))?;
        let kept: Vec<String> = staged.files.iter().map(|(s, _)| staged.final_name(s)).collect();
        staged.commit()?;
        // Files of another kind (or of a graph since emptied) would only confuse a reader.
        for name in all_names(basename) {
            if !kept.contains(&name) {
                let _ = fs::remove_file(dir.join(name));
            }
        }
        Ok(())
    }

    /// Removes the temporary files (`<basename>.tmp-<pid>-<n>.*`) that saves left behind
    /// when their process was killed half-way: those of processes no longer running (where
    /// the system can tell) and any older than a day. A process that is alive may be
    /// saving right now, so its recent files are left alone. Returns how many were removed.
    pub fn remove_stale_temp_files(dir: &Path, basename: &str) -> Result<usize> {
        check_basename(basename)?;
        let entries = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(Error::io(dir, e)),
        };
        let prefix = format!("{basename}.tmp-");
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else { continue };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
            let old = || {
                entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > std::time::Duration::from_secs(24 * 3600))
            };
            let stale = process_alive(pid) == Some(false) || old();
            if stale {
                match fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(entry.path(), e)),
                }
            }
        }
        Ok(removed)
    }

    /// Reads an index saved by [`save`](Self::save) if it fits `spec` and `generation`:
    /// same model id, dimension and graph parameters (`m`, `ef_construction`), same
    /// generation, intact files. [`Loaded::Missing`] when there is none, [`Loaded::Stale`]
    /// when it is out of date or damaged: both mean "rebuild from SQLite". `Err` is left
    /// for I/O failures other than a missing file (such as a permission error) and for an
    /// invalid `spec`. The loaded index takes `ef_search` and `exact_threshold` from `spec`.
    pub fn load(dir: &Path, basename: &str, spec: &IndexSpec, generation: u64) -> Result<Loaded> {
        spec.validate()?;
        check_basename(basename)?;
        let meta_path = dir.join(meta_name(basename));
        let text = match fs::read(&meta_path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Missing),
            Err(e) => return Err(Error::io(meta_path, e)),
        };
        let corrupt = |path: &Path, reason: String| Ok(Loaded::Stale(StaleReason::Corrupt { path: path.into(), reason }));
        let stale = |r| Ok(Loaded::Stale(r));
        let mf: MetaFile = match serde_json::from_slice(&text) {
            Ok(m) => m,
            Err(e) => return corrupt(&meta_path, e.to_string()),
        };
        let m = &mf.meta;
        if mf.format != format_tag() {
            return stale(StaleReason::Format { expected: format_tag(), found: mf.format });
        }
        if m.model_id != spec.model_id {
            return stale(StaleReason::Model { expected: spec.model_id.clone(), found: m.model_id.clone() });
        }
        if m.dim != spec.dim {
            return stale(StaleReason::Dimension { expected: spec.dim, found: m.dim });
        }
        if m.kind == IndexKind::Hnsw && !m.params.same_graph(&spec.params) {
            return stale(StaleReason::Params { expected: spec.params, found: m.params });
        }
        if m.generation != generation {
            return stale(StaleReason::Generation { expected: generation, found: m.generation });
        }

        // Verify every listed file; keep our own (small enough) files in memory.
        let mut contents: Vec<(String, Option<Vec<u8>>)> = Vec::new();
        for sum in &mf.files {
            let path = dir.join(&sum.name);
            let is_own = sum.name.ends_with(".exact.bin") || sum.name.ends_with(".hnsw.ids");
            let read = if is_own {
                fs::read(&path).map(|b| {
                    let h = blake3::hash(&b);
                    ((b.len() as u64, h), Some(b))
                })
            } else {
                File::open(&path).and_then(hash_reader).map(|s| (s, None))
            };
            let ((bytes, hash), body) = match read {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return stale(StaleReason::MissingFile { path }),
                Err(e) => return Err(Error::io(path, e)),
            };
            if bytes != sum.bytes || hash.to_hex().as_str() != sum.blake3 {
                return corrupt(&path, format!("{bytes} bytes, checksum differs from {}", meta_name(basename)));
            }
            contents.push((sum.name.clone(), body));
        }
        let mut take = |suffix: &str| {
            let name = format!("{basename}.{suffix}");
            contents.iter_mut().find(|(n, _)| *n == name).map(|(_, b)| b.take().unwrap_or_default())
        };

        let inner = match m.kind {
            IndexKind::Exact => {
                let path = dir.join(format!("{basename}.exact.bin"));
                let Some(bytes) = take("exact.bin") else { return stale(StaleReason::MissingFile { path }) };
                match read_exact_file(&bytes, spec.dim) {
                    Some(e) => Inner::Exact(e),
                    None => return corrupt(&path, "malformed exact index".into()),
                }
            }
            IndexKind::Hnsw => {
                let path = dir.join(format!("{basename}.hnsw.ids"));
                let Some(bytes) = take("hnsw.ids") else { return stale(StaleReason::MissingFile { path }) };
                let Some((ids, live)) = read_ids_file(&bytes) else {
                    return corrupt(&path, "malformed id table".into());
                };
                if !ids.is_empty() && (take("hnsw.graph").is_none() || take("hnsw.data").is_none()) {
                    let path = dir.join(format!("{basename}.hnsw.graph"));
                    return stale(StaleReason::MissingFile { path });
                }
                match HnswIndex::restore(dir, basename, spec.dim, spec.params, ids, live) {
                    Ok(h) => Inner::Hnsw(h),
                    Err(Error::Hnsw { path, message }) => return corrupt(&path, message),
                    Err(e) => return Err(e),
                }
            }
        };
        let ix = VectorIndex { spec: spec.clone(), generation, inner };
        if ix.len() != mf.live || (m.kind == IndexKind::Hnsw && ix.tombstones() + ix.len() != mf.points) {
            return corrupt(&meta_path, format!("meta counts {} live, files hold {}", mf.live, ix.len()));
        }
        Ok(Loaded::Ready(ix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_file_formats_roundtrip_and_reject_garbage() {
        let mut e = ExactIndex::new(3);
        e.insert(&[(-5, &[1.0, 2.0, 3.0]), (9, &[0.0, 0.0, 1.0])]).unwrap();
        let mut buf = Vec::new();
        write_exact(&e, &mut buf).unwrap();
        let back = read_exact_file(&buf, 3).unwrap();
        assert_eq!(back.parts(), e.parts());
        assert!(read_exact_file(&buf, 4).is_none());
        assert!(read_exact_file(&buf[..buf.len() - 1], 3).is_none());
        let mut longer = buf.clone();
        longer.push(0);
        assert!(read_exact_file(&longer, 3).is_none());

        let mut bad = Vec::from(&IDS_MAGIC[..]);
        bad.extend(u64::MAX.to_le_bytes());
        assert!(read_ids_file(&bad).is_none(), "a huge count must not allocate or panic");
    }

    #[test]
    fn basenames_that_could_escape_or_collide_are_refused() {
        for bad in ["", "../x", "a/b", ".hidden", "v.tmp-1-2"] {
            assert!(check_basename(bad).is_err(), "{bad}");
        }
        assert!(check_basename("vectors").is_ok());
    }
}
