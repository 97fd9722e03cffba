//! Saving beside the database and reloading only what still matches.

mod common;

use common::{items, Clustered};
use magpie_index::{Error, IndexKind, IndexParams, IndexSpec, Loaded, StaleReason, VectorIndex};
use std::fs;
use std::path::Path;

const DIM: usize = 48;
const BASE: &str = "vectors";

fn spec(threshold: usize) -> IndexSpec {
    IndexSpec::new("clip-test", DIM, IndexParams { exact_threshold: threshold, ..Default::default() })
}

/// An index of `kind` with removals and a supersede, at generation 3.
fn built(kind: IndexKind, gen: &mut Clustered) -> VectorIndex {
    let threshold = if kind == IndexKind::Hnsw { 0 } else { usize::MAX };
    let mut ix = VectorIndex::new(spec(threshold)).unwrap();
    let data = gen.points(2000);
    ix.insert(&items(&data)).unwrap();
    for id in (0..2000).step_by(7) {
        ix.remove(id);
    }
    ix.insert(&[(1, data[1999].as_slice())]).unwrap();
    ix.set_generation(3);
    assert_eq!(ix.kind(), kind);
    ix
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

fn load(dir: &Path, spec: &IndexSpec, generation: u64) -> Loaded {
    VectorIndex::load(dir, BASE, spec, generation).unwrap()
}

fn stale(dir: &Path, spec: &IndexSpec, generation: u64) -> StaleReason {
    match load(dir, spec, generation) {
        Loaded::Stale(r) => r,
        other => panic!("expected stale, got {other:?}"),
    }
}

#[test]
fn roundtrip_gives_the_same_results_for_both_kinds() {
    let mut gen = Clustered::embeddings(10, DIM, 15);
    for kind in [IndexKind::Hnsw, IndexKind::Exact] {
        let ix = built(kind, &mut gen);
        let dir = tempfile::tempdir().unwrap();
        ix.save(dir.path(), BASE).unwrap();
        let back = load(dir.path(), ix.spec(), 3).ready().expect("ready");
        assert_eq!(back.kind(), kind);
        assert_eq!(back.meta(), ix.meta());
        assert_eq!((back.len(), back.tombstones()), (ix.len(), ix.tombstones()));
        assert!(!back.contains(0) && !back.contains(7) && back.contains(1));
        let keep = |id: i64| id % 5 != 0;
        for q in gen.points(30) {
            assert_eq!(back.search(&q, 10, None, None).unwrap(), ix.search(&q, 10, None, None).unwrap(), "{kind:?}");
            assert_eq!(back.search(&q, 10, None, Some(&keep)).unwrap(), ix.search(&q, 10, None, Some(&keep)).unwrap());
        }
        // The reloaded index keeps working: inserts, supersedes and removals.
        let mut back = back;
        let fresh = gen.point();
        back.insert(&[(5000, fresh.as_slice()), (2, fresh.as_slice())]).unwrap();
        back.remove(3);
        let ids: Vec<i64> = back.search(&fresh, 2, None, None).unwrap().iter().map(|h| h.id).collect();
        assert!(ids.contains(&5000) && ids.contains(&2), "{kind:?}: {ids:?}");
        assert!(!back.contains(3));
    }
}

#[test]
fn save_leaves_exactly_the_index_files_and_replaces_the_previous_save() {
    let mut gen = Clustered::embeddings(11, DIM, 15);
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("library.db"), b"not ours").unwrap();
    let hnsw = built(IndexKind::Hnsw, &mut gen);
    hnsw.save(dir.path(), BASE).unwrap();
    let hnsw_files = ["library.db", "vectors.hnsw.data", "vectors.hnsw.graph", "vectors.hnsw.ids", "vectors.meta.json"];
    assert_eq!(listing(dir.path()), hnsw_files);
    hnsw.save(dir.path(), BASE).unwrap();
    assert_eq!(listing(dir.path()), hnsw_files);
    let saved = VectorIndex::saved_meta(dir.path(), BASE).unwrap().expect("saved");
    assert_eq!(saved.meta, hnsw.meta());
    assert_eq!((saved.live, saved.tombstones), (hnsw.len(), hnsw.tombstones()));
    assert!(VectorIndex::saved_meta(dir.path(), "other").unwrap().is_none());
    let meta: serde_json::Value = serde_json::from_slice(&fs::read(dir.path().join("vectors.meta.json")).unwrap()).unwrap();
    assert_eq!(meta["kind"], "hnsw");
    assert_eq!(meta["generation"], 3);
    assert_eq!(meta["model_id"], "clip-test");
    assert_eq!(meta["params"]["m"], 16);

    // Saving an exact index under the same name replaces the graph files.
    let exact = built(IndexKind::Exact, &mut gen);
    exact.save(dir.path(), BASE).unwrap();
    assert_eq!(listing(dir.path()), ["library.db", "vectors.exact.bin", "vectors.meta.json"]);
    assert_eq!(load(dir.path(), exact.spec(), 3).ready().unwrap().kind(), IndexKind::Exact);
}

