//! Live folders: `Library::watch` follows file-system events, indexing only the paths
//! that changed; moved files keep their captions and conversations; with events
//! unavailable it falls back to periodic rescans.

mod common;

use common::*;
use image::ImageFormat;
use magpie_engine::{Library, WatchEvent, WatchOptions};
use magpie_store::FileStatus;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Waits (up to 15 s) until `check` holds.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

async fn status_of(lib: &Library, path: &Path) -> Option<FileStatus> {
    lib.store().file_by_path(path).await.unwrap().map(|f| f.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_indexes_changes_without_rewalking() {
    let photos = photos();
    let root = photos.root.clone();
    let data = data_dir();
    let lib = Arc::new(open(data.path()).await);
    let fake = FakeEmbedder::new();
    index(&lib, &root, &fake).await;
    let red = lib.store().file_by_path(&root.join("red.png")).await.unwrap().unwrap();
    lib.store().set_caption(red.id, "test/captioner", "a red square").await.unwrap();
    let conv = lib.store().create_conversation(red.id, "test/chat").await.unwrap();

    let events: Arc<Mutex<Vec<WatchEvent>>> = Default::default();
    let cancel = Arc::new(AtomicBool::new(false));
    let task = {
        let (lib, fake, events, cancel, root) = (lib.clone(), fake.clone(), events.clone(), cancel.clone(), root.clone());
        tokio::spawn(async move {
            let wopts = WatchOptions { debounce: Duration::from_millis(200), ..Default::default() };
            lib.watch(&[root], fake.image(), &opts(), &wopts, &|e| events.lock().unwrap().push(e.clone()), cancel).await
        })
    };
    eventually("watching", || async { events.lock().unwrap().iter().any(|e| matches!(e, WatchEvent::Watching { .. })) }).await;

    // A new file.
    write_image(&root.join("new-green.png"), &solid(20, 20, colour_named("green").unwrap()), ImageFormat::Png);
    eventually("new file indexed", || async { status_of(&lib, &root.join("new-green.png")).await == Some(FileStatus::Indexed) }).await;
    // A changed file: re-embedded under the same id.
    let blue = lib.store().file_by_path(&root.join("blue.png")).await.unwrap().unwrap();
    write_image(&root.join("blue.png"), &solid(30, 40, colour_named("yellow").unwrap()), ImageFormat::Png);
    eventually("changed file re-embedded", || async {
        let f = lib.store().file_by_path(&root.join("blue.png")).await.unwrap().unwrap();
        f.content_hash != blue.content_hash && f.status == FileStatus::Indexed
    })
    .await;
    assert_eq!(lib.store().file_by_path(&root.join("blue.png")).await.unwrap().unwrap().id, blue.id);
    // A deleted file: retired.
    std::fs::remove_file(root.join("cyan.bmp")).unwrap();
    eventually("deleted file retired", || async { status_of(&lib, &root.join("cyan.bmp")).await == Some(FileStatus::Deleted) }).await;
    // A move: the file at its new path has the caption and the conversation.
    std::fs::create_dir(root.join("moved")).unwrap();
    std::fs::rename(root.join("red.png"), root.join("moved/red.png")).unwrap();
    eventually("moved file indexed", || async { status_of(&lib, &root.join("moved/red.png")).await == Some(FileStatus::Indexed) }).await;
    eventually("old path retired", || async { status_of(&lib, &root.join("red.png")).await == Some(FileStatus::Deleted) }).await;
    let moved = lib.store().file_by_path(&root.join("moved/red.png")).await.unwrap().unwrap();
    eventually("caption follows", || async { lib.store().caption(moved.id).await.unwrap().is_some() }).await;
    assert_eq!(lib.store().caption(moved.id).await.unwrap().unwrap().text, "a red square");
    assert_eq!(lib.store().conversation(conv.id).await.unwrap().unwrap().file_id, moved.id);
    // The caption index follows too.
    eventually("caption searchable at the new path", || async {
        lib.search_captions("square", 5).await.map(|h| h.iter().any(|h| h.id == moved.id)).unwrap_or(false)
    })
    .await;
    // A folder moved in from outside the root: walked.
    let outside = photos.dir.path().join("incoming");
    write_image(&outside.join("a.png"), &solid(10, 10, [1, 2, 3]), ImageFormat::Png);
    write_image(&outside.join("b.png"), &solid(10, 10, [200, 2, 3]), ImageFormat::Png);
    std::fs::rename(&outside, root.join("incoming")).unwrap();
    eventually("moved-in folder indexed", || async {
        status_of(&lib, &root.join("incoming/a.png")).await == Some(FileStatus::Indexed)
            && status_of(&lib, &root.join("incoming/b.png")).await == Some(FileStatus::Indexed)
    })
    .await;
    // And a folder moved away: everything under it retired.
    std::fs::rename(root.join("incoming"), photos.dir.path().join("gone")).unwrap();
    eventually("moved-away folder retired", || async {
        status_of(&lib, &root.join("incoming/a.png")).await == Some(FileStatus::Deleted)
            && status_of(&lib, &root.join("incoming/b.png")).await == Some(FileStatus::Deleted)
    })
    .await;

    cancel.store(true, std::sync::atomic::Ordering::SeqCst);
    task.await.unwrap().unwrap();
    // No burst walked the tree: each scanned only what its events named.
    let total = PHOTO_NAMES.len() as u64 + 3;
    for e in events.lock().unwrap().iter() {
        if let WatchEvent::Indexed { rescan, report, .. } = e {
            assert!(!rescan, "no rescan was needed");
            assert!(report.scanned < total, "a burst scanned {} files: {report:?}", report.scanned);
        }
    }
    // The vector index agrees with SQLite.
    let counts = lib.store().counts().await.unwrap();
    assert_eq!(lib.indexed_vectors() as u64, counts.indexed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_events_it_rescans_periodically() {
    let photos = photos();
    let root = photos.root.clone();
    let data = data_dir();
    let lib = Arc::new(open(data.path()).await);
    let fake = FakeEmbedder::new();
    index(&lib, &root, &fake).await;
    let events: Arc<Mutex<Vec<WatchEvent>>> = Default::default();
    let cancel = Arc::new(AtomicBool::new(false));
    let task = {
        let (lib, fake, events, cancel, root) = (lib.clone(), fake.clone(), events.clone(), cancel.clone(), root.clone());
        tokio::spawn(async move {
            let wopts = WatchOptions { rescan_every: Duration::from_millis(300), poll_only: true, ..Default::default() };
            lib.watch(&[root], fake.image(), &opts(), &wopts, &|e| events.lock().unwrap().push(e.clone()), cancel).await
        })
    };
    eventually("polling announced", || async {
        events.lock().unwrap().iter().any(|e| matches!(e, WatchEvent::Polling { reason, .. } if reason.contains("periodic")))
    })
    .await;
    write_image(&root.join("late.png"), &solid(12, 12, [9, 9, 9]), ImageFormat::Png);
    eventually("found by a rescan", || async { status_of(&lib, &root.join("late.png")).await == Some(FileStatus::Indexed) }).await;
    cancel.store(true, std::sync::atomic::Ordering::SeqCst);
    task.await.unwrap().unwrap();
    assert!(events.lock().unwrap().iter().any(|e| matches!(e, WatchEvent::Indexed { rescan: true, .. })));
}
