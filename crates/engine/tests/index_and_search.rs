//! Indexing a folder and searching it, with a fake embedder (no weights).

mod common;

use common::*;
use image::ImageFormat;
use magpie_core::ModelInfo;
use magpie_engine::{Error, IndexOptions, Library};
use magpie_store::FileStatus;
use std::collections::HashSet;
use std::time::Duration;

#[tokio::test]
async fn indexes_a_folder_and_finds_the_nearest_image() {
    let photos = photos();
    std::fs::write(photos.path("notes.txt"), "not an image, and not named like one").unwrap();
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();

    let report = index(&lib, &photos.root, &fake).await;
    let n = PHOTO_NAMES.len() as u64;
    assert_eq!(report.added, n, "{report:?}");
    assert_eq!((report.updated, report.unchanged, report.deleted), (0, 0, 0));
    assert_eq!(report.scanned, n + 1);
    assert_eq!(report.ignored, 1, "notes.txt is skipped silently");
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(fake.embedded(), n as usize);
    assert!(fake.max_batch.load(std::sync::atomic::Ordering::SeqCst) <= 3);
    assert_eq!(lib.indexed_vectors(), n as usize);

    // Text search: each colour word finds its image first.
    for (word, file) in [
        ("red", "red.png"),
        ("green", "green.jpg"),
        ("blue", "blue.png"),
        ("yellow", "sub/yellow.jpg"),
        ("magenta", "magenta.gif"),
        ("cyan", "cyan.bmp"),
    ] {
        let hits = lib.search_text(fake.as_ref(), word, 3).await.unwrap();
        assert_eq!(hits.len(), 3, "k respected for {word}");
        assert_eq!(
            names(&hits, &photos.root)[0],
            file,
            "query {word}: {:?}",
            names(&hits, &photos.root)
        );
        assert!(
            hits[0].score > 0.99,
            "{word}: a flat image scores ~1, got {}",
            hits[0].score
        );
        assert_descending(&hits);
    }

    // Vector search, all results: each image exactly once, best first.
    let hits = lib
        .search_vector(&colour_vector(colour_named("red").unwrap()), 100, None)
        .await
        .unwrap();
    assert_eq!(hits.len(), n as usize);
    let got = names(&hits, &photos.root);
    assert_eq!(&got[..2], ["red.png", "dark-red.png"]);
    assert_descending(&hits);
    let unique: HashSet<_> = hits.iter().map(|h| h.id).collect();
    assert_eq!(unique.len(), hits.len());
    assert!(!got.iter().any(|n| n.contains("notes")));

    // Metadata: a PNG named .gif is indexed by content; sizes are the originals'.
    let magenta = hits.iter().find(|h| h.path.ends_with("magenta.gif")).unwrap();
    assert_eq!(magenta.format.as_deref(), Some("png"));
    assert_eq!((magenta.width, magenta.height), (Some(20), Some(20)));
    let green = hits.iter().find(|h| h.path.ends_with("green.jpg")).unwrap();
    assert_eq!(green.format.as_deref(), Some("jpeg"));
    assert_eq!((green.width, green.height), (Some(64), Some(48)));

    // k = 0, k = 1, a query of the wrong dimension, an unknown word.
    assert!(lib
        .search_vector(&colour_vector([1, 2, 3]), 0, None)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(lib.search_text(fake.as_ref(), "blue", 1).await.unwrap().len(), 1);
    assert!(matches!(
        lib.search_vector(&[1.0; 3], 5, None).await,
        Err(Error::Model(_))
    ));
    assert!(lib.search_text(fake.as_ref(), "chartreuse", 5).await.is_err());
}

#[tokio::test]
async fn a_rerun_embeds_nothing() {
    let photos = photos();
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    let first = index(&lib, &photos.root, &fake).await;
    let before = fake.embedded();
    let calls = fake.calls.load(std::sync::atomic::Ordering::SeqCst);

    let (again, progress) = index_recording(&lib, &photos.root, &fake, &opts(), None).await;
    assert_eq!(fake.embedded(), before, "nothing re-embedded");
    assert_eq!(
        fake.calls.load(std::sync::atomic::Ordering::SeqCst),
        calls,
        "model not even called"
    );
    assert_eq!(again.unchanged, first.added);
    assert_eq!((again.added, again.updated, again.deleted), (0, 0, 0));
    assert!(again.failed.is_empty());
    assert_eq!(progress.last().map(|p| (p.total, p.done)), Some((0, 0)));
    let generation = lib.store().generation().await.unwrap();

    // Indexing the same folder under another spelling of its path changes nothing.
    let dotted = photos.root.join("sub").join("..");
    let third = lib.index(&[dotted], fake.image(), &opts(), &|_| {}).await.unwrap();
    assert_eq!(third.unchanged, first.added);
    assert_eq!(fake.embedded(), before);
    assert_eq!(lib.store().generation().await.unwrap(), generation);
    assert_eq!(lib.store().roots().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_modified_file_is_re_embedded_under_the_same_id() {
    let photos = photos();
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    index(&lib, &photos.root, &fake).await;
    let red = photos.path("red.png");
    let id = id_of(&lib, &red).await;
    let before = fake.embedded();

    // New content, new size, new mtime.
    write_image(&red, &solid(70, 10, colour_named("white").unwrap()), ImageFormat::Png);
    let report = index(&lib, &photos.root, &fake).await;
    assert_eq!(report.updated, 1, "{report:?}");
    assert_eq!(report.added, 0);
    assert_eq!(report.unchanged, PHOTO_NAMES.len() as u64 - 1);
    assert_eq!(fake.embedded(), before + 1);
    assert_eq!(id_of(&lib, &red).await, id, "the id is kept");
    assert_eq!(lib.indexed_vectors(), PHOTO_NAMES.len(), "superseded, not added");

    let hits = lib.search_text(fake.as_ref(), "white", 2).await.unwrap();
    assert_eq!(hits[0].id, id);
    assert_eq!((hits[0].width, hits[0].height), (Some(70), Some(10)));
    assert!(hits[0].score > 0.99);
    // The old red vector is gone: red.png is no longer the best red.
    let hits = lib.search_text(fake.as_ref(), "red", 1).await.unwrap();
    assert_eq!(names(&hits, &photos.root), ["dark-red.png"]);

    // Same size, new content (BMP: the size depends only on the dimensions), new mtime.
    let cyan = photos.path("cyan.bmp");
    let cyan_id = id_of(&lib, &cyan).await;
    let size = std::fs::metadata(&cyan).unwrap().len();
    write_image(&cyan, &solid(16, 12, colour_named("yellow").unwrap()), ImageFormat::Bmp);
    assert_eq!(std::fs::metadata(&cyan).unwrap().len(), size);
    let report = index(&lib, &photos.root, &fake).await;
    assert_eq!(report.updated, 1, "{report:?}");
    assert_eq!(id_of(&lib, &cyan).await, cyan_id);
    let hits = lib.search_text(fake.as_ref(), "cyan", 1).await.unwrap();
    assert_ne!(hits[0].id, cyan_id);
}

#[tokio::test]
async fn a_deleted_file_becomes_a_tombstone() {
    let photos = photos();
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    index(&lib, &photos.root, &fake).await;
    let n = PHOTO_NAMES.len() as u64;
    let blue = photos.path("blue.png");
    let blue_id = id_of(&lib, &blue).await;
    std::fs::remove_file(&blue).unwrap();

    let report = index(&lib, &photos.root, &fake).await;
    assert_eq!(report.deleted, 1, "{report:?}");
    assert_eq!(report.unchanged, n - 1);
    let record = lib.store().get_file(blue_id).await.unwrap().unwrap();
    assert_eq!(record.status, FileStatus::Deleted);
    assert_eq!(lib.indexed_vectors(), n as usize - 1);
    let all = lib.search_text(fake.as_ref(), "blue", 100).await.unwrap();
    assert_eq!(all.len(), n as usize - 1);
    assert!(all.iter().all(|h| h.id != blue_id));
    assert!(matches!(lib.similar_to_id(blue_id, 5).await, Err(Error::UnknownId(id)) if id == blue_id));

    let status = Library::status(data.path(), Default::default()).await.unwrap().unwrap();
    assert_eq!(status.counts.indexed, n - 1);
    assert_eq!(status.counts.deleted, 1);
    assert!(status.index.as_ref().unwrap().up_to_date);
    assert_eq!(
        status.index.as_ref().unwrap().vectors,
        n - 1,
        "the saved index dropped the tombstone"
    );

    // A second run does not count it again.
    let report = index(&lib, &photos.root, &fake).await;
    assert_eq!(report.deleted, 0);

    // Still filtered after a reopen.
    drop(lib);
    let lib = open(data.path()).await;
    let all = lib.search_text(fake.as_ref(), "blue", 100).await.unwrap();
    assert!(all.iter().all(|h| h.id != blue_id));

    // It comes back: indexed again, same row.
    write_image(&blue, &solid(30, 40, colour_named("blue").unwrap()), ImageFormat::Png);
    let report = index(&lib, &photos.root, &fake).await;
    assert_eq!(report.added, 1, "{report:?}");
    let hits = lib.search_text(fake.as_ref(), "blue", 1).await.unwrap();
    assert_eq!(hits[0].id, blue_id);

    // Deleted again, then purged by a rebuild.
    std::fs::remove_file(&blue).unwrap();
    assert_eq!(index(&lib, &photos.root, &fake).await.deleted, 1);
    assert_eq!(lib.rebuild_index().await.unwrap(), n as usize - 1);
    assert_eq!(lib.store().counts().await.unwrap().deleted, 0);
    assert!(lib.store().get_file(blue_id).await.unwrap().is_none());
    assert_eq!(lib.indexed_vectors(), n as usize - 1);
}

#[tokio::test]
async fn hostile_files_are_recorded_and_skipped() {
    let photos = photos();
    let root = &photos.root;
    let good_jpeg = encode(&solid(64, 64, [10, 120, 240]), ImageFormat::Jpeg);
    std::fs::write(root.join("truncated.jpg"), &good_jpeg[..good_jpeg.len() / 2]).unwrap();
    std::fs::write(root.join("letter.jpg"), "Dear Sir, this is not a photograph.").unwrap();
    std::fs::write(root.join("empty.png"), b"").unwrap();
    std::fs::write(root.join("notes.txt"), "shopping: milk").unwrap();
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    let n = PHOTO_NAMES.len() as u64;

    let (report, progress) = index_recording(&lib, root, &fake, &opts(), None).await;
    assert_eq!(report.added, n, "good files all indexed: {report:?}");
    assert_eq!(report.ignored, 1);
    assert_eq!(report.failed.len(), 3, "{:?}", report.failed);
    let reason = |name: &str| -> String {
        report
            .failed
            .iter()
            .find(|(p, _)| p == &root.join(name))
            .unwrap_or_else(|| panic!("{name} not reported: {:?}", report.failed))
            .1
            .clone()
    };
    assert!(
        reason("truncated.jpg").contains("truncated"),
        "{}",
        reason("truncated.jpg")
    );
    assert!(
        reason("letter.jpg").contains("not an image"),
        "{}",
        reason("letter.jpg")
    );
    assert!(reason("empty.png").contains("empty"), "{}", reason("empty.png"));
    for (path, why) in &report.failed {
        assert!(
            !why.contains(&*path.to_string_lossy()),
            "the reason does not repeat the path: {why}"
        );
    }
    let last = progress.last().unwrap();
    assert_eq!((last.total, last.done, last.failed), (n + 4, n + 4, 3));

    let counts = lib.store().counts().await.unwrap();
    assert_eq!((counts.indexed, counts.failed), (n, 3));
    let record = lib
        .store()
        .file_by_path(&root.join("letter.jpg"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.status, FileStatus::Failed);
    assert!(record.error.unwrap().contains("not an image"));
    assert!(lib
        .store()
        .file_by_path(&root.join("notes.txt"))
        .await
        .unwrap()
        .is_none());
    assert_eq!(lib.store().failures().await.unwrap().len(), 3);
    let all = lib
        .search_vector(&colour_vector([10, 120, 240]), 100, None)
        .await
        .unwrap();
    assert_eq!(all.len(), n as usize);

    // A rerun does not retry the unchanged failures.
    let before = fake.embedded();
    let again = index(&lib, root, &fake).await;
    assert!(again.failed.is_empty(), "{:?}", again.failed);
    assert_eq!(again.unchanged, n + 3);
    assert_eq!(again.ignored, 1);
    assert_eq!(fake.embedded(), before);
    assert_eq!(lib.store().failures().await.unwrap().len(), 3, "no new failure entries");

    // Repaired: indexed on the next run.
    std::fs::write(root.join("truncated.jpg"), &good_jpeg).unwrap();
    let fixed = index(&lib, root, &fake).await;
    assert_eq!(fixed.added + fixed.updated, 1, "{fixed:?}");
    assert!(fixed.failed.is_empty());
    let hits = lib
        .search_vector(&colour_vector([10, 120, 240]), 1, None)
        .await
        .unwrap();
    assert_eq!(names(&hits, root), ["truncated.jpg"]);
    let status = Library::status(data.path(), Default::default()).await.unwrap().unwrap();
    assert_eq!(
        (status.counts.indexed, status.counts.failed, status.failures),
        (n + 1, 2, 2)
    );
}

#[tokio::test]
async fn an_indexed_file_that_turns_bad_leaves_the_index() {
    let photos = photos();
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    index(&lib, &photos.root, &fake).await;
    let red = photos.path("red.png");
    let red_id = id_of(&lib, &red).await;
    std::fs::write(&red, "overwritten with text").unwrap();

    let report = index(&lib, &photos.root, &fake).await;
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].0, red);
    let n = PHOTO_NAMES.len();
    assert_eq!(lib.indexed_vectors(), n - 1);
    let hits = lib.search_text(fake.as_ref(), "red", 100).await.unwrap();
    assert!(hits.iter().all(|h| h.id != red_id));
    assert!(matches!(lib.similar_to_id(red_id, 3).await, Err(Error::UnknownId(_))));

    // The saved index agrees with SQLite after a reopen.
    drop(lib);
    let lib = open(data.path()).await;
    assert_eq!(
        lib.indexed_vectors(),
        n - 1,
        "the failed file's vector was not saved away"
    );
    let hits = lib.search_text(fake.as_ref(), "red", 100).await.unwrap();
    assert!(hits.iter().all(|h| h.id != red_id));
}

#[cfg(unix)]
#[tokio::test]
async fn a_symlink_loop_does_not_hang() {
    let photos = photos();
    std::os::unix::fs::symlink(&photos.root, photos.path("sub/loop")).unwrap();
    std::os::unix::fs::symlink(photos.path("nowhere.jpg"), photos.path("dangling.jpg")).unwrap();
    // A link to a folder outside the root is followed.
    let outside = std::fs::canonicalize(photos.dir.path()).unwrap().join("elsewhere");
    write_image(
        &outside.join("white.png"),
        &solid(10, 10, colour_named("white").unwrap()),
        ImageFormat::Png,
    );
    std::os::unix::fs::symlink(&outside, photos.path("linked")).unwrap();
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();

    let report = tokio::time::timeout(Duration::from_secs(60), index(&lib, &photos.root, &fake))
        .await
        .expect("the walk finished");
    assert_eq!(report.added, PHOTO_NAMES.len() as u64 + 1, "{report:?}");
    let looped = report.failed.iter().find(|(p, _)| p.ends_with("sub/loop"));
    let (_, why) = looped.unwrap_or_else(|| panic!("loop not reported: {:?}", report.failed));
    assert!(why.contains("loop"), "{why}");
    assert!(
        report.failed.iter().any(|(p, _)| p.ends_with("dangling.jpg")),
        "{:?}",
        report.failed
    );
    let hits = lib.search_text(fake.as_ref(), "white", 1).await.unwrap();
    assert_eq!(names(&hits, &photos.root), ["linked/white.png"]);

    // The loop is not mistaken for deletions on a rerun.
    let again = tokio::time::timeout(Duration::from_secs(60), index(&lib, &photos.root, &fake))
        .await
        .unwrap();
    assert_eq!(again.deleted, 0);
    assert_eq!(again.unchanged, PHOTO_NAMES.len() as u64 + 1);
}

#[tokio::test]
async fn similar_images() {
    let photos = photos();
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    index(&lib, &photos.root, &fake).await;
    let red = photos.path("red.png");
    let red_id = id_of(&lib, &red).await;

    let hits = lib.similar_to_id(red_id, 3).await.unwrap();
    assert_eq!(hits.len(), 3);
    assert!(hits.iter().all(|h| h.id != red_id), "itself excluded");
    assert_eq!(names(&hits, &photos.root)[0], "dark-red.png");
    assert_descending(&hits);
    let all = lib.similar_to_id(red_id, 100).await.unwrap();
    assert_eq!(all.len(), PHOTO_NAMES.len() - 1);

    // An indexed file: its stored vector, nothing embedded, itself excluded.
    let before = fake.embedded();
    let by_file = lib.similar_to_file(&red, fake.as_ref(), 3).await.unwrap();
    assert_eq!(fake.embedded(), before);
    assert_eq!(
        by_file.iter().map(|h| h.id).collect::<Vec<_>>(),
        hits.iter().map(|h| h.id).collect::<Vec<_>>()
    );
    // ... also under a non-canonical spelling of its path.
    let dotted = photos.root.join("sub").join("..").join("red.png");
    let by_dotted = lib.similar_to_file(&dotted, fake.as_ref(), 3).await.unwrap();
    assert_eq!(by_dotted[0].id, hits[0].id);
    assert_eq!(fake.embedded(), before);

    // A file outside the library: embedded now, and its twin inside comes first.
    let outside = data_dir();
    let query = write_image(
        &outside.path().join("query.jpg"),
        &solid(33, 21, colour_named("red").unwrap()),
        ImageFormat::Jpeg,
    );
    let hits = lib.similar_to_file(&query, fake.as_ref(), 2).await.unwrap();
    assert_eq!(fake.embedded(), before + 1);
    assert_eq!(names(&hits, &photos.root), ["red.png", "dark-red.png"]);

    // An indexed file changed on disk since (same size): embedded now, not the stale vector.
    let cyan = photos.path("cyan.bmp");
    write_image(&cyan, &solid(16, 12, colour_named("yellow").unwrap()), ImageFormat::Bmp);
    let hits = lib.similar_to_file(&cyan, fake.as_ref(), 1).await.unwrap();
    assert_eq!(
        names(&hits, &photos.root),
        ["sub/yellow.jpg"],
        "the new content, not the indexed one"
    );

    // Unknown ids and paths.
    assert!(matches!(
        lib.similar_to_id(987_654, 3).await,
        Err(Error::UnknownId(987_654))
    ));
    assert!(lib
        .similar_to_file(&photos.path("no-such.png"), fake.as_ref(), 3)
        .await
        .is_err());
    let not_image = outside.path().join("x.jpg");
    std::fs::write(&not_image, "text").unwrap();
    assert!(lib.similar_to_file(&not_image, fake.as_ref(), 3).await.is_err());
}

#[tokio::test]
async fn another_model_is_refused() {
    let photos = photos();
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    index(&lib, &photos.root, &fake).await;

    let other = ModelInfo {
        id: "fake/other".into(),
        dim: 16,
    };
    let stranger = FakeEmbedder::with_model(other.clone());
    let err = lib
        .index(std::slice::from_ref(&photos.root), stranger.image(), &opts(), &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Model(_)), "{err}");
    assert!(lib.search_text(stranger.as_ref(), "red", 3).await.is_err());
    assert!(lib
        .similar_to_file(&photos.path("red.png"), stranger.as_ref(), 3)
        .await
        .is_err());
    assert_eq!(stranger.embedded(), 0);
    drop(lib);

    for wrong in [
        other,
        ModelInfo {
            id: model().id,
            dim: 32,
        },
    ] {
        let err = match Library::open(data.path(), &wrong, Default::default()).await {
            Ok(_) => panic!("opened with {wrong:?}"),
            Err(e) => e.to_string(),
        };
        // Names both models and a way out. (The brief asked for `magpie reindex` here;
        // the store's message now points at --model / --data-dir instead.)
        assert!(
            err.contains(&format!("`{}`", model().id)),
            "names the stored model: {err}"
        );
        assert!(
            err.contains(&format!("`{}`", wrong.id)),
            "names the requested model: {err}"
        );
        assert!(
            err.contains("--data-dir") || err.contains("magpie reindex"),
            "says what to do: {err}"
        );
    }
    // The library is untouched.
    let lib = open(data.path()).await;
    assert_eq!(lib.indexed_vectors(), PHOTO_NAMES.len());
}

#[tokio::test]
async fn status_of_a_library() {
    let data = data_dir();
    assert!(Library::status(data.path(), Default::default())
        .await
        .unwrap()
        .is_none());
    assert!(Library::status(&data.path().join("absent"), Default::default())
        .await
        .unwrap()
        .is_none());

    let photos = photos();
    std::fs::write(photos.path("bad.jpg"), "nope").unwrap();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    index(&lib, &photos.root, &fake).await;
    let status = Library::status(data.path(), Default::default()).await.unwrap().unwrap();
    assert_eq!(status.model, Some(model()));
    assert_eq!(status.counts.indexed, PHOTO_NAMES.len() as u64);
    assert_eq!(status.counts.failed, 1);
    assert_eq!(status.failures, 1);
    assert_eq!(status.roots, std::slice::from_ref(&photos.root));
    assert_eq!(status.generation, lib.store().generation().await.unwrap());
    assert!(status.generation > 0);
    let index = status.index.expect("an index was saved");
    assert!(index.up_to_date);
    assert_eq!(index.vectors, PHOTO_NAMES.len() as u64);
    assert_eq!(index.generation, status.generation);
    let json = serde_json::to_value(Library::status(data.path(), Default::default()).await.unwrap()).unwrap();
    assert_eq!(json["counts"]["indexed"], PHOTO_NAMES.len());
}

#[tokio::test]
async fn a_large_batch_is_indexed_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let count = 100;
    for i in 0..count {
        let rgb = [(i * 37 % 256) as u8, (i * 91 % 256) as u8, (i * 53 % 256) as u8];
        let (name, format) = if i % 3 == 0 {
            (format!("d{}/img{i:03}.jpg", i % 4), ImageFormat::Jpeg)
        } else {
            (format!("d{}/img{i:03}.png", i % 4), ImageFormat::Png)
        };
        write_image(&root.join(name), &solid(9 + i % 7, 11 + i % 5, rgb), format);
    }
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    let opts = IndexOptions {
        batch_size: 7,
        decode_threads: 3,
        ..IndexOptions::default()
    };

    let (report, progress) = index_recording(&lib, &root, &fake, &opts, None).await;
    assert_eq!(report.added, count as u64, "{report:?}");
    assert!(report.failed.is_empty());
    assert_eq!(fake.embedded(), count as usize, "each image embedded exactly once");
    assert!(fake.max_batch.load(std::sync::atomic::Ordering::SeqCst) <= 7);
    assert!(fake.calls.load(std::sync::atomic::Ordering::SeqCst) >= (count as usize).div_ceil(7));
    assert_eq!(lib.store().counts().await.unwrap().indexed, count as u64);
    assert_eq!(lib.indexed_vectors(), count as usize);
    let all = lib
        .search_vector(&colour_vector([200, 100, 50]), 1000, None)
        .await
        .unwrap();
    assert_eq!(all.len(), count as usize);
    let ids: HashSet<_> = all.iter().map(|h| h.id).collect();
    let paths: HashSet<_> = all.iter().map(|h| h.path.clone()).collect();
    assert_eq!((ids.len(), paths.len()), (count as usize, count as usize));
    assert_descending(&all);

    // Progress: total known up front, done monotonic and reaching total.
    assert!(progress.iter().all(|p| p.total == count as u64));
    assert!(progress
        .windows(2)
        .all(|w| w[0].done <= w[1].done && w[0].elapsed <= w[1].elapsed));
    assert_eq!(progress.first().unwrap().done, 0);
    assert_eq!(progress.last().unwrap().done, count as u64);
    assert!(progress.iter().all(|p| p.scanned == count as u64 && p.failed == 0));
}

