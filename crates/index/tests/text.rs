//! The caption index (tantivy): documents, path words, lenient queries, persistence,
//! stale detection and the writer lock.

use magpie_index::{path_words, TextDoc, TextError, TextIndex, TextLoaded, TextStamp};
use std::path::Path;

fn doc(id: i64, path: &str, caption: Option<&str>) -> TextDoc {
    TextDoc::new(id, Path::new(path), Path::new("/photos"), caption.map(str::to_string))
}

fn stamp(generation: u64, text_generation: u64) -> TextStamp {
    TextStamp { generation, text_generation }
}

fn ids(index: &TextIndex, query: &str) -> Vec<i64> {
    index.search(query, 10).unwrap().iter().map(|h| h.id).collect()
}

fn library() -> Vec<TextDoc> {
    vec![
        doc(1, "/photos/2019_Wedding/IMG cake-cutting.jpg", None),
        doc(2, "/photos/holiday/DSC01234.JPG", Some("a brown dog running on a sandy beach")),
        doc(3, "/photos/holiday/DSC01235.JPG", Some("two dogs and a dog bowl")),
        doc(4, "/photos/misc/BeachDay.png", Some("a red car parked in front of a house")),
        doc(5, "/photos/misc/x.png", Some("a bowl of fruit on a table")),
    ]
}

#[test]
fn documents_are_found_by_caption_and_path_words() {
    let dir = tempfile::tempdir().unwrap();
    let ix = TextIndex::rebuild(&dir.path().join("t"), &library(), stamp(1, 0)).unwrap();
    assert_eq!(ix.len(), 5);
    assert_eq!(ix.stamp(), stamp(1, 0));

    // Folder and file names, split into words, with nothing in any caption.
    assert_eq!(ids(&ix, "wedding"), vec![1]);
    assert_eq!(ids(&ix, "cutting"), vec![1]);
    assert_eq!(ids(&ix, "2019"), vec![1]);
    assert_eq!(ids(&ix, "Photos").len(), 5, "the root's own name is a path word");
    assert_eq!(ids(&ix, "day"), vec![4], "BeachDay is beach + day");
    assert_eq!(ids(&ix, "beachday"), vec![4], "and beachday");
    assert_eq!(ids(&ix, "DSC01234"), vec![2], "letters and digits split alike in query and path");

    // Captions: case, plural and stop words do not matter (English stemming).
    assert_eq!(ids(&ix, "CAR"), vec![4]);
    let dogs = ids(&ix, "dogs");
    assert_eq!(dogs.len(), 2);
    assert_eq!(dogs[0], 3, "two matches in a short caption beat one: {dogs:?}");
    assert!(ids(&ix, "the").is_empty(), "a stop word alone matches nothing");
    assert!(ids(&ix, "zebra").is_empty());
    assert!(ix.search("dog", 0).unwrap().is_empty());

    // "beach": caption of 2, path of 4; both found. More query words matched rank higher.
    let beach = ids(&ix, "beach");
    assert_eq!(beach.len(), 2);
    assert!(beach.contains(&2) && beach.contains(&4));
    assert_eq!(ids(&ix, "dog beach")[0], 2);
    assert_eq!(ids(&ix, "fruit bowl")[0], 5);

    // Scores are BM25, best first.
    let hits = ix.search("dog bowl", 10).unwrap();
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score), "{hits:?}");
    assert!(hits[0].score > 0.0);
}

#[test]
fn any_user_text_is_a_query() {
    let dir = tempfile::tempdir().unwrap();
    let ix = TextIndex::rebuild(&dir.path().join("t"), &library(), stamp(1, 0)).unwrap();
    for q in [
        "",
        "   ",
        "\"unclosed",
        "(((",
        ")",
        "caption:",
        "nosuchfield:dog",
        "AND OR NOT",
        "*",
        "dog^",
        "~2",
        "[1 TO",
        "id:abc",
        "-",
        "+",
        "18:30",
        "ça va? 🐕",
        "\\",
    ] {
        assert!(ix.search(q, 10).is_ok(), "query {q:?} failed");
    }
    // Syntax the user did not mean is dropped, the words still count.
    assert_eq!(ids(&ix, "(dog")[0], 3);
    assert!(ids(&ix, "car) \"").contains(&4));
    assert_eq!(ids(&ix, "wedding:"), vec![1]);
}

