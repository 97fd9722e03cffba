//! Captions (resumable), the caption index in search (text and hybrid modes), and chat
//! sessions, with fake models (no weights).

mod common;

use common::*;
use image::ImageFormat;
use magpie_core::{Captioner, GenerationOptions, ModelInfo, TextEmbedder, VisualChat};
use magpie_engine::{
    chat_prompt, reciprocal_rank_fusion, CaptionOptions, CaptionProgress, CaptionReport, Error, IndexState, Library,
    Role, SearchMode, TEXT_INDEX,
};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

// ---- fakes ------------------------------------------------------------------------------

const PALETTE: &[&str] = &["red", "green", "blue", "yellow", "magenta", "cyan", "white"];

/// The palette colour nearest to the image's mean colour.
fn mean_colour_name(image: &image::DynamicImage) -> &'static str {
    let rgb = image.to_rgb8();
    let n = (rgb.width() * rgb.height()) as f32;
    let mut mean = [0f32; 3];
    for p in rgb.pixels() {
        for c in 0..3 {
            mean[c] += p.0[c] as f32 / n;
        }
    }
    let dist = |name: &str| {
        let c = colour_named(name).unwrap();
        (0..3).map(|i| (mean[i] - c[i] as f32).powi(2)).sum::<f32>()
    };
    PALETTE.iter().copied().min_by(|a, b| dist(a).total_cmp(&dist(b))).unwrap()
}

/// A stand-in for BLIP-2 captioning: "a {colour} square" from the mean colour, unless
/// the test maps that colour to another sentence.
struct FakeCaptioner {
    model: ModelInfo,
    special: Vec<(&'static str, &'static str)>,
    /// Colours captioned, in order.
    seen: Mutex<Vec<&'static str>>,
    calls: AtomicUsize,
    /// `batch_size()`; above 1, `caption_batch` is overridden and records its batch sizes.
    batch: usize,
    batches: Mutex<Vec<usize>>,
    /// `caption_batch` fails (the engine then captions one by one).
    fail_batches: bool,
}

impl FakeCaptioner {
    fn new(special: &[(&'static str, &'static str)]) -> Arc<Self> {
        Self::with_model("fake/blip2-colour", special)
    }

    fn with_model(id: &str, special: &[(&'static str, &'static str)]) -> Arc<Self> {
        Arc::new(Self {
            model: ModelInfo { id: id.into(), dim: 1 },
            special: special.to_vec(),
            seen: Mutex::new(Vec::new()),
            calls: AtomicUsize::new(0),
            batch: 1,
            batches: Mutex::new(Vec::new()),
            fail_batches: false,
        })
    }

    fn batched(batch: usize, fail_batches: bool) -> Arc<Self> {
        let mut c = Arc::into_inner(Self::new(&[])).unwrap();
        c.batch = batch;
        c.fail_batches = fail_batches;
        Arc::new(c)
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Captioner for FakeCaptioner {
    fn model(&self) -> &ModelInfo {
        &self.model
    }

    fn input_side(&self) -> u32 {
        SIDE
    }

    fn caption(&self, image: &image::DynamicImage, _opts: &GenerationOptions) -> magpie_core::Result<String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let colour = mean_colour_name(image);
        self.seen.lock().unwrap().push(colour);
        let text = match self.special.iter().find(|(c, _)| *c == colour) {
            Some((_, s)) => s.to_string(),
            None => format!("a {colour} square"),
        };
        // Models pad their output; the engine trims it.
        Ok(format!(" {text}\n"))
    }

    fn caption_batch(&self, images: &[&image::DynamicImage], opts: &GenerationOptions) -> magpie_core::Result<Vec<String>> {
        self.batches.lock().unwrap().push(images.len());
        if self.fail_batches {
            return Err(magpie_core::Error::Model("batch failed".into()));
        }
        images.iter().map(|im| self.caption(im, opts)).collect()
    }

    fn batch_size(&self) -> usize {
        self.batch
    }
}

/// A stand-in for BLIP-2 chat: records every prompt, answers "{colour} number {n}"
/// where n counts the questions in the prompt, streamed word by word.
struct FakeChat {
    model: ModelInfo,
    prompts: Mutex<Vec<String>>,
}

impl FakeChat {
    fn new() -> Arc<Self> {
        Arc::new(Self { model: ModelInfo { id: "fake/blip2-chat".into(), dim: 1 }, prompts: Mutex::new(Vec::new()) })
    }