#[tokio::test]
async fn a_cancelled_run_commits_what_it_did_and_a_rerun_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let count = 30u64;
    for i in 0..count {
        let rgb = [(i * 8) as u8, 255 - (i * 8) as u8, 100];
        write_image(
            &root.join(format!("img{i:02}.png")),
            &solid(12, 12, rgb),
            ImageFormat::Png,
        );
    }
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    let opts = IndexOptions {
        batch_size: 2,
        decode_threads: 1,
        ..IndexOptions::default()
    };

    let (first, progress) = index_recording(&lib, &root, &fake, &opts, Some(4)).await;
    assert!(first.added >= 4, "{first:?}");
    assert!(first.added < count, "cancelled early: {first:?}");
    assert_eq!(fake.embedded() as u64, first.added, "nothing embedded and then dropped");
    assert_eq!(lib.store().counts().await.unwrap().indexed, first.added);
    assert_eq!(lib.indexed_vectors() as u64, first.added);
    assert!(progress.windows(2).all(|w| w[0].done <= w[1].done));

    // The index saved on the way out matches SQLite.
    drop(lib);
    let lib = open(data.path()).await;
    assert_eq!(lib.index_state(), &magpie_engine::IndexState::Loaded);
    assert_eq!(lib.indexed_vectors() as u64, first.added);

    let (second, progress) = index_recording(&lib, &root, &fake, &opts, None).await;
    assert_eq!(second.unchanged, first.added);
    assert_eq!(second.added, count - first.added, "{second:?}");
    assert_eq!(fake.embedded() as u64, count, "no image embedded twice");
    assert_eq!(progress.last().unwrap().done, count - first.added);
    let all = lib.search_vector(&colour_vector([1, 2, 3]), 100, None).await.unwrap();
    let ids: HashSet<_> = all.iter().map(|h| h.id).collect();
    assert_eq!(ids.len(), count as usize);
    assert_eq!(lib.store().counts().await.unwrap().indexed, count);

    // Cancelled before anything happens: Ok, nothing done.
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    std::fs::write(
        root.join("img00.png"),
        encode(&solid(5, 5, [0, 0, 255]), ImageFormat::Png),
    )
    .unwrap();
    let r = lib
        .index_cancellable(std::slice::from_ref(&root), fake.image(), &opts, &|_| {}, cancel)
        .await
        .unwrap();
    assert_eq!(r.updated + r.added, 0, "{r:?}");
}