#[test]
fn upsert_replaces_by_id_and_remove_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let ix = TextIndex::rebuild(&dir.path().join("t"), &library(), stamp(1, 0)).unwrap();

    // A caption arrives for 1; 5 gets another caption; 4 is removed.
    ix.upsert(&[
        doc(1, "/photos/2019_Wedding/IMG cake-cutting.jpg", Some("a bride and groom cut a cake")),
        doc(5, "/photos/misc/x.png", Some("a sailing boat")),
    ])
    .unwrap();
    ix.remove(&[4, 999]).unwrap();
    // Not visible before the commit.
    assert!(ids(&ix, "bride").is_empty());
    assert_eq!(ids(&ix, "car"), vec![4]);

    ix.commit(stamp(1, 2)).unwrap();
    assert_eq!(ix.stamp(), stamp(1, 2));
    assert_eq!(ids(&ix, "bride"), vec![1]);
    assert_eq!(ids(&ix, "wedding"), vec![1], "path words kept beside the new caption");
    assert_eq!(ids(&ix, "boat"), vec![5]);
    assert!(ids(&ix, "fruit").is_empty(), "the old caption of 5 is gone");
    assert!(ids(&ix, "car").is_empty(), "4 removed");
    assert_eq!(ix.len(), 4, "one document per id");
    ix.release_writer().unwrap();

    // Upserting the same id twice in one commit keeps the last.
    ix.upsert(&[doc(2, "/photos/a.jpg", Some("first")), doc(2, "/photos/a.jpg", Some("second"))]).unwrap();
    ix.commit(stamp(1, 3)).unwrap();
    assert!(ids(&ix, "first").is_empty());
    assert_eq!(ids(&ix, "second"), vec![2]);
    assert_eq!(ix.len(), 4);
}

#[test]
fn saved_index_reloads_only_at_its_stamp() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("captions.tantivy");
    assert!(matches!(TextIndex::load(&path, stamp(0, 0)).unwrap(), TextLoaded::Missing));
    assert!(TextIndex::saved(&path).unwrap().is_none());

    let ix = TextIndex::rebuild(&path, &library(), stamp(3, 1)).unwrap();
    ix.upsert(&[doc(6, "/photos/new/kite.png", Some("a kite in the sky"))]).unwrap();
    ix.commit(stamp(4, 1)).unwrap();
    // Uncommitted work is lost with the process; the saved stamp says what is in.
    ix.upsert(&[doc(7, "/photos/new/lost.png", Some("never committed"))]).unwrap();
    drop(ix);

    let saved = TextIndex::saved(&path).unwrap().unwrap();
    assert_eq!((saved.stamp, saved.docs), (stamp(4, 1), 6));
    let TextLoaded::Ready(back) = TextIndex::load(&path, stamp(4, 1)).unwrap() else { panic!("not ready") };
    assert_eq!(back.len(), 6);
    assert_eq!(ids(&back, "kite"), vec![6]);
    assert!(ids(&back, "committed").is_empty());
    assert_eq!(ids(&back, "wedding"), vec![1]);
    drop(back);

    // Another generation or text generation in SQLite: stale, with the reason.
    for other in [stamp(5, 1), stamp(4, 2), stamp(3, 1)] {
        match TextIndex::load(&path, other).unwrap() {
            TextLoaded::Stale(why) => assert!(why.contains("generation"), "{why}"),
            other => panic!("expected stale, got {other:?}"),
        }
    }

    // A rebuild in place replaces everything.
    let ix = TextIndex::rebuild(&path, &[doc(9, "/photos/only.png", None)], stamp(5, 1)).unwrap();
    assert_eq!(ix.len(), 1);
    drop(ix);
    let TextLoaded::Ready(back) = TextIndex::load(&path, stamp(5, 1)).unwrap() else { panic!() };
    assert_eq!(ids(&back, "only"), vec![9]);
    assert!(ids(&back, "kite").is_empty());
}

#[test]
fn a_damaged_or_foreign_folder_is_stale_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("captions.tantivy");
    TextIndex::rebuild(&path, &library(), stamp(1, 1)).unwrap();

    // Garbage meta file.
    std::fs::write(path.join("meta.json"), b"{ not json").unwrap();
    assert!(matches!(TextIndex::load(&path, stamp(1, 1)).unwrap(), TextLoaded::Stale(_)));
    assert!(TextIndex::saved(&path).unwrap().is_none());
    let ix = TextIndex::rebuild(&path, &library(), stamp(1, 1)).unwrap();
    assert_eq!(ix.len(), 5);
    drop(ix);
    assert!(matches!(TextIndex::load(&path, stamp(1, 1)).unwrap(), TextLoaded::Ready(_)));

    // Segment files deleted from under it.
    for e in std::fs::read_dir(&path).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "meta.json" && !p.file_name().unwrap().to_string_lossy().starts_with('.') {
            std::fs::remove_file(p).unwrap();
        }
    }
    match TextIndex::load(&path, stamp(1, 1)) {
        Ok(TextLoaded::Stale(_)) => {}
        Ok(TextLoaded::Ready(ix)) => assert!(ix.search("wedding", 5).is_err(), "a gutted index cannot pass as whole"),
        other => panic!("{other:?}"),
    }
    let ix = TextIndex::rebuild(&path, &library(), stamp(1, 1)).unwrap();
    assert_eq!(ids(&ix, "wedding"), vec![1]);
    drop(ix);

    // A tantivy index with another schema, or without our stamp, is not ours.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    let mut b = tantivy_schema();
    let body = b.add_text_field("body", tantivy::schema::TEXT);
    let index = tantivy::Index::create_in_dir(&foreign, b.build()).unwrap();
    let mut w: tantivy::IndexWriter = index.writer_with_num_threads(1, 15_000_000).unwrap();
    w.add_document(tantivy::doc!(body => "hello")).unwrap();
    w.commit().unwrap();
    drop(w);
    assert!(matches!(TextIndex::load(&foreign, stamp(0, 0)).unwrap(), TextLoaded::Stale(_)));
    let ix = TextIndex::rebuild(&foreign, &library(), stamp(0, 0)).unwrap();
    assert_eq!(ix.len(), 5);
}

