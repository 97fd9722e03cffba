use magpie_core::{Embedding, ModelInfo};
use magpie_store::{Error, Exif, FileStatus, ImageMeta, NewFile, Store};
use sqlx::Connection;
use std::path::{Path, PathBuf};

const DIM: usize = 8;

fn model() -> ModelInfo {
    ModelInfo {
        id: "test/clip-tiny".into(),
        dim: DIM,
    }
}

fn vector(seed: u32, dim: usize) -> Vec<f32> {
    (0..dim)
        .map(|i| ((seed as f32) * 0.37 + i as f32 * 1.1).sin() + 0.01)
        .collect()
}

fn embedding(model: &ModelInfo, seed: u32) -> Embedding {
    Embedding::normalized(&model.id, vector(seed, model.dim)).unwrap()
}

fn new_file(root_id: i64, path: impl Into<PathBuf>, seed: u32) -> NewFile {
    NewFile {
        root_id,
        path: path.into(),
        size: 1000 + seed as u64,
        mtime_ns: 1_700_000_000_000_000_000 + seed as i64,
        content_hash: format!("{seed:064x}"),
        meta: ImageMeta {
            width: 640 + seed,
            height: 480,
            format: "jpeg".into(),
            exif: Exif {
                taken_at: Some("2021-06-01T14:03:22".into()),
                camera_make: Some("Canon".into()),
                camera_model: Some("EOS 5D".into()),
                orientation: Some(6),
                gps_lat: Some(48.8584),
                gps_lon: Some(-2.2945),
            },
        },
        embedding: embedding(&model(), seed),
    }
}

/// An in-memory store with the test model and one root.
async fn fresh() -> (Store, i64) {
    let store = Store::open_in_memory().await.unwrap();
    store.ensure_model(&model()).await.unwrap();
    let root = store.add_root(Path::new("/photos")).await.unwrap();
    (store, root.id)
}

async fn raw_connection(db: &Path) -> sqlx::SqliteConnection {
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(db);
    sqlx::SqliteConnection::connect_with(&opts).await.unwrap()
}