#[tokio::test]
async fn reopening_loads_or_rebuilds_the_vector_index() {
    let photos = photos();
    let data = data_dir();
    let fake = FakeEmbedder::new();
    let lib = open(data.path()).await;
    assert!(
        matches!(lib.index_state(), magpie_engine::IndexState::Rebuilt(_)),
        "a new library has no index yet"
    );
    index(&lib, &photos.root, &fake).await;
    let query = colour_vector([200, 60, 120]);
    let expected = lib.search_vector(&query, 5, None).await.unwrap();
    drop(lib);

    // Loaded as saved.
    let lib = open(data.path()).await;
    assert_eq!(lib.index_state(), &magpie_engine::IndexState::Loaded);
    let got = lib.search_vector(&query, 5, None).await.unwrap();
    assert_eq!(
        got.iter().map(|h| (h.id, h.score)).collect::<Vec<_>>(),
        expected.iter().map(|h| (h.id, h.score)).collect::<Vec<_>>()
    );
    drop(lib);

    // Index files deleted: rebuilt from SQLite, same answers.
    let removed = remove_vector_files(data.path());
    assert!(removed > 0, "found the vector index files");
    let lib = open(data.path()).await;
    assert!(
        matches!(lib.index_state(), magpie_engine::IndexState::Rebuilt(_)),
        "{:?}",
        lib.index_state()
    );
    let got = lib.search_vector(&query, 5, None).await.unwrap();
    assert_eq!(
        got.iter().map(|h| h.id).collect::<Vec<_>>(),
        expected.iter().map(|h| h.id).collect::<Vec<_>>()
    );
    drop(lib);
    // ... and saved, so the next open loads it.
    let lib = open(data.path()).await;
    assert_eq!(lib.index_state(), &magpie_engine::IndexState::Loaded);

    // rebuild_index gives the same answers too.
    assert_eq!(lib.rebuild_index().await.unwrap(), PHOTO_NAMES.len());
    let got = lib.search_vector(&query, 5, None).await.unwrap();
    assert_eq!(
        got.iter().map(|h| h.id).collect::<Vec<_>>(),
        expected.iter().map(|h| h.id).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn an_index_older_than_sqlite_is_rebuilt() {
    // As after a crash between committing a batch and saving the index.
    let photos = photos();
    let data = data_dir();
    let fake = FakeEmbedder::new();
    let lib = open(data.path()).await;
    index(&lib, &photos.root, &fake).await;
    let saved = copy_vector_files(data.path());
    write_image(
        &photos.path("white.png"),
        &solid(8, 8, colour_named("white").unwrap()),
        ImageFormat::Png,
    );
    assert_eq!(index(&lib, &photos.root, &fake).await.added, 1);
    drop(lib);
    for (name, bytes) in saved {
        std::fs::write(data.path().join(name), bytes).unwrap();
    }

    let lib = open(data.path()).await;
    match lib.index_state() {
        magpie_engine::IndexState::Rebuilt(why) => assert!(why.contains("generation"), "{why}"),
        other => panic!("stale index used: {other:?}"),
    }
    let hits = lib.search_text(fake.as_ref(), "white", 1).await.unwrap();
    assert_eq!(names(&hits, &photos.root), ["white.png"]);
    assert_eq!(lib.indexed_vectors(), PHOTO_NAMES.len() + 1);
}

#[tokio::test]
async fn a_removal_the_indexes_never_saved_makes_them_stale() {
    // As after a kill between the walk writing a tombstone (or an indexed file's failure)
    // to SQLite and the index saves at the end of the run: the saved indexes still hold
    // those files and must not load as current.
    let photos = photos();
    let data = data_dir();
    let fake = FakeEmbedder::new();
    let lib = open(data.path()).await;
    index(&lib, &photos.root, &fake).await;
    let n = PHOTO_NAMES.len();
    let blue = id_of(&lib, &photos.path("blue.png")).await;
    let red = photos.path("red.png");
    let root = lib.store().roots().await.unwrap()[0].id;
    lib.store().mark_deleted(&[blue]).await.unwrap();
    lib.store().record_failure(root, &red, 1, 1, "truncated").await.unwrap();
    drop(lib);

    let lib = open(data.path()).await;
    assert!(matches!(lib.index_state(), magpie_engine::IndexState::Rebuilt(_)), "{:?}", lib.index_state());
    assert!(matches!(lib.text_index_state(), magpie_engine::IndexState::Rebuilt(_)), "{:?}", lib.text_index_state());
    assert_eq!(lib.indexed_vectors(), n - 2);
    assert_eq!(lib.text_documents(), n as u64 - 2);
    drop(lib);
    // The rebuilt indexes were saved at the new generation.
    let lib = open(data.path()).await;
    assert_eq!(lib.index_state(), &magpie_engine::IndexState::Loaded);
    assert_eq!(lib.text_index_state(), &magpie_engine::IndexState::Loaded);
}

#[tokio::test]
async fn an_hnsw_library_survives_reopening() {
    // Past the exact threshold the index is an HNSW graph; it must save and load too.
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let count = 40u32;
    for i in 0..count {
        let rgb = [(i * 6) as u8, 30 + (i * 5) as u8, 250 - (i * 6) as u8];
        write_image(
            &root.join(format!("c{i:02}.png")),
            &solid(10, 10, rgb),
            ImageFormat::Png,
        );
    }
    let data = data_dir();
    let config = magpie_engine::LibraryConfig {
        index: magpie_index::IndexParams {
            exact_threshold: 10,
            ..Default::default()
        },
    };
    let fake = FakeEmbedder::new();
    let lib = Library::open(data.path(), &model(), config.clone()).await.unwrap();
    index(&lib, &root, &fake).await;
    let query = colour_vector([60, 80, 190]);
    let expected = lib.search_vector(&query, 5, None).await.unwrap();
    assert_eq!(expected.len(), 5);
    assert_eq!(names(&expected, &root)[0], "c10.png");
    drop(lib);
    let status = Library::status(data.path(), config.index).await.unwrap().unwrap();
    assert_eq!(status.index.as_ref().unwrap().kind, magpie_index::IndexKind::Hnsw);

    let lib = Library::open(data.path(), &model(), config.clone()).await.unwrap();
    assert_eq!(lib.index_state(), &magpie_engine::IndexState::Loaded);
    let got = lib.search_vector(&query, 5, None).await.unwrap();
    assert_eq!(
        got.iter().map(|h| h.id).collect::<Vec<_>>(),
        expected.iter().map(|h| h.id).collect::<Vec<_>>()
    );

    // Other graph parameters: the saved graph is stale and rebuilt.
    drop(lib);
    let other = magpie_engine::LibraryConfig {
        index: magpie_index::IndexParams {
            exact_threshold: 10,
            m: 8,
            ..Default::default()
        },
    };
    let lib = Library::open(data.path(), &model(), other).await.unwrap();
    assert!(
        matches!(lib.index_state(), magpie_engine::IndexState::Rebuilt(_)),
        "{:?}",
        lib.index_state()
    );
    let got = lib.search_vector(&query, 5, None).await.unwrap();
    assert_eq!(names(&got, &root)[0], "c10.png");
}

#[tokio::test]
async fn a_nested_root_is_not_re_embedded() {
    let photos = photos();
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    index(&lib, &photos.root, &fake).await;
    let before = fake.embedded();

    let inner = index(&lib, &photos.path("sub"), &fake).await;
    assert_eq!(
        (inner.added, inner.updated, inner.deleted, inner.unchanged),
        (0, 0, 0, 1),
        "{inner:?}"
    );
    let outer = index(&lib, &photos.root, &fake).await;
    assert_eq!((outer.added, outer.updated, outer.deleted), (0, 0, 0), "{outer:?}");
    assert_eq!(outer.unchanged, PHOTO_NAMES.len() as u64);
    assert_eq!(fake.embedded(), before);

    // A file deleted under the inner root is noticed by either run.
    std::fs::remove_file(photos.path("sub/yellow.jpg")).unwrap();
    let outer = index(&lib, &photos.root, &fake).await;
    assert_eq!(outer.deleted, 1, "{outer:?}");
    assert_eq!(lib.indexed_vectors(), PHOTO_NAMES.len() - 1);
}

#[tokio::test]
async fn nested_roots_in_one_run_are_walked_once() {
    let photos = photos();
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    let roots = [photos.path("sub"), photos.root.clone()];
    let report = lib.index(&roots, fake.image(), &opts(), &|_| {}).await.unwrap();
    assert_eq!(report.added, PHOTO_NAMES.len() as u64, "{report:?}");
    assert_eq!(report.scanned, PHOTO_NAMES.len() as u64);
    assert_eq!(fake.embedded(), PHOTO_NAMES.len());
    let again = lib.index(&roots, fake.image(), &opts(), &|_| {}).await.unwrap();
    assert_eq!(
        (again.unchanged, again.added, again.deleted),
        (PHOTO_NAMES.len() as u64, 0, 0),
        "{again:?}"
    );
    assert_eq!(lib.store().roots().await.unwrap().len(), 2);
}

#[tokio::test]
async fn files_are_recognised_by_content_not_name() {
    let photos = photos();
    // An image without an extension is indexed; a large file that is no image and not
    // named like one is ignored.
    write_image(
        &photos.path("IMG_0001"),
        &solid(12, 12, colour_named("white").unwrap()),
        ImageFormat::Png,
    );
    std::fs::write(photos.path("clip.mp4"), vec![7u8; 3 << 20]).unwrap();
    std::fs::write(photos.path("README"), "").unwrap();
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    let report = index(&lib, &photos.root, &fake).await;
    assert_eq!(report.added, PHOTO_NAMES.len() as u64 + 1, "{report:?}");
    assert_eq!(report.ignored, 2);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let hits = lib.search_text(fake.as_ref(), "white", 1).await.unwrap();
    assert_eq!(names(&hits, &photos.root), ["IMG_0001"]);
    assert_eq!(hits[0].format.as_deref(), Some("png"));
}

#[tokio::test]
async fn bad_roots_are_errors() {
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    let missing = data.path().join("no-such-folder");
    let err = lib
        .index(std::slice::from_ref(&missing), fake.image(), &opts(), &|_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no-such-folder"), "{err}");
    assert_eq!(fake.embedded(), 0);
}

fn vector_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{}.", magpie_engine::VECTOR_INDEX))
        })
        .collect()
}