#[test]
fn failed_saves_leave_no_temporary_files() {
    let mut gen = Clustered::embeddings(12, DIM, 15);
    let ix = built(IndexKind::Hnsw, &mut gen);
    let dir = tempfile::tempdir().unwrap();

    // A directory that does not exist: an error naming the path.
    let missing = dir.path().join("nope");
    let err = ix.save(&missing, BASE).unwrap_err();
    assert!(matches!(&err, Error::Io { path, .. } if path.starts_with(&missing)), "{err:?}");

    // The final meta name is taken by a directory: every file is written, the last
    // rename fails, and the temporaries of all the others must be gone.
    fs::create_dir(dir.path().join("vectors.meta.json")).unwrap();
    fs::write(dir.path().join("vectors.meta.json").join("x"), b"x").unwrap();
    let err = ix.save(dir.path(), BASE).unwrap_err();
    assert!(err.to_string().contains("vectors.meta.json"), "{err}");
    assert!(listing(dir.path()).iter().all(|n| !n.contains(".tmp-")), "{:?}", listing(dir.path()));
}

#[test]
#[cfg(target_os = "linux")]
fn temporary_files_of_a_killed_save_go_once_their_process_is_gone() {
    let mut gen = Clustered::embeddings(12, DIM, 15);
    let ix = built(IndexKind::Hnsw, &mut gen);
    let dir = tempfile::tempdir().unwrap();
    ix.save(dir.path(), BASE).unwrap();
    let saved = listing(dir.path());

    // What a save SIGKILLed half-way leaves (no pid gets this high on Linux) ...
    let dead = ["vectors.tmp-2147483000-0.hnsw.ids", "vectors.tmp-2147483000-0.hnsw.graph"];
    for name in dead {
        fs::write(dir.path().join(name), b"partial").unwrap();
    }
    // ... beside a save running now in a live process (this one), and another basename's.
    let live = format!("vectors.tmp-{}-999.hnsw.data", std::process::id());
    let other = "other.tmp-2147483000-0.meta.json";
    fs::write(dir.path().join(&live), b"partial").unwrap();
    fs::write(dir.path().join(other), b"partial").unwrap();

    assert!(load(dir.path(), ix.spec(), 3).ready().is_some(), "leftovers do not spoil a load");
    assert_eq!(VectorIndex::remove_stale_temp_files(dir.path(), BASE).unwrap(), 2);
    let mut want = saved.clone();
    want.extend([live.clone(), other.to_string()]);
    want.sort();
    assert_eq!(listing(dir.path()), want);

    // The next save removes them too.
    for name in dead {
        fs::write(dir.path().join(name), b"partial").unwrap();
    }
    ix.save(dir.path(), BASE).unwrap();
    assert_eq!(listing(dir.path()), want);
    assert_eq!(VectorIndex::remove_stale_temp_files(&dir.path().join("nope"), BASE).unwrap(), 0);
}

