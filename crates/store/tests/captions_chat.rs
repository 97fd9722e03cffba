//! Captions, the caption counter, and conversations with their messages.

use magpie_core::{Embedding, ModelInfo};
use magpie_store::{Error, Exif, ImageMeta, NewFile, Role, Store};
use std::path::{Path, PathBuf};

const BLIP: &str = "test/blip2-tiny";

fn model() -> ModelInfo {
    ModelInfo { id: "test/clip-tiny".into(), dim: 4 }
}

fn new_file(root_id: i64, path: impl Into<PathBuf>, seed: u32) -> NewFile {
    NewFile {
        root_id,
        path: path.into(),
        size: 1000 + seed as u64,
        mtime_ns: 1_700_000_000_000_000_000 + seed as i64,
        content_hash: format!("{seed:064x}"),
        meta: ImageMeta { width: 10, height: 10, format: "png".into(), exif: Exif::default() },
        embedding: Embedding::normalized(&model().id, vec![1.0, seed as f32, 0.5, 0.25]).unwrap(),
    }
}

/// An in-memory store with the test model, one root and `n` indexed files 1.jpg…n.jpg.
async fn with_files(n: u32) -> (Store, i64, Vec<i64>) {
    let store = Store::open_in_memory().await.unwrap();
    store.ensure_model(&model()).await.unwrap();
    let root = store.add_root(Path::new("/photos")).await.unwrap().id;
    let batch: Vec<_> = (1..=n).map(|i| new_file(root, format!("/photos/{i}.jpg"), i)).collect();
    let ids = store.commit_batch(&batch).await.unwrap().ids;
    (store, root, ids)
}

#[tokio::test]
async fn the_migration_adds_the_tables() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("magpie.db")).await.unwrap();
    let lib = store.library().await.unwrap();
    assert_eq!((lib.generation, lib.text_generation), (0, 0));
    store.close().await;
    // Reopening (migrations already applied) keeps working.
    let store = Store::open(dir.path().join("magpie.db")).await.unwrap();
    assert_eq!(store.text_generation().await.unwrap(), 0);
    assert!(store.integrity_check().await.unwrap().is_empty());
}

#[tokio::test]
async fn captions_are_set_replaced_and_bump_only_the_text_generation() {
    let (store, _root, ids) = with_files(3).await;
    let generation = store.generation().await.unwrap();
    assert!(store.caption(ids[0]).await.unwrap().is_none());

    let t1 = store.set_caption(ids[0], BLIP, "a dog on a beach").await.unwrap();
    assert_eq!(t1, 1);
    let c = store.caption(ids[0]).await.unwrap().unwrap();
    assert_eq!((c.file_id, c.model_id.as_str(), c.text.as_str()), (ids[0], BLIP, "a dog on a beach"));
    assert!(c.created_at.starts_with("20"), "{}", c.created_at);

    // Captioning again replaces (one caption per file).
    let t2 = store.set_caption(ids[0], "other/captioner", "a puppy").await.unwrap();
    assert_eq!(t2, 2);
    let c = store.caption(ids[0]).await.unwrap().unwrap();
    assert_eq!((c.model_id.as_str(), c.text.as_str()), ("other/captioner", "a puppy"));
    assert_eq!(store.text_generation().await.unwrap(), 2);
    assert_eq!(store.library().await.unwrap().text_generation, 2);
    assert_eq!(store.generation().await.unwrap(), generation, "captions leave the vector index valid");

    // Unknown file: a clear error, nothing written, the counter unchanged.
    let err = store.set_caption(424242, BLIP, "nothing").await.unwrap_err();
    assert!(matches!(err, Error::NoSuchFile { id: 424242, .. }), "{err:?}");
    assert_eq!(store.text_generation().await.unwrap(), 2);

    store.set_caption(ids[2], BLIP, "a cat").await.unwrap();
    let got = store.captions_for(&[ids[0], ids[1], ids[2], 99]).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[&ids[0]], "a puppy");
    assert_eq!(got[&ids[2]], "a cat");
    let all = store.all_captions().await.unwrap();
    assert_eq!(all.iter().map(|c| c.file_id).collect::<Vec<_>>(), vec![ids[0], ids[2]]);
    assert_eq!(store.caption_count().await.unwrap(), 2);
}