#[test]
fn what_a_killed_commit_leaves_is_removed_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("captions.tantivy");
    drop(TextIndex::rebuild(&path, &library(), stamp(1, 0)).unwrap());
    let listing = || {
        let mut names: Vec<String> =
            std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    };
    let clean = listing();

    // A writer killed between writing its segment and committing it: segment files no
    // commit uses, and the temporary file of an atomic write that never got renamed.
    {
        let index = tantivy::Index::open_in_dir(&path).unwrap();
        index.tokenizers().register("magpie_en", tantivy::tokenizer::SimpleTokenizer::default());
        let id = index.schema().get_field("id").unwrap();
        let mut w: tantivy::IndexWriter = index.writer_with_num_threads(1, 15_000_000).unwrap();
        w.add_document(tantivy::doc!(id => 99i64)).unwrap();
        // Dropped without a commit: like a kill, nothing cleans up (no collection runs).
        drop(w.prepare_commit().unwrap());
    }
    std::fs::write(path.join(".tmpK1ll3d"), b"{\"half\": ").unwrap();
    let after_kill = listing();
    assert!(after_kill.len() > clean.len() + 1, "{after_kill:?}");

    let TextLoaded::Ready(ix) = TextIndex::load(&path, stamp(1, 0)).unwrap() else { panic!("not ready") };
    assert_eq!(ix.len(), 5);
    assert_eq!(listing(), clean);
}

fn tantivy_schema() -> tantivy::schema::SchemaBuilder {
    tantivy::schema::Schema::builder()
}

#[test]
fn one_writer_at_a_time_and_memory_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("captions.tantivy");
    let a = TextIndex::rebuild(&path, &library(), stamp(1, 0)).unwrap();
    let TextLoaded::Ready(b) = TextIndex::load(&path, stamp(1, 0)).unwrap() else { panic!() };

    // `a` writes and keeps its writer: `b` (another process, in real life) cannot.
    a.upsert(&[doc(1, "/photos/x.png", Some("a lighthouse"))]).unwrap();
    let err = b.upsert(&[doc(2, "/photos/y.png", Some("a windmill"))]).unwrap_err();
    assert!(matches!(err, TextError::Locked { .. }), "{err:?}");
    assert!(err.to_string().contains("another magpie process"), "{err}");
    assert!(matches!(TextIndex::rebuild(&path, &library(), stamp(2, 0)), Err(TextError::Locked { .. })));

    // A reader that finds the saved index stale meanwhile serves one from memory.
    let mem = TextIndex::in_memory(&library(), stamp(2, 0)).unwrap();
    assert_eq!(mem.dir(), None);
    assert_eq!(ids(&mem, "wedding"), vec![1]);
    mem.upsert(&[doc(8, "/m.png", Some("an owl"))]).unwrap();
    mem.commit(stamp(2, 1)).unwrap();
    assert_eq!(ids(&mem, "owl"), vec![8]);

    a.commit(stamp(1, 1)).unwrap();
    a.release_writer().unwrap();
    b.upsert(&[doc(2, "/photos/y.png", Some("a windmill"))]).unwrap();
    b.commit(stamp(1, 2)).unwrap();
    assert_eq!(ids(&b, "windmill"), vec![2]);
    assert_eq!(ids(&b, "lighthouse"), vec![1], "b sees a's commit after its own reload");
    b.release_writer().unwrap();
    drop((a, b));
    assert_eq!(TextIndex::saved(&path).unwrap().unwrap().stamp, stamp(1, 2));
}

#[test]
fn path_words_are_relative_to_the_roots_parent() {
    let d = TextDoc::new(1, Path::new("/home/me/Pictures/2019_Wedding/IMG_0001.jpg"), Path::new("/home/me/Pictures"), None);
    assert_eq!(d.path_words, "pictures 2019 wedding img 0001 jpg");
    let d = TextDoc::new(1, Path::new("/p/BeachDay.png"), Path::new("/p"), None);
    assert_eq!(d.path_words, "p beach day beachday png");
    // A path outside the root keeps all its words rather than none.
    let d = TextDoc::new(1, Path::new("/elsewhere/cat.png"), Path::new("/home/me/Pictures"), None);
    assert_eq!(d.path_words, "elsewhere cat png");
    assert_eq!(path_words(Path::new("2019_Wedding/IMG cake-cutting.jpg")), "2019 wedding img cake cutting jpg");
}