#[tokio::test]
async fn open_creates_dirs_runs_migrations_and_uses_wal() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nested/data/magpie.db");
    let store = Store::open(&db).await.unwrap();
    assert!(db.exists());
    assert_eq!(store.path(), db);
    let lib = store.library().await.unwrap();
    assert_eq!(lib.model, None);
    assert_eq!(lib.generation, 0);
    assert!(
        lib.created_at.starts_with("20"),
        "created_at = {}",
        lib.created_at
    );

    // A second, independent connection sees the persistent WAL mode and the schema.
    let mut conn = raw_connection(&db).await;
    let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let tables: Vec<(String,)> =
        sqlx::query_as("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let tables: Vec<String> = tables.into_iter().map(|(t,)| t).collect();
    for t in [
        "library",
        "roots",
        "files",
        "embeddings",
        "failures",
        "_sqlx_migrations",
    ] {
        assert!(
            tables.contains(&t.to_string()),
            "missing table {t} in {tables:?}"
        );
    }
    let (applied,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(applied >= 1);
    conn.close().await.unwrap();
    store.close().await;

    // Reopening runs migrations again as a no-op and keeps the data.
    let store = Store::open(&db).await.unwrap();
    assert_eq!(store.library().await.unwrap().generation, 0);
    assert!(store.integrity_check().await.unwrap().is_empty());
}

#[tokio::test]
async fn foreign_keys_are_enforced() {
    let (store, _root) = fresh().await;
    let err = store
        .commit_batch(&[new_file(9999, "/nowhere/a.jpg", 1)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Db { .. }), "{err:?}");
    assert!(err.to_string().contains("FOREIGN KEY"), "{err}");
}

#[tokio::test]
async fn commit_batch_roundtrip() {
    let (store, root) = fresh().await;
    let files = vec![
        new_file(root, "/photos/a.jpg", 1),
        new_file(root, "/photos/b.jpg", 2),
    ];
    let committed = store.commit_batch(&files).await.unwrap();
    assert_eq!(committed.ids.len(), 2);
    assert_ne!(committed.ids[0], committed.ids[1]);
    assert_eq!(committed.generation, 1);
    assert_eq!(store.generation().await.unwrap(), 1);

    let a = store.get_file(committed.ids[0]).await.unwrap().unwrap();
    assert_eq!(a.path, Path::new("/photos/a.jpg"));
    assert_eq!(a.root_id, root);
    assert_eq!(a.size, 1001);
    assert_eq!(a.mtime_ns, 1_700_000_000_000_000_001);
    assert_eq!(
        a.content_hash.as_deref(),
        Some(format!("{:064x}", 1).as_str())
    );
    assert_eq!(a.meta.as_ref(), Some(&files[0].meta));
    assert_eq!(a.status, FileStatus::Indexed);
    assert_eq!(a.error, None);
    assert!(a.indexed_at.is_some());

    let b = store
        .file_by_path(Path::new("/photos/b.jpg"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.id, committed.ids[1]);
    assert!(store
        .file_by_path(Path::new("/photos/c.jpg"))
        .await
        .unwrap()
        .is_none());

    // The embedding comes back bit for bit.
    let e = store.embedding(a.id, &model().id).await.unwrap().unwrap();
    assert_eq!(e.to_le_bytes(), files[0].embedding.to_le_bytes());
    assert_eq!(e.model(), model().id);
    assert!(store
        .embedding(a.id, "other-model")
        .await
        .unwrap()
        .is_none());

    // Batch lookup keeps the caller's order and skips unknown ids.
    let got = store.get_files(&[b.id, 424242, a.id]).await.unwrap();
    assert_eq!(
        got.iter().map(|f| f.id).collect::<Vec<_>>(),
        vec![b.id, a.id]
    );

    let under = store.files_under_root(root).await.unwrap();
    assert_eq!(under.len(), 2);
    assert_eq!(under[0].path, Path::new("/photos/a.jpg"));
    assert_eq!(
        (under[0].size, under[0].mtime_ns, under[0].status),
        (1001, a.mtime_ns, FileStatus::Indexed)
    );

    let all = store.all_embeddings(&model().id).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].0, b.id);
    assert_eq!(all[1].1, files[1].embedding.vector());

    let dupes = store.files_by_hash(&format!("{:064x}", 2)).await.unwrap();
    assert_eq!(dupes.iter().map(|f| f.id).collect::<Vec<_>>(), vec![b.id]);
    assert!(store.integrity_check().await.unwrap().is_empty());
}

#[tokio::test]
async fn rerun_updates_instead_of_duplicating() {
    let (store, root) = fresh().await;
    let first = store
        .commit_batch(&[new_file(root, "/photos/a.jpg", 1)])
        .await
        .unwrap();
    let mut changed = new_file(root, "/photos/a.jpg", 7);
    changed.meta.exif = Exif::default();
    let second = store.commit_batch(&[changed.clone()]).await.unwrap();
    assert_eq!(first.ids, second.ids);
    assert_eq!(second.generation, first.generation + 1);

    let counts = store.counts().await.unwrap();
    assert_eq!(counts.indexed, 1);
    assert_eq!(store.files_under_root(root).await.unwrap().len(), 1);
    let f = store.get_file(first.ids[0]).await.unwrap().unwrap();
    assert_eq!(f.size, changed.size);
    assert_eq!(f.meta.unwrap().exif, Exif::default());
    let e = store.embedding(f.id, &model().id).await.unwrap().unwrap();
    assert_eq!(e, changed.embedding);
    assert_eq!(store.all_embeddings(&model().id).await.unwrap().len(), 1);
}