#[tokio::test]
async fn files_needing_caption_pages_by_model_and_skips_non_indexed() {
    let (store, root, ids) = with_files(5).await;
    let need = |after| {
        let store = store.clone();
        async move {
            store
                .files_needing_caption(BLIP, after, 2)
                .await
                .unwrap()
                .into_iter()
                .map(|(id, _)| id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(need(i64::MIN).await, ids[..2].to_vec());
    let first = store.files_needing_caption(BLIP, i64::MIN, 1).await.unwrap();
    assert_eq!(first[0].1, Path::new("/photos/1.jpg"));
    assert_eq!(store.count_needing_caption(BLIP).await.unwrap(), 5);

    // Captioned by this model: done. By another model: still needed. Deleted or
    // failed files: never offered.
    store.set_caption(ids[0], BLIP, "one").await.unwrap();
    store.set_caption(ids[1], "other/model", "two").await.unwrap();
    store.mark_deleted(&[ids[2]]).await.unwrap();
    store.record_failure(root, Path::new("/photos/4.jpg"), 1, 1, "truncated").await.unwrap();
    assert_eq!(need(i64::MIN).await, vec![ids[1], ids[4]]);
    assert_eq!(need(ids[1]).await, vec![ids[4]], "paging resumes after the last id");
    assert!(need(ids[4]).await.is_empty());
    assert_eq!(store.count_needing_caption(BLIP).await.unwrap(), 2);
    assert_eq!(store.count_needing_caption("other/model").await.unwrap(), 2);
    // The deleted file's caption no longer counts; a purge removes captions by cascade.
    store.set_caption(ids[2], BLIP, "gone").await.unwrap();
    assert_eq!(store.caption_count().await.unwrap(), 2);
    store.purge_deleted().await.unwrap();
    assert!(store.caption(ids[2]).await.unwrap().is_none());
}

#[tokio::test]
async fn new_content_drops_the_caption_but_a_touch_keeps_it() {
    let (store, root, ids) = with_files(2).await;
    store.set_caption(ids[0], BLIP, "a red barn").await.unwrap();
    store.set_caption(ids[1], BLIP, "a blue boat").await.unwrap();

    // Same path, same content (only the mtime moved): the caption stays.
    let mut touched = new_file(root, "/photos/1.jpg", 1);
    touched.mtime_ns += 5;
    store.commit_batch(&[touched]).await.unwrap();
    assert_eq!(store.caption(ids[0]).await.unwrap().unwrap().text, "a red barn");

    // Same path, new content: the caption describes another picture and goes.
    let rewritten = new_file(root, "/photos/2.jpg", 77);
    assert_eq!(store.commit_batch(&[rewritten]).await.unwrap().ids, vec![ids[1]]);
    assert!(store.caption(ids[1]).await.unwrap().is_none());
    let need: Vec<_> = store.files_needing_caption(BLIP, i64::MIN, 10).await.unwrap();
    assert_eq!(need.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![ids[1]]);
}

#[tokio::test]
async fn text_sources_join_roots_and_captions() {
    let (store, _root, ids) = with_files(3).await;
    let other_root = store.add_root(Path::new("/archive/2019_Wedding")).await.unwrap().id;
    let moved = store
        .commit_batch(&[new_file(other_root, "/archive/2019_Wedding/IMG cake-cutting.jpg", 9)])
        .await
        .unwrap()
        .ids[0];
    store.set_caption(ids[1], BLIP, "two swans").await.unwrap();
    store.mark_deleted(&[ids[2]]).await.unwrap();

    let all = store.all_text_sources().await.unwrap();
    assert_eq!(all.iter().map(|t| t.id).collect::<Vec<_>>(), vec![ids[0], ids[1], moved]);
    assert_eq!(all[0].root, Path::new("/photos"));
    assert_eq!(all[0].caption, None);
    assert_eq!(all[1].caption.as_deref(), Some("two swans"));
    assert_eq!(all[2].root, Path::new("/archive/2019_Wedding"));
    assert_eq!(all[2].path, Path::new("/archive/2019_Wedding/IMG cake-cutting.jpg"));

    let some = store.text_sources(&[moved, ids[2], ids[1], 4242]).await.unwrap();
    assert_eq!(some.iter().map(|t| t.id).collect::<Vec<_>>(), vec![ids[1], moved], "deleted and unknown left out");
}

#[tokio::test]
async fn all_text_sources_pages_past_one_page() {
    let store = Store::open_in_memory().await.unwrap();
    store.ensure_model(&model()).await.unwrap();
    let root = store.add_root(Path::new("/p")).await.unwrap().id;
    let n = 4096 + 10;
    let batch: Vec<_> = (0..n).map(|i| new_file(root, format!("/p/{i}.jpg"), i)).collect();
    store.commit_batch(&batch).await.unwrap();
    let all = store.all_text_sources().await.unwrap();
    assert_eq!(all.len(), n as usize);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
}

#[tokio::test]
async fn conversations_keep_their_messages_in_order() {
    let (store, _root, ids) = with_files(2).await;
    let c = store.create_conversation(ids[0], BLIP).await.unwrap();
    assert_eq!((c.file_id, c.model_id.as_str(), c.title.as_deref()), (ids[0], BLIP, None));
    assert!(store.messages(c.id).await.unwrap().is_empty());

    let (q, a) = store.append_exchange(c.id, "what is this?", "a dog").await.unwrap();
    assert_eq!((q.role, a.role), (Role::User, Role::Assistant));
    assert!(q.id < a.id);
    store.append_exchange(c.id, "what colour?", "brown").await.unwrap();
    let m = store.append_message(c.id, Role::User, "a note").await.unwrap();
    assert_eq!(m.conversation_id, c.id);

    let msgs = store.messages(c.id).await.unwrap();
    let got: Vec<(Role, &str)> = msgs.iter().map(|m| (m.role, m.text.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (Role::User, "what is this?"),
            (Role::Assistant, "a dog"),
            (Role::User, "what colour?"),
            (Role::Assistant, "brown"),
            (Role::User, "a note"),
        ]
    );
    // Titled by the first question, not overwritten by later ones.
    let back = store.conversation(c.id).await.unwrap().unwrap();
    assert_eq!(back.title.as_deref(), Some("what is this?"));
    assert_eq!(back.created_at, c.created_at);

    let other = store.create_conversation(ids[1], BLIP).await.unwrap();
    let third = store.create_conversation(ids[0], "other/chat").await.unwrap();
    let of = |f| {
        let store = store.clone();
        async move { store.conversations(f).await.unwrap().into_iter().map(|c| c.id).collect::<Vec<_>>() }
    };
    assert_eq!(of(Some(ids[0])).await, vec![c.id, third.id]);
    assert_eq!(of(Some(ids[1])).await, vec![other.id]);
    assert_eq!(of(None).await, vec![c.id, other.id, third.id]);

    // Unknown ids are clear errors and write nothing.
    assert!(matches!(store.create_conversation(4242, BLIP).await, Err(Error::NoSuchFile { id: 4242, .. })));
    assert!(matches!(
        store.append_exchange(9999, "q", "a").await,
        Err(Error::NoSuchConversation { id: 9999, .. })
    ));
    assert!(matches!(
        store.append_message(9999, Role::User, "q").await,
        Err(Error::NoSuchConversation { id: 9999, .. })
    ));
    assert!(store.conversation(9999).await.unwrap().is_none());

    // Deleting a conversation deletes its messages; purging a file deletes its chats.
    assert!(store.delete_conversation(other.id).await.unwrap());
    assert!(!store.delete_conversation(other.id).await.unwrap());
    assert!(store.messages(other.id).await.unwrap().is_empty());
    store.mark_deleted(&[ids[0]]).await.unwrap();
    store.purge_deleted().await.unwrap();
    assert!(store.conversation(c.id).await.unwrap().is_none());
    assert!(store.messages(c.id).await.unwrap().is_empty());
    assert!(store.integrity_check().await.unwrap().is_empty());
}