fn remove_vector_files(dir: &std::path::Path) -> usize {
    let files = vector_files(dir);
    for f in &files {
        std::fs::remove_file(f).unwrap();
    }
    files.len()
}

fn copy_vector_files(dir: &std::path::Path) -> Vec<(std::ffi::OsString, Vec<u8>)> {
    vector_files(dir)
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

/// A library switched to another model by another handle (another process) refuses to
/// take the old model's embeddings from a handle opened before the switch.
#[tokio::test]
async fn a_handle_opened_before_a_model_switch_does_not_index_with_the_old_model() {
    let photos = photos();
    let data = data_dir();
    let old_handle = open(data.path()).await;
    let fake = FakeEmbedder::new();
    index(&old_handle, &photos.root, &fake).await;

    // Another handle switches the library to another model.
    let other = ModelInfo { id: "fake/other".into(), dim: model().dim };
    let switcher = open(data.path()).await;
    let new_fake = FakeEmbedder::with_model(other.clone());
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let r = switcher.switch_model(new_fake.image(), &opts(), &|_, _| {}, &cancel).await.unwrap();
    assert!(r.switched, "{r:?}");

    // The old handle still searches (its index is the old model's, consistent), but
    // writing with the old model is refused with a message that says what to do.
    std::fs::copy(photos.path("red.png"), photos.root.join("red-copy.png")).unwrap();
    let e = old_handle.index(&[photos.root.clone()], fake.image(), &opts(), &|_| {}).await.unwrap_err();
    assert!(matches!(e, Error::Switched { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("fake/other") && msg.contains("restart"), "{msg}");
    let paths = [photos.root.join("red-copy.png")];
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    assert!(matches!(old_handle.index_paths(&[photos.root.clone()], &paths, fake.image(), &opts(), cancel).await, Err(Error::Switched { .. })));
    // A handle opened now indexes with the new model.
    let fresh = Library::open(data.path(), &other, Default::default()).await.unwrap();
    let r = fresh.index(&[photos.root.clone()], new_fake.image(), &opts(), &|_| {}).await.unwrap();
    assert_eq!(r.added, 1, "{r:?}");
}