#[tokio::test]
async fn model_mismatch_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("magpie.db");
    let store = Store::open(&db).await.unwrap();
    store.ensure_model(&model()).await.unwrap();
    store.ensure_model(&model()).await.unwrap(); // same model: fine
    store.close().await;

    let store = Store::open(&db).await.unwrap();
    assert_eq!(store.model().await.unwrap(), Some(model()));
    let other = ModelInfo {
        id: "openai/clip-vit-large-patch14".into(),
        dim: 768,
    };
    let err = store.ensure_model(&other).await.unwrap_err();
    assert!(matches!(err, Error::ModelMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("not `openai/clip-vit-large-patch14` (dimension 768)"),
        "{msg}"
    );
    assert!(msg.contains("--data-dir"), "{msg}");
    assert!(msg.contains("test/clip-tiny"), "{msg}");
    assert!(msg.contains(&db.display().to_string()), "{msg}");

    // Same id, different dimension: also a mismatch.
    let resized = ModelInfo {
        id: model().id,
        dim: DIM * 2,
    };
    assert!(matches!(
        store.ensure_model(&resized).await,
        Err(Error::ModelMismatch { .. })
    ));
    // The stored model is untouched.
    assert_eq!(store.model().await.unwrap(), Some(model()));

    // An embedding from another model is refused at commit time.
    let root = store.add_root(Path::new("/photos")).await.unwrap();
    let mut f = new_file(root.id, "/photos/a.jpg", 1);
    f.embedding = Embedding::normalized(&other.id, vector(1, DIM)).unwrap();
    let err = store.commit_batch(&[f]).await.unwrap_err();
    assert!(matches!(err, Error::Embedding { .. }), "{err:?}");
    assert!(err.to_string().contains("/photos/a.jpg"), "{err}");
}

#[tokio::test]
async fn commit_without_model_fails() {
    let store = Store::open_in_memory().await.unwrap();
    let root = store.add_root(Path::new("/photos")).await.unwrap();
    let err = store
        .commit_batch(&[new_file(root.id, "/photos/a.jpg", 1)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoModel { .. }), "{err:?}");
    assert_eq!(store.counts().await.unwrap().indexed, 0);
}

