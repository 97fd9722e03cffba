//! Crash safety, proven by killing: `magpie index` and `magpie reindex` are SIGKILLed at
//! random points (startup, walk, decode, embed, between batch commits, while the vector
//! index is saved, while the caption index commits), the folder changes between kills,
//! and after all that the library must be exactly what a clean run on the final folder
//! makes: every image indexed once with the same embedding, deleted ones retired, SQLite
//! sound, the vector and caption indexes on disk holding exactly SQLite's indexed files,
//! no temporary file left behind, and `magpie status` saying the indexes are up to date.
//!
//! After every kill the library is also checked as the kill left it: whatever index on
//! disk still claims to be current (loads as ready) must agree with SQLite, since the next
//! open would trust it.
//!
//! The phases: [`IMAGES`] images and a clean run to time the work; [`INDEX_KILLS`] kills
//! of `magpie index` (delays drawn from the clean run's timing, some very short, some
//! aimed at the save at the end of the run by watching for its temporary files) with
//! images added, deleted, rewritten and truncated in between; [`REINDEX_KILLS`] kills of
//! `magpie reindex`, each followed by a full check; then kills inside saves on purpose:
//! this test binary re-runs itself as an indexer (`child_indexer`) with an HNSW index
//! saved after every batch, and the parent kills it as soon as a save's temporary files
//! appear, until [`SAVE_KILLS`] kills have landed inside one. Where each kill landed is
//! printed (`cargo test --test crash -- --nocapture`).
//!
//! `MAGPIE_CRASH_SEED=N` replays another sequence (the seed in use is printed).

use magpie_core::ModelInfo;
use magpie_engine::{IndexOptions, Library, LibraryConfig, DB_FILE, TEXT_INDEX, VECTOR_INDEX};
use magpie_index::{IndexParams, IndexSpec, Loaded, TextIndex, TextLoaded, TextStamp, VectorIndex};
use magpie_media::image::{self, imageops, RgbImage};
use magpie_store::{FileRecord, FileStatus, Store};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Images in the folder at the start (each of distinct content).
const IMAGES: usize = 300;
/// Kills of `magpie index`.
const INDEX_KILLS: usize = 36;
/// Kills of `magpie reindex`.
const REINDEX_KILLS: usize = 6;
/// Kills landed inside a vector index save (HNSW, by the child indexer).
const SAVE_KILLS: usize = 6;
/// Embeddings of the same image in two runs agree at least this well.
const MIN_COSINE: f32 = 0.99999;