    fn prompts(&self) -> Vec<String> {
        self.prompts.lock().unwrap().clone()
    }
}

impl VisualChat for FakeChat {
    fn model(&self) -> &ModelInfo {
        &self.model
    }

    fn input_side(&self) -> u32 {
        SIDE
    }

    fn answer(
        &self,
        image: &image::DynamicImage,
        prompt: &str,
        _opts: &GenerationOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> magpie_core::Result<String> {
        self.prompts.lock().unwrap().push(prompt.to_string());
        let n = prompt.matches("Question:").count();
        let words = [" ".to_string() + mean_colour_name(image), " number".into(), format!(" {n}")];
        for w in &words {
            on_text(w);
        }
        Ok(words.concat())
    }
}

/// The fake CLIP text model, but any word gets a vector (a neutral grey) instead of
/// an error, as a real text encoder would.
struct AnyText(Arc<FakeEmbedder>);

impl TextEmbedder for AnyText {
    fn model(&self) -> &ModelInfo {
        TextEmbedder::model(self.0.as_ref())
    }

    fn embed_texts(&self, texts: &[&str]) -> magpie_core::Result<Vec<Vec<f32>>> {
        Ok(texts.iter().map(|t| colour_vector(colour_named(t).unwrap_or([128, 128, 128]))).collect())
    }