#[tokio::test]
async fn half_failed_batch_commits_nothing() {
    let (store, root) = fresh().await;
    let mut bad = new_file(root, "/photos/c.jpg", 3);
    bad.embedding = Embedding::normalized(&model().id, vector(3, DIM + 1)).unwrap();
    let batch = vec![
        new_file(root, "/photos/a.jpg", 1),
        new_file(root, "/photos/b.jpg", 2),
        bad,
    ];
    let err = store.commit_batch(&batch).await.unwrap_err();
    match &err {
        Error::Embedding {
            path,
            source: magpie_core::Error::Dimension { expected, got, .. },
        } => {
            assert_eq!(path, Path::new("/photos/c.jpg"));
            assert_eq!((*expected, *got), (DIM, DIM + 1));
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert_eq!(store.counts().await.unwrap(), Default::default());
    assert!(store
        .file_by_path(Path::new("/photos/a.jpg"))
        .await
        .unwrap()
        .is_none());
    assert!(store.all_embeddings(&model().id).await.unwrap().is_empty());
    assert_eq!(store.generation().await.unwrap(), 0);

    // The connection is usable afterwards and the good part commits on its own.
    let ok = store.commit_batch(&batch[..2]).await.unwrap();
    assert_eq!(ok.ids.len(), 2);
    assert_eq!(store.counts().await.unwrap().indexed, 2);
}

#[tokio::test]
async fn tombstones_are_excluded_then_purged() {
    let (store, root) = fresh().await;
    let batch: Vec<_> = (1..=3)
        .map(|i| new_file(root, format!("/photos/{i}.jpg"), i))
        .collect();
    let ids = store.commit_batch(&batch).await.unwrap().ids;
    let generation = store.generation().await.unwrap();

    assert_eq!(store.mark_deleted(&[ids[1]]).await.unwrap(), 1);
    assert_eq!(
        store.mark_deleted(&[ids[1], 987654]).await.unwrap(),
        0,
        "already a tombstone"
    );
    let counts = store.counts().await.unwrap();
    assert_eq!((counts.indexed, counts.deleted, counts.live()), (2, 1, 2));
    let live: Vec<_> = store
        .all_embeddings(&model().id)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(live, vec![ids[0], ids[2]]);
    assert_eq!(
        store.get_file(ids[1]).await.unwrap().unwrap().status,
        FileStatus::Deleted
    );
    assert_eq!(
        store.generation().await.unwrap(),
        generation + 1,
        "removing an indexed file bumps the generation (once; a repeat is no change)"
    );

    assert_eq!(store.purge_deleted().await.unwrap(), 1);
    assert!(store.get_file(ids[1]).await.unwrap().is_none());
    assert!(store
        .embedding(ids[1], &model().id)
        .await
        .unwrap()
        .is_none());
    assert_eq!(store.counts().await.unwrap().deleted, 0);

    // Purge the highest id too: ids are never handed out again.
    store.mark_deleted(&[ids[2]]).await.unwrap();
    store.purge_deleted().await.unwrap();
    let next = store
        .commit_batch(&[new_file(root, "/photos/4.jpg", 4)])
        .await
        .unwrap()
        .ids[0];
    assert!(next > ids[2], "id {next} reused (max was {})", ids[2]);
    assert!(store.integrity_check().await.unwrap().is_empty());
}

#[tokio::test]
async fn removals_of_indexed_files_make_saved_indexes_stale() {
    // A derived index saved before a removal must not load as current after it: a kill
    // between the removal and the next index save would otherwise leave the removed
    // file in the index for good.
    let (store, root) = fresh().await;
    let ids = store
        .commit_batch(&[new_file(root, "/photos/a.jpg", 1), new_file(root, "/photos/b.jpg", 2)])
        .await
        .unwrap()
        .ids;
    let g = store.generation().await.unwrap();

    // A new file that fails was in no index: no change.
    store
        .record_failure(root, Path::new("/photos/new.jpg"), 1, 1, "truncated")
        .await
        .unwrap();
    assert_eq!(store.generation().await.unwrap(), g);
    // ... nor when it fails again, or is deleted.
    let new_id = store
        .record_failure(root, Path::new("/photos/new.jpg"), 2, 2, "truncated")
        .await
        .unwrap();
    assert_eq!(store.mark_deleted(&[new_id]).await.unwrap(), 1);
    assert_eq!(store.generation().await.unwrap(), g);

    // An indexed file that turns bad leaves the indexes.
    store
        .record_failure(root, Path::new("/photos/a.jpg"), 3, 3, "truncated")
        .await
        .unwrap();
    assert_eq!(store.generation().await.unwrap(), g + 1);
    // An indexed file deleted too (with an unknown id and a tombstone beside it).
    assert_eq!(store.mark_deleted(&[ids[1], 987654, new_id]).await.unwrap(), 1);
    assert_eq!(store.generation().await.unwrap(), g + 2);
    // Purging tombstones no index holds changes nothing an index holds.
    store.purge_deleted().await.unwrap();
    assert_eq!(store.generation().await.unwrap(), g + 2);
}

#[tokio::test]
async fn failure_is_recorded_then_cleared_by_success() {
    let (store, root) = fresh().await;
    let path = Path::new("/photos/broken.jpg");
    let id = store
        .record_failure(root, path, 77, 123, "truncated JPEG")
        .await
        .unwrap();

    let f = store.get_file(id).await.unwrap().unwrap();
    assert_eq!(f.status, FileStatus::Failed);
    assert_eq!(f.error.as_deref(), Some("truncated JPEG"));
    assert_eq!(f.meta, None);
    let state = &store.files_under_root(root).await.unwrap()[0];
    assert_eq!(
        (state.id, state.size, state.mtime_ns, state.status),
        (id, 77, 123, FileStatus::Failed)
    );
    assert_eq!(store.counts().await.unwrap().failed, 1);
    let log = store.failures().await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(
        (
            log[0].file_id,
            log[0].path.as_path(),
            log[0].reason.as_str()
        ),
        (Some(id), path, "truncated JPEG")
    );

    // The file was fixed: a successful commit reuses the row and clears the error.
    let committed = store
        .commit_batch(&[new_file(root, path, 5)])
        .await
        .unwrap();
    assert_eq!(committed.ids, vec![id]);
    let f = store.get_file(id).await.unwrap().unwrap();
    assert_eq!((f.status, f.error), (FileStatus::Indexed, None));
    let counts = store.counts().await.unwrap();
    assert_eq!((counts.failed, counts.indexed), (0, 1));
    assert_eq!(
        store.failures().await.unwrap().len(),
        1,
        "the log keeps history"
    );

    // And breaking again drops the now-stale embedding and metadata.
    store
        .record_failure(root, path, 78, 124, "not an image")
        .await
        .unwrap();
    assert!(store.embedding(id, &model().id).await.unwrap().is_none());
    assert!(store.all_embeddings(&model().id).await.unwrap().is_empty());
    let f = store.get_file(id).await.unwrap().unwrap();
    assert_eq!(
        (f.status, f.content_hash, f.meta),
        (FileStatus::Failed, None, None)
    );
    assert_eq!(store.failures().await.unwrap().len(), 2);

    store
        .log_failure(Path::new("/photos/locked"), "permission denied")
        .await
        .unwrap();
    let log = store.failures().await.unwrap();
    assert_eq!(
        (log[2].file_id, log[2].reason.as_str()),
        (None, "permission denied")
    );
    assert_eq!(
        store.counts().await.unwrap().failed,
        1,
        "a log entry is not a file"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn non_utf8_paths_roundtrip() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let (store, root) = fresh().await;
    // Two names that differ only in bytes the lossy text rendering maps to U+FFFD.
    let p1 = Path::new(OsStr::from_bytes(b"/photos/caf\xe9.jpg"));
    let p2 = Path::new(OsStr::from_bytes(b"/photos/caf\xff.jpg"));
    assert_eq!(p1.to_string_lossy(), p2.to_string_lossy());
    let ids = store
        .commit_batch(&[new_file(root, p1, 1), new_file(root, p2, 2)])
        .await
        .unwrap()
        .ids;
    assert_ne!(ids[0], ids[1], "distinct byte paths are distinct files");

    let f1 = store.file_by_path(p1).await.unwrap().unwrap();
    assert_eq!(f1.id, ids[0]);
    assert_eq!(f1.path.as_os_str().as_bytes(), b"/photos/caf\xe9.jpg");
    let f2 = store.get_file(ids[1]).await.unwrap().unwrap();
    assert_eq!(f2.path.as_os_str().as_bytes(), b"/photos/caf\xff.jpg");
    let under = store.files_under_root(root).await.unwrap();
    assert_eq!(under[0].path, p1);
    assert_eq!(under[1].path, p2);

    let weird_root = Path::new(OsStr::from_bytes(b"/mnt/\xfe\xfd"));
    let r = store.add_root(weird_root).await.unwrap();
    assert_eq!(
        store.add_root(weird_root).await.unwrap().id,
        r.id,
        "add_root is idempotent"
    );
    assert_eq!(store.roots().await.unwrap()[1].path, weird_root);

    store
        .record_failure(
            root,
            Path::new(OsStr::from_bytes(b"/photos/\x80.png")),
            1,
            1,
            "bad",
        )
        .await
        .unwrap();
    assert_eq!(
        store.failures().await.unwrap()[0]
            .path
            .as_os_str()
            .as_bytes(),
        b"/photos/\x80.png"
    );
}

#[tokio::test]
async fn replace_model_resets_to_pending() {
    let (store, root) = fresh().await;
    let ids = store
        .commit_batch(&[new_file(root, "/photos/a.jpg", 1)])
        .await
        .unwrap()
        .ids;
    let before = store.generation().await.unwrap();

    let large = ModelInfo {
        id: "large".into(),
        dim: 16,
    };
    let generation = store.replace_model(&large).await.unwrap();
    assert_eq!(generation, before + 1);
    assert_eq!(store.model().await.unwrap(), Some(large.clone()));
    store.ensure_model(&large).await.unwrap();
    assert_eq!(
        store.get_file(ids[0]).await.unwrap().unwrap().status,
        FileStatus::Pending
    );
    assert_eq!(store.counts().await.unwrap().pending, 1);
    assert!(store
        .embedding(ids[0], &model().id)
        .await
        .unwrap()
        .is_none());
    assert!(store.integrity_check().await.unwrap().is_empty());

    let mut f = new_file(root, "/photos/a.jpg", 1);
    f.embedding = Embedding::normalized("large", vector(1, 16)).unwrap();
    assert_eq!(store.commit_batch(&[f]).await.unwrap().ids, ids);
    assert_eq!(store.counts().await.unwrap().indexed, 1);
    assert_eq!(store.all_embeddings("large").await.unwrap()[0].1.len(), 16);
}

#[tokio::test]
async fn integrity_check_reports_missing_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("magpie.db");
    let store = Store::open(&db).await.unwrap();
    store.ensure_model(&model()).await.unwrap();
    let root = store.add_root(Path::new("/photos")).await.unwrap();
    let id = store
        .commit_batch(&[new_file(root.id, "/photos/a.jpg", 1)])
        .await
        .unwrap()
        .ids[0];
    assert!(store.integrity_check().await.unwrap().is_empty());

    let mut conn = raw_connection(&db).await;
    sqlx::query("DELETE FROM embeddings")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let problems = store.integrity_check().await.unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains(&format!("ids {id}")), "{problems:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_do_not_fail() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("magpie.db")).await.unwrap();
    store.ensure_model(&model()).await.unwrap();
    let root = store.add_root(Path::new("/photos")).await.unwrap().id;
    let mut tasks = Vec::new();
    for t in 0..4u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for b in 0..10u32 {
                let batch: Vec<_> = (0..5u32)
                    .map(|i| {
                        new_file(
                            root,
                            format!("/photos/{t}/{b}/{i}.jpg"),
                            t * 100 + b * 10 + i,
                        )
                    })
                    .collect();
                store.commit_batch(&batch).await.unwrap();
                store.counts().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.counts().await.unwrap().indexed, 200);
    assert_eq!(store.generation().await.unwrap(), 40);
}

#[tokio::test]
async fn all_embeddings_at_library_scale() {
    // 50,000 × 512 floats (~100 MB), read back across many pages.
    const N: usize = 50_000;
    let clip = ModelInfo {
        id: "openai/clip-vit-base-patch32".into(),
        dim: 512,
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("magpie.db")).await.unwrap();
    store.ensure_model(&clip).await.unwrap();
    let root = store.add_root(Path::new("/photos")).await.unwrap().id;
    let base = embedding(&clip, 0).into_vector();
    for chunk in (0..N).collect::<Vec<_>>().chunks(2_500) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|&i| {
                let mut v = base.clone();
                v[i % 512] += 1.0 + i as f32 / N as f32; // distinct, checkable
                let mut f = new_file(root, format!("/photos/{i}.jpg"), 0);
                f.embedding = Embedding::normalized(&clip.id, v).unwrap();
                f
            })
            .collect();
        store.commit_batch(&batch).await.unwrap();
    }
    let all = store.all_embeddings(&clip.id).await.unwrap();
    assert_eq!(all.len(), N);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "ascending ids");
    assert!(all.iter().all(|(_, v)| v.len() == 512));
    let last = store
        .embedding(all[N - 1].0, &clip.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last.vector(), all[N - 1].1.as_slice());
}