const CHILD_ENV: &str = "MAGPIE_CRASH_CHILD";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model_dir() -> String {
    root().join("tests/fixtures/clip/tiny-a").display().to_string()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

// ---- the folder -----------------------------------------------------------------------

/// Makes small images of distinct content from the fixture photos: a random crop, size,
/// hue and brightness, and the image's serial number drawn as a row of blocks.
struct Images {
    sources: Vec<RgbImage>,
    rng: StdRng,
    next: u32,
}

impl Images {
    fn new(seed: u64) -> Self {
        let mut sources = Vec::new();
        let mut names: Vec<PathBuf> = std::fs::read_dir(root().join("tests/fixtures/photos"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "png" || x == "jpg"))
            .collect();
        names.sort();
        for p in names {
            let img = image::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            // Big photos are shrunk once: crops of them are all we need.
            sources.push(img.thumbnail(320, 320).to_rgb8());
        }
        Self { sources, rng: StdRng::seed_from_u64(seed), next: 0 }
    }

    fn render(&mut self, serial: u32) -> RgbImage {
        let rng = &mut self.rng;
        let src = &self.sources[rng.gen_range(0..self.sources.len())];
        let (sw, sh) = src.dimensions();
        let side = (sw.min(sh) as f32 * rng.gen_range(0.35..=1.0)) as u32;
        let w = ((side as f32 * rng.gen_range(0.75..1.3)) as u32).clamp(16, sw);
        let h = ((side as f32 * rng.gen_range(0.75..1.3)) as u32).clamp(16, sh);
        let (x, y) = (rng.gen_range(0..=sw - w), rng.gen_range(0..=sh - h));
        let crop = imageops::crop_imm(src, x, y, w, h).to_image();
        let (tw, th) = (rng.gen_range(64..=160), rng.gen_range(64..=160));
        let img = imageops::resize(&crop, tw, th, imageops::FilterType::Triangle);
        let img = imageops::huerotate(&img, rng.gen_range(-180..180));
        let mut img = imageops::brighten(&img, rng.gen_range(-40..40));
        for bit in 0..12 {
            let v = if serial >> bit & 1 == 1 { 255 } else { 0 };
            for yy in 0..5 {
                for xx in bit * 5..bit * 5 + 5 {
                    img.put_pixel(xx, yy, image::Rgb([v, 255 - v, v]));
                }
            }
        }
        img
    }

    /// Writes a new image (new content) at `path`.
    fn write(&mut self, path: &Path) {
        let serial = self.next;
        self.next += 1;
        let img = self.render(serial);
        img.save(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    /// A path for a new file: a name no other file had, so that its path word finds it
    /// alone in the caption index.
    fn new_path(&mut self, dir: &Path) -> PathBuf {
        let ext = if self.rng.gen_bool(0.3) { "jpg" } else { "png" };
        let mut n = self.next;
        loop {
            let p = dir.join(format!("img{n:05}.{ext}"));
            let other = dir.join(format!("img{n:05}.{}", if ext == "jpg" { "png" } else { "jpg" }));
            if !p.exists() && !other.exists() {
                return p;
            }
            n += 1;
        }
    }

    fn add(&mut self, dir: &Path) -> PathBuf {
        let p = self.new_path(dir);
        self.write(&p);
        p
    }
}

fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

fn hash_file(p: &Path) -> String {
    blake3::hash(&std::fs::read(p).unwrap()).to_hex().to_string()
}

// ---- running magpie -------------------------------------------------------------------

fn magpie(data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_magpie"));
    c.arg("--data-dir").arg(data).args(["--model", &model_dir(), "--device", "cpu"]).args(args);
    c.env("HF_HUB_OFFLINE", "1");
    for v in ["MAGPIE_MODEL", "MAGPIE_DATA_DIR", "MAGPIE_DEVICE", "RUST_LOG"] {
        c.env_remove(v);
    }
    c
}

/// Runs to completion; panics with its stderr if it fails.
fn run_ok(mut cmd: Command, what: &str) -> (String, Duration) {
    let start = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed ({}):\n{stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{what} panicked:\n{stderr}");
    (String::from_utf8(out.stdout).unwrap(), took)
}

/// When to kill.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// This long after the start.
    After(Duration),
    /// As soon as a save's temporary files (of the vector index only, or of either index)
    /// show up in the data directory once `after` has passed, plus `extra`.
    OnSave { after: Duration, extra: Duration, vectors_only: bool },
    /// Once SQLite's write-ahead log has changed `writes` times (each commit appends to
    /// it), plus `extra`: between batch commits.
    AfterWrites { writes: usize, extra: Duration },
}

#[derive(Debug)]
struct Run {
    /// `Some` when the process ended on its own before the kill.
    exited: Option<ExitStatus>,
    /// Temporary files of a vector index save seen right after the kill.
    saw_temp: bool,
    /// Temporary files of a caption index write (tantivy's) seen right after the kill.
    saw_text_temp: bool,
    took: Duration,
}

fn is_vector_temp(p: &Path) -> bool {
    name(p).starts_with(&format!("{VECTOR_INDEX}.tmp-"))
}

fn temp_files(data: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for dir in [data.to_path_buf(), data.join(TEXT_INDEX)] {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.contains(".tmp") {
                found.push(e.path());
            }
        }
    }
    found
}

/// Starts `cmd`, kills it (SIGKILL) at `trigger` unless it ended first, and checks that
/// it did not panic or fail on its own.
fn run_and_kill(mut cmd: Command, trigger: Trigger, data: &Path, log: &Path, what: &str) -> Run {
    // Temporary files an earlier kill left are not this run's.
    let earlier: HashSet<PathBuf> = temp_files(data).into_iter().collect();
    let new_temp = || temp_files(data).into_iter().filter(|p| !earlier.contains(p)).collect::<Vec<_>>();
    let start = Instant::now();
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let deadline = start + Duration::from_secs(120);
    match trigger {
        Trigger::After(d) => std::thread::sleep(d),
        Trigger::OnSave { after, extra, vectors_only } => loop {
            if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                break;
            }
            if start.elapsed() >= after && new_temp().iter().any(|p| !vectors_only || is_vector_temp(p)) {
                std::thread::sleep(extra);
                break;
            }
            std::thread::sleep(Duration::from_micros(300));
        },
        Trigger::AfterWrites { writes, extra } => {
            let wal = data.join(format!("{DB_FILE}-wal"));
            let stamp = || std::fs::metadata(&wal).ok().map(|m| (m.len(), m.modified().ok()));
            let (mut last, mut seen) = (stamp(), 0);
            loop {
                if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                    break;
                }
                let now = stamp();
                if now != last {
                    (last, seen) = (now, seen + 1);
                    if seen >= writes {
                        std::thread::sleep(extra);
                        break;
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
    let exited = match child.try_wait().unwrap() {
        Some(status) => Some(status),
        None => {
            child.kill().unwrap();
            child.wait().unwrap();
            None
        }
    };
    let took = start.elapsed();
    let temp = if exited.is_none() { new_temp() } else { Vec::new() };
    let saw_temp = temp.iter().any(|p| is_vector_temp(p));
    let saw_text_temp = temp.iter().any(|p| p.starts_with(data.join(TEXT_INDEX)));
    let stderr = std::fs::read_to_string(log).unwrap_or_default();
    assert!(!stderr.contains("panicked"), "{what} panicked:\n{stderr}");
    if let Some(s) = exited {
        assert!(s.success(), "{what} failed on its own ({s}):\n{stderr}");
    }
    Run { exited, saw_temp, saw_text_temp, took }
}

// ---- what the library holds -------------------------------------------------------------

/// SQLite's view of a library.
struct Snapshot {
    model: Option<ModelInfo>,
    generation: u64,
    text_stamp: TextStamp,
    files: Vec<FileRecord>,
    /// Embeddings of indexed files.
    vectors: HashMap<i64, Vec<f32>>,
    problems: Vec<String>,
}

impl Snapshot {
    fn read(data: &Path) -> Option<Snapshot> {
        if !data.join(DB_FILE).is_file() {
            return None;
        }
        rt().block_on(async {
            let store = Store::open(data.join(DB_FILE)).await.expect("SQLite opens after a kill");
            let info = store.library().await.unwrap();
            let mut files = Vec::new();
            for r in store.roots().await.unwrap() {
                let ids: Vec<i64> = store.files_under_root(r.id).await.unwrap().iter().map(|f| f.id).collect();
                files.extend(store.get_files(&ids).await.unwrap());
            }
            let vectors = match &info.model {
                Some(m) => store.all_embeddings(&m.id).await.unwrap().into_iter().collect(),
                None => HashMap::new(),
            };
            let problems = store.integrity_check().await.unwrap();
            store.close().await;
            Some(Snapshot {
                model: info.model,
                generation: info.generation,
                text_stamp: TextStamp { generation: info.generation, text_generation: info.text_generation },
                files,
                vectors,
                problems,
            })
        })
    }

    fn indexed(&self) -> impl Iterator<Item = &FileRecord> {
        self.files.iter().filter(|f| f.status == FileStatus::Indexed)
    }

    fn by_path(&self) -> HashMap<&Path, Vec<&FileRecord>> {
        let mut m: HashMap<&Path, Vec<&FileRecord>> = HashMap::new();
        for f in &self.files {
            m.entry(f.path.as_path()).or_default().push(f);
        }
        m
    }

    /// Files of `folder` that an index run would (re)embed.
    fn pending(&self, folder: &Path) -> usize {
        let by_path = self.by_path();
        list(folder)
            .iter()
            .filter(|p| {
                let md = std::fs::metadata(p).unwrap();
                let mtime = md.modified().unwrap().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
                !by_path.get(p.as_path()).is_some_and(|rows| {
                    rows.iter().any(|f| {
                        f.size == md.len() && f.mtime_ns == mtime && matches!(f.status, FileStatus::Indexed | FileStatus::Failed)
                    })
                })
            })
            .count()
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// Embeddings of a clean run, by file name and by content hash.
struct Reference {
    by_name: HashMap<String, Vec<f32>>,
    by_hash: HashMap<String, Vec<f32>>,
}

impl Reference {
    fn of(data: &Path) -> Reference {
        let s = Snapshot::read(data).expect("a clean library");
        let mut by_name = HashMap::new();
        let mut by_hash = HashMap::new();
        for f in s.indexed() {
            let v = s.vectors[&f.id].clone();
            by_name.insert(name(&f.path), v.clone());
            by_hash.insert(f.content_hash.clone().unwrap(), v);
        }
        Reference { by_name, by_hash }
    }
}

/// Whether each index on disk would be trusted by the next open.
struct DiskIndexes {
    vector_ready: bool,
    text_ready: bool,
}

/// Checks the indexes on disk against SQLite: an index that loads as current must hold
/// exactly SQLite's indexed files. With `require_ready`, both must load as current.
fn check_disk_indexes(data: &Path, s: &Snapshot, require_ready: bool, problems: &mut Vec<String>) -> DiskIndexes {
    let mut out = DiskIndexes { vector_ready: false, text_ready: false };
    let Some(model) = &s.model else { return out };
    let indexed: HashMap<i64, &FileRecord> = s.indexed().map(|f| (f.id, f)).collect();

    let spec = IndexSpec::for_model(model, IndexParams::default());
    match VectorIndex::load(data, VECTOR_INDEX, &spec, s.generation) {
        Err(e) => problems.push(format!("loading the vector index failed instead of asking for a rebuild: {e}")),
        Ok(Loaded::Ready(ix)) => {
            out.vector_ready = true;
            if ix.len() != indexed.len() {
                problems.push(format!(
                    "vector index at SQLite's generation {} holds {} vectors, SQLite {} indexed files",
                    s.generation,
                    ix.len(),
                    indexed.len()
                ));
            }
            let missing: Vec<i64> = indexed.keys().copied().filter(|id| !ix.contains(*id)).collect();
            if !missing.is_empty() {
                problems.push(format!("vector index lacks indexed files {missing:?}"));
            }
            let ghosts: Vec<i64> = s.files.iter().filter(|f| f.status != FileStatus::Indexed && ix.contains(f.id)).map(|f| f.id).collect();
            if !ghosts.is_empty() {
                problems.push(format!("vector index holds ghosts (files not indexed in SQLite) {ghosts:?}"));
            }
            // Each vector is filed under the right id.
            for (id, v) in &s.vectors {
                if !ix.contains(*id) {
                    continue;
                }
                let hit = ix.search(v, 1, Some(400), None).unwrap();
                if hit.first().map(|h| (h.id, h.score >= 0.9999)) != Some((*id, true)) {
                    problems.push(format!("searching the vector index with file {id}'s embedding finds {hit:?}"));
                }
            }
        }
        Ok(other) if require_ready => problems.push(format!("vector index on disk is not current: {other:?}")),
        Ok(_) => {}
    }

    match TextIndex::load(&data.join(TEXT_INDEX), s.text_stamp) {
        Err(e) => problems.push(format!("loading the caption index failed instead of asking for a rebuild: {e}")),
        Ok(TextLoaded::Ready(ix)) => {
            out.text_ready = true;
            if ix.len() != indexed.len() as u64 {
                problems.push(format!(
                    "caption index at SQLite's stamp {:?} holds {} documents, SQLite {} indexed files",
                    s.text_stamp,
                    ix.len(),
                    indexed.len()
                ));
            }
            // Each indexed file is found, alone, by the word its name was given.
            for f in indexed.values() {
                let word = name(&f.path).split('.').next().unwrap().to_string();
                let hits: Vec<i64> = ix.search(&word, 3).unwrap().iter().map(|h| h.id).collect();
                if hits != [f.id] {
                    problems.push(format!("caption index: `{word}` (file {}) finds {hits:?}", f.id));
                }
            }
        }
        Ok(other) if require_ready => problems.push(format!("caption index on disk is not current: {other:?}")),
        Ok(_) => {}
    }
    out
}

/// The full check of a library after a completed run on `folder`.
fn check_library(data: &Path, folder: &Path, reference: &Reference, by_name: bool, context: &str) {
    let s = Snapshot::read(data).expect("a library");
    let mut problems: Vec<String> = s.problems.iter().map(|p| format!("SQLite integrity: {p}")).collect();
    let by_path = s.by_path();
    let on_disk = list(folder);
    let disk: HashSet<&Path> = on_disk.iter().map(|p| p.as_path()).collect();
    for p in &on_disk {
        let rows = by_path.get(p.as_path()).map(Vec::as_slice).unwrap_or_default();
        match rows {
            [] => problems.push(format!("{}: missing from SQLite", name(p))),
            [f] if f.status != FileStatus::Indexed => {
                problems.push(format!("{}: {:?} ({:?}), not indexed", name(p), f.status, f.error))
            }
            [f] => {
                let hash = hash_file(p);
                if f.content_hash.as_deref() != Some(hash.as_str()) {
                    problems.push(format!("{}: SQLite holds an older content (hash differs)", name(p)));
                }
                match s.vectors.get(&f.id) {
                    None => problems.push(format!("{}: indexed without an embedding", name(p))),
                    Some(v) => {
                        let want = if by_name { reference.by_name.get(&name(p)) } else { reference.by_hash.get(&hash) };
                        match want {
                            None => problems.push(format!("{}: not in the clean run", name(p))),
                            Some(w) if cosine(v, w) < MIN_COSINE => problems.push(format!(
                                "{}: embedding differs from the clean run's (cosine {})",
                                name(p),
                                cosine(v, w)
                            )),
                            Some(_) => {}
                        }
                    }
                }
            }
            more => problems.push(format!("{}: {} rows", name(p), more.len())),
        }
    }
    for f in &s.files {
        if !disk.contains(f.path.as_path()) && f.status != FileStatus::Deleted {
            problems.push(format!("{}: gone from the folder but {:?} in SQLite", name(&f.path), f.status));
        }
    }
    let mut hashes: HashMap<&str, usize> = HashMap::new();
    for f in s.indexed() {
        *hashes.entry(f.content_hash.as_deref().unwrap_or("")).or_default() += 1;
    }
    if let Some((h, n)) = hashes.iter().find(|(_, n)| **n > 1) {
        problems.push(format!("{n} indexed rows hold the same content {h}"));
    }
    let n = s.indexed().count();
    if n != on_disk.len() {
        problems.push(format!("{n} indexed files, {} in the folder", on_disk.len()));
    }

    check_disk_indexes(data, &s, true, &mut problems);

    let temp = temp_files(data);
    if !temp.is_empty() {
        problems.push(format!("temporary files left: {temp:?}"));
    }
    let leaked = leaked_segment_files(data);
    if !leaked.is_empty() {
        problems.push(format!("caption index files no commit refers to: {leaked:?}"));
    }

    let (status, _) = run_ok(magpie(data, &["status", "--json"]), "magpie status");
    let st: serde_json::Value = serde_json::from_str(&status).unwrap();
    if st["index"]["up_to_date"] != true || st["index"]["vectors"] != n {
        problems.push(format!("status: vector index {}", st["index"]));
    }
    if st["text_index"]["up_to_date"] != true || st["text_index"]["documents"] != n {
        problems.push(format!("status: caption index {}", st["text_index"]));
    }
    if st["counts"]["indexed"] != n {
        problems.push(format!("status: counts {}", st["counts"]));
    }
    assert!(problems.is_empty(), "{context}: the library is not what a clean run makes:\n  {}", problems.join("\n  "));
}

/// Files in the caption index folder that belong to no segment of its last commit (what
/// a killed writer leaves until a later commit collects it).
fn leaked_segment_files(data: &Path) -> Vec<String> {
    let dir = data.join(TEXT_INDEX);
    let Ok(meta) = std::fs::read_to_string(dir.join("meta.json")) else { return Vec::new() };
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    let live: HashSet<String> = meta["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["segment_id"].as_str().unwrap().replace('-', ""))
        .collect();
    let mut leaked = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n == "meta.json" || n == ".managed.json" || n.ends_with(".lock") {
            continue;
        }
        let seg = n.split('.').next().unwrap();
        if !live.contains(seg) {
            leaked.push(n);
        }
    }
    leaked
}

/// What SQLite and the disk say about where a kill landed.
fn landed(before: Option<&Snapshot>, after: Option<&Snapshot>, pending: usize, run: &Run, disk: &DiskIndexes) -> &'static str {
    if run.exited.is_some() {
        return "finished before the kill";
    }
    let Some(after) = after else { return "startup (no database yet)" };
    let committed = |s: Option<&Snapshot>| -> HashSet<(i64, Option<String>)> {
        s.map(|s| s.indexed().map(|f| (f.id, f.indexed_at.clone())).collect()).unwrap_or_default()
    };
    let (old, new) = (committed(before), committed(Some(after)));
    let fresh = new.difference(&old).count();
    let retired = |s: Option<&Snapshot>| s.map(|s| s.files.iter().filter(|f| f.status != FileStatus::Indexed).count()).unwrap_or(0);
    if run.saw_temp && fresh == 0 {
        "inside the save of a vector index rebuilt at open"
    } else if run.saw_temp {
        "inside the vector index save after the commits"
    } else if run.saw_text_temp {
        "inside a caption index write (tantivy's atomic write)"
    } else if fresh == 0 && retired(Some(after)) == retired(before) {
        if pending == 0 { "a run with nothing to do" } else { "startup, walk or first decode/embed (nothing written)" }
    } else if fresh == 0 {
        "after the walk's removals, before the first commit"
    } else if fresh < pending {
        "between batch commits"
    } else if !disk.vector_ready {
        "after the last commit, before the vector index save"
    } else if !disk.text_ready {
        "after the vector index save, before the caption commit"
    } else {
        "after both indexes were saved"
    }
}

/// Checks a library as a kill left it; returns where the kill landed.
fn after_kill(data: &Path, before: Option<&Snapshot>, pending: usize, run: &Run, context: &str) -> (&'static str, Option<Snapshot>) {
    let after = Snapshot::read(data);
    let mut problems = Vec::new();
    let mut disk = DiskIndexes { vector_ready: false, text_ready: false };
    if let Some(s) = &after {
        problems.extend(s.problems.iter().map(|p| format!("SQLite integrity: {p}")));
        disk = check_disk_indexes(data, s, false, &mut problems);
    }
    assert!(problems.is_empty(), "{context}: after the kill ({run:?}):\n  {}", problems.join("\n  "));
    (landed(before, after.as_ref(), pending, run, &disk), after)
}

// ---- the test -------------------------------------------------------------------------

#[test]
fn killed_runs_leave_a_library_a_rerun_completes() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let seed: u64 = std::env::var("MAGPIE_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261128);
    eprintln!("crash harness: seed {seed} (MAGPIE_CRASH_SEED to replay)");
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().canonicalize().unwrap();
    let folder = base.join("photos");
    std::fs::create_dir(&folder).unwrap();
    let mut images = Images::new(seed);
    for _ in 0..IMAGES {
        images.add(&folder);
    }
    let folder_arg = folder.to_str().unwrap().to_string();
    let index_args = ["index", folder_arg.as_str(), "--json"];
    eprintln!("{IMAGES} images written in {:.1} s", started.elapsed().as_secs_f64());

    // A clean run times the work; a second, with nothing to do, the fixed cost.
    let clean0 = base.join("clean0");
    let (_, full) = run_ok(magpie(&clean0, &index_args), "clean index run");
    let (_, idle) = run_ok(magpie(&clean0, &index_args), "index run with nothing to do");
    let per_image = full.saturating_sub(idle).as_secs_f64() / IMAGES as f64;
    eprintln!("clean run {:.2} s, idle run {:.2} s", full.as_secs_f64(), idle.as_secs_f64());
    assert_eq!(Snapshot::read(&clean0).unwrap().indexed().count(), IMAGES);

    // ---- kills of `magpie index`, the folder changing in between ----
    let data = base.join("data");
    let log = base.join("run.log");
    let mut points: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut broken: Vec<PathBuf> = Vec::new();
    let mut before: Option<Snapshot> = None;
    for i in 0..INDEX_KILLS {
        if i > 0 && rng.gen_bool(0.75) {
            change_folder(&folder, &mut images, &mut rng, &mut broken);
        }
        let pending = before.as_ref().map(|s| s.pending(&folder)).unwrap_or_else(|| list(&folder).len());
        let expected = idle.as_secs_f64() + per_image * pending as f64;
        let trigger = match rng.gen_range(0..12) {
            0 => Trigger::After(Duration::from_millis(rng.gen_range(0..40))),
            // Around the end of the walk, where removals are written.
            1 => Trigger::After(Duration::from_secs_f64(rng.gen_range(0.6..1.4) * idle.as_secs_f64())),
            2 | 3 => Trigger::OnSave {
                after: Duration::from_secs_f64(rng.gen_range(0.0..expected)),
                extra: Duration::from_micros(rng.gen_range(0..3000)),
                vectors_only: rng.gen_bool(0.5),
            },
            4..=6 => Trigger::AfterWrites {
                // The first change is the log's creation at open.
                writes: rng.gen_range(2..=pending / 16 + 2),
                extra: Duration::from_micros(rng.gen_range(0..30_000)),
            },
            // Past the fixed cost (covered above), into the work. A run after a kill
            // first rebuilds what the kill left stale: a little more than `idle`.
            _ => Trigger::After(Duration::from_secs_f64(rng.gen_range(idle.as_secs_f64()..1.3 * expected + 0.1))),
        };
        let what = format!("index kill {i} ({trigger:?}, {pending} to do)");
        let run = run_and_kill(magpie(&data, &index_args), trigger, &data, &log, &what);
        let (point, after) = after_kill(&data, before.as_ref(), pending, &run, &what);
        eprintln!("{what}: {point} after {:.2} s", run.took.as_secs_f64());
        *points.entry(point).or_default() += 1;
        before = after;
    }
    // Broken files are mended (a failed file is not what this test is about at the end).
    for p in broken.drain(..) {
        images.write(&p);
    }
    run_ok(magpie(&data, &index_args), "the index run after the kills");

    // The reference: a clean run on the final folder.
    let clean = base.join("clean");
    run_ok(magpie(&clean, &index_args), "clean run on the final folder");
    let reference = Reference::of(&clean);
    check_library(&data, &folder, &reference, true, "after the index kills");
    eprintln!("index kills: {points:#?}");
    assert!(points.get("between batch commits").copied().unwrap_or(0) > 0, "no kill landed between batch commits: {points:?}");

    // ---- kills of `magpie reindex` ----
    let (_, reindex) = run_ok(magpie(&data, &["reindex", "--json"]), "reindex");
    let mut reindex_points: BTreeMap<&'static str, usize> = BTreeMap::new();
    for i in 0..REINDEX_KILLS {
        let trigger = if i % 2 == 1 {
            Trigger::OnSave { after: Duration::ZERO, extra: Duration::from_micros(rng.gen_range(0..2000)), vectors_only: i % 4 == 1 }
        } else {
            Trigger::After(Duration::from_secs_f64(rng.gen_range(0.0..1.2 * reindex.as_secs_f64())))
        };
        let what = format!("reindex kill {i} ({trigger:?})");
        let before = Snapshot::read(&data);
        let marks = || {
            let modified = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            (modified(data.join(TEXT_INDEX).join("meta.json")), modified(data.join(format!("{VECTOR_INDEX}.meta.json"))))
        };
        let (text0, vectors0) = marks();
        let run = run_and_kill(magpie(&data, &["reindex", "--json"]), trigger, &data, &log, &what);
        after_kill(&data, before.as_ref(), 0, &run, &what);
        let (text1, vectors1) = marks();
        let point = if run.exited.is_some() {
            "finished before the kill"
        } else if run.saw_temp {
            "inside the vector index save"
        } else if run.saw_text_temp {
            "inside the caption index rebuild"
        } else if vectors1 != vectors0 {
            "after the vector index save"
        } else if text1 != text0 {
            "after the caption index rebuild, before the vector index save"
        } else {
            "startup, model load, open or purge (no index rewritten)"
        };
        eprintln!("{what}: {point} after {:.2} s", run.took.as_secs_f64());
        *reindex_points.entry(point).or_default() += 1;
        // The next open recovers; every other time that open is a search, which only reads.
        if i % 2 == 0 {
            run_ok(magpie(&data, &index_args), "index run after a reindex kill");
        } else {
            run_ok(magpie(&data, &["search", "a cat", "--json"]), "search after a reindex kill");
        }
        check_library(&data, &folder, &reference, true, &what);
    }
    eprintln!("reindex kills: {reindex_points:#?}");

    // ---- kills inside saves: the child indexer saves an HNSW index after every batch ----
    let hnsw_folder = base.join("photos2");
    std::fs::create_dir(&hnsw_folder).unwrap();
    for p in list(&folder) {
        std::fs::copy(&p, hnsw_folder.join(p.file_name().unwrap())).unwrap();
    }
    let hdata = base.join("hnsw");
    let mut in_save = 0;
    let mut attempts = 0;
    let mut before: Option<Snapshot> = None;
    while in_save < SAVE_KILLS {
        attempts += 1;
        assert!(attempts <= 6 * SAVE_KILLS, "only {in_save} of {attempts} kills landed inside a save");
        if before.as_ref().is_some_and(|s| s.pending(&hnsw_folder) < 24) {
            // Renamed files are new files to embed (and old ones to retire): more saves.
            for p in list(&hnsw_folder).choose_multiple(&mut rng, 24) {
                let to = images.new_path(&hnsw_folder);
                let to = to.with_extension(p.extension().unwrap());
                std::fs::rename(p, to).unwrap();
            }
        }
        let pending = before.as_ref().map(|s| s.pending(&hnsw_folder)).unwrap_or_else(|| list(&hnsw_folder).len());
        // Past the save of the index rebuilt at open, into the saves after each batch.
        let expected = idle.as_secs_f64() + 1.5 * per_image * pending as f64;
        let trigger = Trigger::OnSave {
            after: Duration::from_secs_f64(rng.gen_range(0.5 * idle.as_secs_f64()..expected)),
            extra: Duration::from_micros(rng.gen_range(0..1500)),
            vectors_only: true,
        };
        let what = format!("child indexer kill {attempts} ({trigger:?}, {pending} to do)");
        let run = run_and_kill(child(&hdata, &hnsw_folder), trigger, &hdata, &log, &what);
        let (point, after) = after_kill(&hdata, before.as_ref(), pending, &run, &what);
        eprintln!("{what}: {point} after {:.2} s", run.took.as_secs_f64());
        in_save += usize::from(run.saw_temp);
        before = after;
    }
    run_ok(child(&hdata, &hnsw_folder), "child indexer after the kills");
    check_library(&hdata, &hnsw_folder, &reference, false, "after the kills inside saves");
    let saved = VectorIndex::saved_meta(&hdata, VECTOR_INDEX).unwrap().unwrap();
    assert_eq!(saved.meta.kind, magpie_index::IndexKind::Hnsw);

    eprintln!("crash harness: done in {:.1} s", started.elapsed().as_secs_f64());
}

/// Between kills: a few new images, one deleted, one rewritten with new content, and
/// sometimes one broken (truncated) or a block of them rewritten (more work to kill).
fn change_folder(folder: &Path, images: &mut Images, rng: &mut StdRng, broken: &mut Vec<PathBuf>) {
    for _ in 0..rng.gen_range(1..=4) {
        images.add(folder);
    }
    let files: Vec<PathBuf> = list(folder).into_iter().filter(|p| !broken.contains(p)).collect();
    let mut pick = files.choose_multiple(rng, 3);
    let gone = pick.next().unwrap();
    std::fs::remove_file(gone).unwrap();
    images.write(pick.next().unwrap());
    if rng.gen_bool(0.25) {
        let p = pick.next().unwrap().clone();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
        broken.push(p);
    } else if rng.gen_bool(0.3) && !broken.is_empty() {
        let p = broken.remove(0);
        images.write(&p);
    }
    if rng.gen_bool(0.4) {
        let files: Vec<PathBuf> = list(folder).into_iter().filter(|p| !broken.contains(p)).collect();
        for p in files.choose_multiple(rng, 60) {
            images.write(p);
        }
    }
}

// ---- the child indexer ----------------------------------------------------------------

/// This test binary, run as the child indexer on `data` and `folder`.
fn child(data: &Path, folder: &Path) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["child_indexer", "--exact", "--nocapture", "--test-threads", "1"]);
    c.env(CHILD_ENV, format!("{}\n{}", data.display(), folder.display()));
    c.env("HF_HUB_OFFLINE", "1");
    c
}

/// The child indexer: what `magpie index` does, with an HNSW index (whatever the size)
/// saved after every batch of 4, so that saves fill much of a run. Does nothing unless
/// started by the test above.
#[test]
fn child_indexer() {
    let Ok(arg) = std::env::var(CHILD_ENV) else { return };
    let (data, folder) = arg.split_once('\n').unwrap();
    rt().block_on(async {
        // In the precision `magpie index` uses by default, so that its embeddings equal the
        // clean run's.
        let precision = magpie_models::ClipPrecision::Auto;
        let clip = std::sync::Arc::new(magpie_models::Clip::load_with(&model_dir(), magpie_core::Device::Cpu, precision).unwrap());
        let config = LibraryConfig { index: IndexParams { exact_threshold: 0, ..Default::default() } };
        let lib = Library::open(Path::new(data), clip.info(), config).await.unwrap();
        let opts = IndexOptions { batch_size: 4, save_every: Duration::ZERO, ..Default::default() };
        let embedder: std::sync::Arc<dyn magpie_core::ImageEmbedder> = clip.clone();
        lib.index(&[PathBuf::from(folder)], embedder, &opts, &|_| {}).await.unwrap();
    });
}