    fn logit_scale(&self) -> f32 {
        100.0
    }
}

// ---- helpers ----------------------------------------------------------------------------

async fn caption_all(lib: &Library, captioner: &Arc<FakeCaptioner>, cancel_after: Option<u64>) -> (CaptionReport, Vec<CaptionProgress>) {
    let seen = Mutex::new(Vec::new());
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let progress = |p: &CaptionProgress| {
        seen.lock().unwrap().push(p.clone());
        if cancel_after.is_some_and(|n| p.done >= n) {
            flag.store(true, Ordering::SeqCst);
        }
    };
    let c: Arc<dyn Captioner> = captioner.clone();
    let report = lib.caption_all(c, &CaptionOptions::default(), &progress, cancel).await.expect("caption_all");
    (report, seen.into_inner().unwrap())
}

async fn search(lib: &Library, fake: &Arc<FakeEmbedder>, q: &str, mode: SearchMode, root: &Path) -> Vec<String> {
    let text = AnyText(fake.clone());
    names(&lib.search_text_hybrid(&text, q, 5, mode).await.unwrap(), root)
}

async fn caption_of(lib: &Library, path: &Path) -> Option<String> {
    let id = id_of(lib, path).await;
    lib.caption(id).await.unwrap().map(|c| c.text)
}

// ---- captioning -------------------------------------------------------------------------

#[tokio::test]
async fn caption_all_is_resumable_and_per_model() {
    let photos = photos();
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    index(&lib, &photos.root, &fake).await;
    let n = PHOTO_NAMES.len() as u64;
    let captioner = FakeCaptioner::new(&[]);

    // Stopped after three.
    let (first, progress) = caption_all(&lib, &captioner, Some(3)).await;
    assert_eq!(first.captioned, 3, "{first:?}");
    assert!(first.cancelled);
    assert_eq!(first.remaining, n - 3);
    assert!(first.failed.is_empty());
    assert_eq!(captioner.calls(), 3);
    assert_eq!(progress.first().map(|p| (p.total, p.done)), Some((n, 0)));
    assert_eq!(progress.last().map(|p| p.done), Some(3));
    assert_eq!(lib.store().caption_count().await.unwrap(), 3);

    // The rerun captions only the rest, each once.
    let (second, _) = caption_all(&lib, &captioner, None).await;
    assert_eq!((second.captioned, second.remaining, second.cancelled), (n - 3, 0, false));
    assert_eq!(captioner.calls() as u64, n);
    assert_eq!(lib.store().caption_count().await.unwrap(), n);

    // Nothing left: the model is not called at all.
    let (third, progress) = caption_all(&lib, &captioner, None).await;
    assert_eq!((third.captioned, third.remaining), (0, 0));
    assert_eq!(captioner.calls() as u64, n);
    assert_eq!(progress.last().map(|p| (p.total, p.done)), Some((0, 0)));

    // Captions are the trimmed model output, by content.
    assert_eq!(caption_of(&lib, &photos.path("red.png")).await.as_deref(), Some("a red square"));
    assert_eq!(caption_of(&lib, &photos.path("dark-red.png")).await.as_deref(), Some("a red square"));
    assert_eq!(caption_of(&lib, &photos.path("sub/yellow.jpg")).await.as_deref(), Some("a yellow square"));
    let c = lib.caption(id_of(&lib, &photos.path("cyan.bmp")).await).await.unwrap().unwrap();
    assert_eq!(c.model_id, "fake/blip2-colour");

    // Another captioning model captions everything again, replacing the captions.
    let other = FakeCaptioner::with_model("fake/other", &[("red", "a crimson tile")]);
    let (again, _) = caption_all(&lib, &other, None).await;
    assert_eq!(again.captioned, n);
    assert_eq!(caption_of(&lib, &photos.path("red.png")).await.as_deref(), Some("a crimson tile"));
    let mut crimson = search(&lib, &fake, "crimson", SearchMode::Text, &photos.root).await;
    crimson.sort();
    assert_eq!(crimson, ["dark-red.png", "red.png"]);
}

#[tokio::test]
async fn captions_come_in_batches_and_a_bad_file_fails_alone() {
    let photos = photos();
    let n = PHOTO_NAMES.len() as u64;
    for fail_batches in [false, true] {
        let data = data_dir();
        let lib = open(data.path()).await;
        let fake = FakeEmbedder::new();
        index(&lib, &photos.root, &fake).await;
        let gone = photos.path("green.jpg");
        let saved = std::fs::read(&gone).unwrap();
        std::fs::remove_file(&gone).unwrap();
        let captioner = FakeCaptioner::batched(3, fail_batches);
        let (report, progress) = caption_all(&lib, &captioner, None).await;
        std::fs::write(&gone, saved).unwrap();
        assert_eq!(report.captioned, n - 1, "{report:?}");
        assert_eq!(report.failed.len(), 1);
        assert!(report.failed[0].0.ends_with("green.jpg"), "{report:?}");
        // Batches of at most 3 decoded images, covering every file that could be read.
        let batches = captioner.batches.lock().unwrap().clone();
        assert!(batches.iter().all(|&b| (1..=3).contains(&b)) && batches.contains(&3), "{batches:?}");
        assert_eq!(batches.iter().sum::<usize>() as u64, n - 1, "{batches:?}");
        // Progress still counts file by file; a failed batch falls back to single calls.
        assert_eq!(progress.last().map(|p| (p.done, p.failed)), Some((n, 1)));
        assert_eq!(captioner.calls() as u64, n - 1);
        assert_eq!(caption_of(&lib, &photos.path("red.png")).await.as_deref(), Some("a red square"), "fail_batches={fail_batches}");
    }
}

#[tokio::test]
async fn a_file_that_cannot_be_captioned_is_reported_and_offered_again() {
    let photos = photos();
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    index(&lib, &photos.root, &fake).await;
    // Gone from disk since it was indexed (no index run has noticed yet).
    std::fs::remove_file(photos.path("green.jpg")).unwrap();

    let captioner = FakeCaptioner::new(&[]);
    let (report, progress) = caption_all(&lib, &captioner, None).await;
    let n = PHOTO_NAMES.len() as u64;
    assert_eq!(report.captioned, n - 1);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert!(report.failed[0].0.ends_with("green.jpg"));
    assert!(!report.failed[0].1.is_empty());
    assert_eq!(report.remaining, 1);
    assert_eq!(progress.last().map(|p| (p.done, p.failed)), Some((n, 1)));

    // Put back: the next run captions just that one.
    write_image(&photos.path("green.jpg"), &solid(64, 48, colour_named("green").unwrap()), ImageFormat::Jpeg);
    let (report, _) = caption_all(&lib, &captioner, None).await;
    assert_eq!((report.captioned, report.remaining), (1, 0));
    assert_eq!(caption_of(&lib, &photos.path("green.jpg")).await.as_deref(), Some("a green square"));
}

#[tokio::test]
async fn caption_one_replaces_and_resolves_paths() {
    let photos = photos();
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    index(&lib, &photos.root, &fake).await;
    let id = lib.resolve_file(&photos.root.join("sub/../blue.png")).await.unwrap();
    assert_eq!(id, id_of(&lib, &photos.path("blue.png")).await);
    assert!(matches!(lib.resolve_file(&photos.dir.path().join("nope.png")).await, Err(Error::Path { .. })));
    let outside = photos.dir.path().join("outside.png");
    write_image(&outside, &solid(10, 10, [1, 2, 3]), ImageFormat::Png);
    assert!(matches!(lib.resolve_file(&outside).await, Err(Error::NotIndexed(_))));

    let c: Arc<dyn Captioner> = FakeCaptioner::new(&[("blue", "a deep ocean")]);
    let text = lib.caption_one(id, c.clone(), &CaptionOptions::default()).await.unwrap();
    assert_eq!(text, "a deep ocean");
    assert_eq!(search(&lib, &fake, "ocean", SearchMode::Text, &photos.root).await, ["blue.png"]);
    let c2: Arc<dyn Captioner> = FakeCaptioner::new(&[("blue", "a night sky")]);
    lib.caption_one(id, c2, &CaptionOptions::default()).await.unwrap();
    assert!(search(&lib, &fake, "ocean", SearchMode::Text, &photos.root).await.is_empty());
    assert_eq!(search(&lib, &fake, "sky", SearchMode::Text, &photos.root).await, ["blue.png"]);
    assert!(matches!(lib.caption_one(98765, c, &CaptionOptions::default()).await, Err(Error::UnknownId(98765))));

    // Not stored: a file outside the library captioned directly.
    let direct = magpie_engine::caption_file(&outside, FakeCaptioner::new(&[]).as_ref(), &CaptionOptions::default()).unwrap();
    assert!(direct.starts_with("a ") && direct.ends_with(" square"), "{direct}");
}

// ---- search ----------------------------------------------------------------------------

#[tokio::test]
async fn a_word_only_in_a_caption_is_found_by_text_and_ranked_first_by_hybrid() {
    let photos = photos();
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    index(&lib, &photos.root, &fake).await;
    let root = &photos.root;

    // Before captions, "cake" is nowhere in words, and CLIP alone puts blue.png low.
    assert!(search(&lib, &fake, "cake", SearchMode::Text, root).await.is_empty());
    let vector = search(&lib, &fake, "cake", SearchMode::Vector, root).await;
    assert_ne!(vector[0], "blue.png", "{vector:?}");
    let hybrid_before = search(&lib, &fake, "cake", SearchMode::Hybrid, root).await;
    assert_eq!(hybrid_before, vector, "with no text matches, hybrid is the CLIP order");

    caption_all(&lib, &FakeCaptioner::new(&[("blue", "a birthday cake on a table")]), None).await;

    assert_eq!(search(&lib, &fake, "cake", SearchMode::Text, root).await, ["blue.png"]);
    assert_eq!(search(&lib, &fake, "Birthday CAKES!", SearchMode::Text, root).await, ["blue.png"]);
    assert_eq!(search(&lib, &fake, "cake", SearchMode::Vector, root).await, vector, "CLIP mode ignores captions");
    let hits = lib.search_text_hybrid(&AnyText(fake.clone()), "cake", 5, SearchMode::Hybrid).await.unwrap();
    assert_eq!(names(&hits, root)[0], "blue.png");
    assert_eq!(hits.len(), 5);
    assert_eq!(hits[0].caption.as_deref(), Some("a birthday cake on a table"));
    assert_descending(&hits);
    // The fused score: BM25 rank 1 plus blue.png's CLIP rank.
    let clip_rank = vector.iter().position(|n| n == "blue.png").map(|r| r + 1);
    let clip_part = clip_rank.map_or(0.0, |r| 1.0 / (60.0 + r as f32));
    let full = lib.search_text_hybrid(&AnyText(fake.clone()), "cake", 100, SearchMode::Vector).await.unwrap();
    let r = full.iter().position(|h| h.path.ends_with("blue.png")).unwrap() + 1;
    assert!((hits[0].score - (1.0 / 61.0 + 1.0 / (60.0 + r as f32))).abs() < 1e-6, "{} vs rank {r} ({clip_part})", hits[0].score);

    // Where both agree, hybrid agrees too; captions come with every mode's hits.
    assert_eq!(search(&lib, &fake, "red", SearchMode::Hybrid, root).await[0], "red.png");
    let v = lib.search_text_hybrid(fake.as_ref(), "green", 1, SearchMode::Vector).await.unwrap();
    assert_eq!(v[0].caption.as_deref(), Some("a green square"));
    let t = lib.search_text_hybrid(fake.as_ref(), "square", 100, SearchMode::Text).await.unwrap();
    assert_eq!(t.len(), PHOTO_NAMES.len() - 1, "every caption but the cake one");
    assert!(t.iter().all(|h| h.caption.as_deref().is_some_and(|c| c.ends_with("square"))));
    assert!(lib.search_text_hybrid(fake.as_ref(), "square", 0, SearchMode::Hybrid).await.unwrap().is_empty());
    // Text mode never calls the text model (the fake one fails on unknown words).
    assert!(lib.search_text_hybrid(fake.as_ref(), "cake", 3, SearchMode::Text).await.is_ok());
    assert!(lib.search_text_hybrid(fake.as_ref(), "cake", 3, SearchMode::Hybrid).await.is_err());
}

#[tokio::test]
async fn a_word_in_a_folder_name_finds_the_photo_without_captions() {
    let photos = photos();
    write_image(&photos.path("2019_Wedding/IMG_0042.png"), &solid(12, 12, [250, 250, 250]), ImageFormat::Png);
    write_image(&photos.path("BeachDay/shell.png"), &solid(12, 12, [200, 180, 150]), ImageFormat::Png);
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    index(&lib, &photos.root, &fake).await;
    let root = &photos.root;

    assert_eq!(search(&lib, &fake, "wedding", SearchMode::Text, root).await, ["2019_Wedding/IMG_0042.png"]);
    assert_eq!(search(&lib, &fake, "weddings 2019", SearchMode::Text, root).await, ["2019_Wedding/IMG_0042.png"]);
    assert_eq!(search(&lib, &fake, "IMG_0042", SearchMode::Text, root).await, ["2019_Wedding/IMG_0042.png"]);
    assert_eq!(search(&lib, &fake, "beach", SearchMode::Text, root).await, ["BeachDay/shell.png"]);
    assert_eq!(search(&lib, &fake, "yellow", SearchMode::Text, root).await, ["sub/yellow.jpg"], "file names are words too");
    assert_eq!(search(&lib, &fake, "wedding", SearchMode::Hybrid, root).await[0], "2019_Wedding/IMG_0042.png");
    assert_eq!(lib.text_documents(), PHOTO_NAMES.len() as u64 + 2);
}

#[tokio::test]
async fn deleted_and_failed_files_vanish_from_text_search() {
    let photos = photos();
    let data = data_dir();
    let lib = open(data.path()).await;
    let fake = FakeEmbedder::new();
    index(&lib, &photos.root, &fake).await;
    caption_all(&lib, &FakeCaptioner::new(&[]), None).await;
    let root = &photos.root;
    let mut reds = search(&lib, &fake, "red", SearchMode::Text, root).await;
    reds.sort();
    assert_eq!(reds, ["dark-red.png", "red.png"]);
    let docs = lib.text_documents();

    std::fs::remove_file(photos.path("red.png")).unwrap();
    // cyan.bmp turns into a broken file: it fails, and leaves the indexes.
    std::fs::write(photos.path("cyan.bmp"), b"BM not really").unwrap();
    let report = index(&lib, root, &fake).await;
    assert_eq!(report.deleted, 1);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(search(&lib, &fake, "red", SearchMode::Text, root).await, ["dark-red.png"]);
    assert!(search(&lib, &fake, "cyan", SearchMode::Text, root).await.is_empty());
    assert_eq!(lib.text_documents(), docs - 2, "the documents are gone, not just filtered");
    assert!(!search(&lib, &fake, "red", SearchMode::Hybrid, root).await.contains(&"red.png".to_string()));

    // The removal was committed: a reopened library loads the index as it is.
    drop(lib);
    let lib = open(data.path()).await;
    assert_eq!(lib.text_index_state(), &IndexState::Loaded);
    assert_eq!(search(&lib, &fake, "red", SearchMode::Text, root).await, ["dark-red.png"]);
}

#[test]
fn reciprocal_rank_fusion_adds_inverse_ranks() {
    let fused = reciprocal_rank_fusion(&[&[1, 2, 3], &[3, 4]], 60.0);
    let ids: Vec<i64> = fused.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [3, 1, 2, 4], "3 is in both; 2 and 4 tie at rank 2 and the smaller id wins");
    assert!((fused[0].1 - (1.0 / 63.0 + 1.0 / 61.0)).abs() < 1e-7);
    assert!((fused[1].1 - 1.0 / 61.0).abs() < 1e-7);
    assert!(reciprocal_rank_fusion(&[&[], &[]], 60.0).is_empty());
    assert_eq!("TEXT".parse::<SearchMode>().unwrap(), SearchMode::Text);
    assert_eq!(SearchMode::default(), SearchMode::Hybrid);
    assert!("fuzzy".parse::<SearchMode>().is_err());
}

// ---- the caption index as a cache -----------------------------------------------------

#[tokio::test]
async fn the_caption_index_is_rebuilt_when_missing_or_stale_and_left_alone_otherwise() {
    let photos = photos();
    let data = data_dir();
    let fake = FakeEmbedder::new();
    let root = &photos.root;
    {
        let lib = open(data.path()).await;
        assert!(matches!(lib.text_index_state(), IndexState::Rebuilt(_)), "a new library builds it");
        index(&lib, root, &fake).await;
        caption_all(&lib, &FakeCaptioner::new(&[("green", "a meadow in spring")]), None).await;
    }
    // Captions do not invalidate the vector index, and both were saved.
    let lib = open(data.path()).await;
    assert_eq!(lib.index_state(), &IndexState::Loaded);
    assert_eq!(lib.text_index_state(), &IndexState::Loaded);
    let status = Library::status(data.path(), Default::default()).await.unwrap().unwrap();
    assert_eq!(status.captions, PHOTO_NAMES.len() as u64);
    let ti = status.text_index.unwrap();
    assert!(ti.up_to_date);
    assert_eq!(ti.documents, PHOTO_NAMES.len() as u64);
    drop(lib);

    // Files deleted: rebuilt from SQLite, captions included.
    std::fs::remove_dir_all(data.path().join(TEXT_INDEX)).unwrap();
    let status = Library::status(data.path(), Default::default()).await.unwrap().unwrap();
    assert!(status.text_index.is_none());
    let lib = open(data.path()).await;
    match lib.text_index_state() {
        IndexState::Rebuilt(why) => assert!(why.contains("no saved caption index"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(lib.index_state(), &IndexState::Loaded, "the vector index is untouched");
    assert_eq!(search(&lib, &fake, "meadow", SearchMode::Text, root).await, ["green.jpg"]);
    assert_eq!(search(&lib, &fake, "photos", SearchMode::Text, root).await.len(), 5);
    drop(lib);

    // A caption written to SQLite that never reached the index (a crash in between):
    // the stamp differs and the index is rebuilt with it.
    {
        let store = magpie_store::Store::open(data.path().join(magpie_engine::DB_FILE)).await.unwrap();
        let id = store.file_by_path(&photos.path("blue.png")).await.unwrap().unwrap().id;
        store.set_caption(id, "fake/blip2-colour", "a swimming pool").await.unwrap();
        store.close().await;
    }
    let status = Library::status(data.path(), Default::default()).await.unwrap().unwrap();
    assert!(!status.text_index.unwrap().up_to_date);
    let lib = open(data.path()).await;
    match lib.text_index_state() {
        IndexState::Rebuilt(why) => assert!(why.contains("generation"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(lib.index_state(), &IndexState::Loaded);
    assert_eq!(search(&lib, &fake, "pool", SearchMode::Text, root).await, ["blue.png"]);

    // `reindex` rebuilds both.
    let n = lib.rebuild_index().await.unwrap();
    assert_eq!(n, PHOTO_NAMES.len());
    assert_eq!(lib.text_documents(), PHOTO_NAMES.len() as u64);
    assert_eq!(search(&lib, &fake, "pool", SearchMode::Text, root).await, ["blue.png"]);
    drop(lib);
    let lib = open(data.path()).await;
    assert_eq!(lib.text_index_state(), &IndexState::Loaded);
}

#[tokio::test]
async fn a_stale_index_locked_by_another_writer_is_served_from_memory() {
    let photos = photos();
    let data = data_dir();
    let fake = FakeEmbedder::new();
    let root = &photos.root;
    let first = open(data.path()).await;
    index(&first, root, &fake).await;
    drop(first);
    // A caption the saved index lacks, and another process writing that index.
    let store = magpie_store::Store::open(data.path().join(magpie_engine::DB_FILE)).await.unwrap();
    let cyan = store.file_by_path(&photos.path("cyan.bmp")).await.unwrap().unwrap().id;
    store.set_caption(cyan, "fake/blip2-colour", "a frozen pond").await.unwrap();
    store.close().await;
    let other_writer = tantivy_lock(&data.path().join(TEXT_INDEX));

    let lib = open(data.path()).await;
    match lib.text_index_state() {
        IndexState::Rebuilt(why) => assert!(why.contains("in memory"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(search(&lib, &fake, "pond", SearchMode::Text, root).await, ["cyan.bmp"]);
    drop(lib);

    // Once the other writer is done, the folder itself is rebuilt.
    drop(other_writer);
    let lib = open(data.path()).await;
    match lib.text_index_state() {
        IndexState::Rebuilt(why) => assert!(!why.contains("in memory"), "{why}"),
        other => panic!("{other:?}"),
    }
    drop(lib);
    let lib = open(data.path()).await;
    assert_eq!(lib.text_index_state(), &IndexState::Loaded);
    assert_eq!(search(&lib, &fake, "pond", SearchMode::Text, root).await, ["cyan.bmp"]);
}

/// Takes the tantivy writer lock of the index in `dir`, as another process would.
fn tantivy_lock(dir: &Path) -> magpie_index::TextIndex {
    let magpie_index::TextLoaded::Ready(ix) = magpie_index::TextIndex::load(dir, magpie_index::TextIndex::saved(dir).unwrap().unwrap().stamp).unwrap()
    else {
        panic!("saved index not loadable")
    };
    ix.remove(&[-1]).unwrap();
    ix
}

// ---- chat -------------------------------------------------------------------------------

#[tokio::test]
async fn chat_keeps_history_and_resumes_by_id() {
    let photos = photos();
    let data = data_dir();
    let fake = FakeEmbedder::new();
    let (conv, red) = {
        let lib = open(data.path()).await;
        index(&lib, &photos.root, &fake).await;
        let red = id_of(&lib, &photos.path("red.png")).await;
        let chat = FakeChat::new();
        let conv = lib.start_chat(red, &chat.model.id).await.unwrap();

        let mut streamed = String::new();
        let opts = GenerationOptions::default();
        let a1 = lib.ask(conv, "  what is this? ", chat.clone(), &opts, &mut |t| streamed.push_str(t)).await.unwrap();
        assert_eq!(a1, "red number 1");
        assert_eq!(streamed, " red number 1", "pieces arrive as the model makes them");
        let a2 = lib.ask(conv, "is it big?", chat.clone(), &opts, &mut |_| {}).await.unwrap();
        let a3 = lib.ask(conv, "why?", chat.clone(), &opts, &mut |_| {}).await.unwrap();
        assert_eq!((a2.as_str(), a3.as_str()), ("red number 2", "red number 3"));
        assert_eq!(
            chat.prompts(),
            [
                "Question: what is this? Answer:",
                "Question: what is this? Answer: red number 1. Question: is it big? Answer:",
                "Question: what is this? Answer: red number 1. Question: is it big? Answer: red number 2. \
                 Question: why? Answer:",
            ]
        );

        // Bad input writes nothing.
        assert!(matches!(lib.ask(conv, "   ", chat.clone(), &opts, &mut |_| {}).await, Err(Error::EmptyQuestion)));
        assert!(matches!(lib.ask(4242, "hi", chat.clone(), &opts, &mut |_| {}).await, Err(Error::UnknownConversation(4242))));
        assert!(matches!(lib.start_chat(98765, "m").await, Err(Error::UnknownId(98765))));
        assert_eq!(chat.prompts().len(), 3);
        (conv, red)
    };

    // Another process, another day: the conversation resumes from SQLite (opened with
    // the model the library records, as `magpie chat` does without loading CLIP).
    let lib = Library::open_recorded(data.path(), Default::default()).await.unwrap();
    assert_eq!(lib.model(), &model());
    let empty = data_dir();
    assert!(matches!(Library::open_recorded(empty.path(), Default::default()).await, Err(Error::Empty(_))));
    let history = lib.conversation(conv).await.unwrap();
    assert_eq!(history.conversation.file_id, red);
    assert_eq!(history.conversation.model_id, "fake/blip2-chat");
    assert_eq!(history.conversation.title.as_deref(), Some("what is this?"));
    let roles: Vec<Role> = history.messages.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::User, Role::Assistant].repeat(3));
    assert_eq!(history.turns()[1], ("is it big?", "red number 2"));

    let chat = FakeChat::new();
    let a4 = lib.ask(conv, "and now?", chat.clone(), &GenerationOptions::default(), &mut |_| {}).await.unwrap();
    assert_eq!(a4, "red number 4");
    assert_eq!(
        chat.prompts(),
        [chat_prompt(
            &[("what is this?", "red number 1"), ("is it big?", "red number 2"), ("why?", "red number 3")],
            "and now?"
        )]
    );
    assert_eq!(lib.conversation(conv).await.unwrap().messages.len(), 8);

    // A second conversation about another image starts fresh.
    let blue = id_of(&lib, &photos.path("blue.png")).await;
    let other = lib.start_chat(blue, "fake/blip2-chat").await.unwrap();
    assert_ne!(other, conv);
    let a = lib.ask(other, "what is this?", chat.clone(), &GenerationOptions::default(), &mut |_| {}).await.unwrap();
    assert_eq!(a, "blue number 1");
    assert_eq!(chat.prompts().last().unwrap(), "Question: what is this? Answer:");
    assert_eq!(lib.conversations(Some(red)).await.unwrap().len(), 1);
    assert_eq!(lib.conversations(None).await.unwrap().len(), 2);
}