#[test]
fn missing_files_are_reported_as_missing_or_stale() {
    let mut gen = Clustered::embeddings(13, DIM, 15);
    let ix = built(IndexKind::Hnsw, &mut gen);
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(load(dir.path(), ix.spec(), 3), Loaded::Missing));
    assert!(matches!(load(&dir.path().join("absent"), ix.spec(), 3), Loaded::Missing));

    ix.save(dir.path(), BASE).unwrap();
    fs::remove_file(dir.path().join("vectors.hnsw.data")).unwrap();
    match stale(dir.path(), ix.spec(), 3) {
        StaleReason::MissingFile { path } => assert!(path.ends_with("vectors.hnsw.data")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn damaged_files_are_stale_not_a_panic() {
    let mut gen = Clustered::embeddings(14, DIM, 15);
    let ix = built(IndexKind::Hnsw, &mut gen);
    let dir = tempfile::tempdir().unwrap();
    ix.save(dir.path(), BASE).unwrap();
    let data = dir.path().join("vectors.hnsw.data");
    let original = fs::read(&data).unwrap();

    // Truncated (hnsw_rs would exit the process on this one).
    fs::write(&data, &original[..original.len() / 2]).unwrap();
    assert!(matches!(stale(dir.path(), ix.spec(), 3), StaleReason::Corrupt { path, .. } if path == data));
    // Same length, one byte flipped.
    let mut flipped = original.clone();
    flipped[original.len() / 3] ^= 0x40;
    fs::write(&data, &flipped).unwrap();
    assert!(matches!(stale(dir.path(), ix.spec(), 3), StaleReason::Corrupt { .. }));
    fs::write(&data, &original).unwrap();
    assert!(load(dir.path(), ix.spec(), 3).ready().is_some());

    // Garbage meta.
    let meta = dir.path().join("vectors.meta.json");
    fs::write(&meta, b"{ not json").unwrap();
    assert!(matches!(stale(dir.path(), ix.spec(), 3), StaleReason::Corrupt { path, .. } if path == meta));
    assert!(matches!(VectorIndex::saved_meta(dir.path(), BASE), Err(Error::BadMeta { path, .. }) if path == meta));
}

#[test]
fn meta_mismatches_are_stale_with_the_reason() {
    let mut gen = Clustered::embeddings(15, DIM, 15);
    let ix = built(IndexKind::Hnsw, &mut gen);
    let dir = tempfile::tempdir().unwrap();
    ix.save(dir.path(), BASE).unwrap();
    let s = ix.spec().clone();

    let other_model = IndexSpec { model_id: "other/model".into(), ..s.clone() };
    assert!(matches!(stale(dir.path(), &other_model, 3), StaleReason::Model { found, .. } if found == "clip-test"));
    let other_dim = IndexSpec { dim: 512, ..s.clone() };
    assert_eq!(stale(dir.path(), &other_dim, 3), StaleReason::Dimension { expected: 512, found: DIM });
    let other_m = IndexSpec { params: IndexParams { m: 32, ..s.params }, ..s.clone() };
    assert!(matches!(stale(dir.path(), &other_m, 3), StaleReason::Params { .. }));
    let other_efc = IndexSpec { params: IndexParams { ef_construction: 100, ..s.params }, ..s.clone() };
    let reason = stale(dir.path(), &other_efc, 3);
    assert!(reason.to_string().contains("ef_construction=200"), "{reason}");
    assert_eq!(stale(dir.path(), &s, 4), StaleReason::Generation { expected: 4, found: 3 });

    // Query-time settings are not part of the identity: they come from the caller.
    let other_ef = IndexSpec { params: IndexParams { ef_search: 200, exact_threshold: 10, ..s.params }, ..s.clone() };
    let back = load(dir.path(), &other_ef, 3).ready().expect("ef_search alone does not make it stale");
    assert_eq!(back.spec().params.ef_search, 200);
}

#[test]
fn empty_indexes_roundtrip() {
    for threshold in [0, usize::MAX] {
        let dir = tempfile::tempdir().unwrap();
        let ix = VectorIndex::new(spec(threshold)).unwrap();
        ix.save(dir.path(), BASE).unwrap();
        let back = load(dir.path(), ix.spec(), 0).ready().expect("ready");
        assert_eq!((back.kind(), back.len()), (ix.kind(), 0));
        assert!(back.search(&[1.0; DIM], 5, None, None).unwrap().is_empty());
    }
    // A graph whose every point was removed still has points to dump.
    let dir = tempfile::tempdir().unwrap();
    let mut ix = VectorIndex::new(spec(0)).unwrap();
    ix.insert(&[(1, &[1.0; DIM][..])]).unwrap();
    ix.remove(1);
    ix.save(dir.path(), BASE).unwrap();
    let back = load(dir.path(), ix.spec(), 0).ready().unwrap();
    assert_eq!((back.len(), back.tombstones()), (0, 1));
    assert!(back.search(&[1.0; DIM], 5, None, None).unwrap().is_empty());
}

#[test]
fn bad_basenames_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ix = VectorIndex::new(spec(usize::MAX)).unwrap();
    assert!(matches!(ix.save(dir.path(), "../escape"), Err(Error::Params(_))));
    assert!(matches!(VectorIndex::load(dir.path(), "", ix.spec(), 0), Err(Error::Params(_))));
}
