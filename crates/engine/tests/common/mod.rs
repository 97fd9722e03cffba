//! Shared fixtures for the engine's integration tests: a fake embedder (no weights) and
//! image files written into a temporary folder.
#![allow(dead_code)]

use image::{ImageFormat, Rgb, RgbImage};
use magpie_core::{ImageEmbedder, ModelInfo, Pixels, TextEmbedder};
use magpie_engine::{IndexOptions, IndexReport, Library, LibraryConfig, Progress};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub const SIDE: u32 = 8;
pub const DIM: usize = 16;

pub fn model() -> ModelInfo {
    ModelInfo {
        id: "fake/rgb-quadrants".into(),
        dim: DIM,
    }
}

/// A deterministic stand-in for CLIP. `preprocess` resizes to 8×8 RGB and flattens the
/// pixels (CHW, in [0, 1]); `embed_pixels` takes the mean colour of each 4×4 quadrant
/// (12 values) and the grey-level spread of each quadrant (4 values), plus a small bias
/// so that a black image still has a direction. Text maps colour words to the vector a
/// flat image of that colour would get.
pub struct FakeEmbedder {
    model: ModelInfo,
    /// Images embedded (sum of batch lengths).
    pub embedded: AtomicUsize,
    /// Calls to `embed_pixels`.
    pub calls: AtomicUsize,
    /// Largest batch seen.
    pub max_batch: AtomicUsize,
}

impl FakeEmbedder {
    pub fn new() -> Arc<Self> {
        Self::with_model(model())
    }

    pub fn with_model(model: ModelInfo) -> Arc<Self> {
        Arc::new(Self {
            model,
            embedded: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
            max_batch: AtomicUsize::new(0),
        })
    }

    pub fn embedded(&self) -> usize {
        self.embedded.load(Ordering::SeqCst)
    }

    pub fn image(self: &Arc<Self>) -> Arc<dyn ImageEmbedder> {
        self.clone()
    }
}

const BIAS: f32 = 0.01;

fn normalize(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

/// The fake embedding of a flat image of colour `rgb` (0–255).
pub fn colour_vector(rgb: [u8; 3]) -> Vec<f32> {
    let mut v = vec![BIAS; DIM];
    for q in 0..4 {
        for c in 0..3 {
            v[q * 3 + c] += rgb[c] as f32 / 255.0;
        }
    }
    normalize(v)
}

impl ImageEmbedder for FakeEmbedder {
    fn model(&self) -> &ModelInfo {
        &self.model
    }

    fn input_side(&self) -> u32 {
        SIDE
    }

    fn preprocess(&self, image: &image::DynamicImage) -> magpie_core::Result<Pixels> {
        let rgb = image::imageops::resize(&image.to_rgb8(), SIDE, SIDE, image::imageops::FilterType::Triangle);
        let (w, h) = (SIDE as usize, SIDE as usize);
        let mut data = vec![0f32; 3 * w * h];
        for (x, y, p) in rgb.enumerate_pixels() {
            for c in 0..3 {
                data[c * w * h + y as usize * w + x as usize] = p.0[c] as f32 / 255.0;
            }
        }
        Ok(Pixels {
            channels: 3,
            height: h,
            width: w,
            data,
        })
    }

    fn embed_pixels(&self, batch: &[Pixels]) -> magpie_core::Result<Vec<Vec<f32>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.embedded.fetch_add(batch.len(), Ordering::SeqCst);
        self.max_batch.fetch_max(batch.len(), Ordering::SeqCst);
        Ok(batch
            .iter()
            .map(|p| {
                assert_eq!((p.channels, p.height, p.width), (3, SIDE as usize, SIDE as usize));
                let (w, h) = (p.width, p.height);
                let mut v = vec![BIAS; DIM];
                for q in 0..4 {
                    let (x0, y0) = ((q % 2) * w / 2, (q / 2) * h / 2);
                    let mut grey = Vec::new();
                    for c in 0..3 {
                        let mut sum = 0.0;
                        for y in y0..y0 + h / 2 {
                            for x in x0..x0 + w / 2 {
                                sum += p.data[c * w * h + y * w + x];
                            }
                        }
                        v[q * 3 + c] += sum / (w * h / 4) as f32;
                    }
                    for y in y0..y0 + h / 2 {
                        for x in x0..x0 + w / 2 {
                            grey.push((0..3).map(|c| p.data[c * w * h + y * w + x]).sum::<f32>() / 3.0);
                        }
                    }
                    let mean = grey.iter().sum::<f32>() / grey.len() as f32;
                    let var = grey.iter().map(|g| (g - mean).powi(2)).sum::<f32>() / grey.len() as f32;
                    v[12 + q] += var.sqrt();
                }
                normalize(v)
            })
            .collect())
    }
}

impl TextEmbedder for FakeEmbedder {
    fn model(&self) -> &ModelInfo {
        &self.model
    }

    fn embed_texts(&self, texts: &[&str]) -> magpie_core::Result<Vec<Vec<f32>>> {
        texts
            .iter()
            .map(|t| match colour_named(t) {
                Some(rgb) => Ok(colour_vector(rgb)),
                None => Err(magpie_core::Error::Model(format!("fake text model knows no `{t}`"))),
            })
            .collect()
    }

    fn logit_scale(&self) -> f32 {
        100.0
    }
}

pub fn colour_named(name: &str) -> Option<[u8; 3]> {
    Some(match name.trim().to_ascii_lowercase().as_str() {
        "red" => [220, 20, 20],
        "green" => [20, 200, 30],
        "blue" => [20, 30, 220],
        "yellow" => [230, 220, 20],
        "magenta" => [210, 20, 200],
        "cyan" => [20, 210, 210],
        "white" => [250, 250, 250],
        _ => return None,
    })
}

pub fn solid(w: u32, h: u32, rgb: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb(rgb))
}

pub fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), format)
        .expect("encode");
    out
}

/// Writes `img` in `format` to `path` (creating parent folders), whatever the extension.
pub fn write_image(path: &Path, img: &RgbImage, format: ImageFormat) -> PathBuf {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, encode(img, format)).unwrap();
    path.to_path_buf()
}

/// Sets a file's mtime, so that change detection never depends on the clock's grain.
pub fn set_mtime(path: &Path, t: SystemTime) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(t).unwrap();
}

/// Moves a file's mtime `secs` into the past.
pub fn age(path: &Path, secs: u64) {
    let t = std::fs::metadata(path).unwrap().modified().unwrap() - Duration::from_secs(secs);
    set_mtime(path, t);
}

/// The colour folder most tests index. Names map to their colour word (or to the
/// special patterns); `magenta.gif` is a PNG under a wrong extension and `sub/yellow.jpg`
/// sits in a subfolder.
pub struct Photos {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
}

impl Photos {
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

pub const PHOTO_NAMES: &[&str] = &[
    "red.png",
    "green.jpg",
    "blue.png",
    "sub/yellow.jpg",
    "magenta.gif",
    "cyan.bmp",
    "dark-red.png",
    "split.png",
];

pub fn photos() -> Photos {
    let dir = tempfile::tempdir().unwrap();
    // Canonical, so that paths compare equal to what the engine stores.
    let root = std::fs::canonicalize(dir.path()).unwrap().join("photos");
    std::fs::create_dir_all(&root).unwrap();
    let c = |n| colour_named(n).unwrap();
    write_image(&root.join("red.png"), &solid(40, 30, c("red")), ImageFormat::Png);
    write_image(&root.join("green.jpg"), &solid(64, 48, c("green")), ImageFormat::Jpeg);
    write_image(&root.join("blue.png"), &solid(30, 40, c("blue")), ImageFormat::Png);
    write_image(
        &root.join("sub/yellow.jpg"),
        &solid(50, 50, c("yellow")),
        ImageFormat::Jpeg,
    );
    write_image(
        &root.join("magenta.gif"),
        &solid(20, 20, c("magenta")),
        ImageFormat::Png,
    );
    write_image(&root.join("cyan.bmp"), &solid(16, 12, c("cyan")), ImageFormat::Bmp);
    // Close to red but not red: the nearest neighbour of red.png.
    write_image(
        &root.join("dark-red.png"),
        &solid(24, 24, [150, 30, 25]),
        ImageFormat::Png,
    );
    // Left half red, right half blue.
    let mut split = solid(32, 32, c("blue"));
    for y in 0..32 {
        for x in 0..16 {
            split.put_pixel(x, y, Rgb(c("red")));
        }
    }
    write_image(&root.join("split.png"), &split, ImageFormat::Png);
    // Different, fixed mtimes in the past, so a rewrite now always changes the mtime.
    for name in PHOTO_NAMES {
        age(&root.join(name), 3600);
    }
    Photos { dir, root }
}

/// A data directory for a library, beside (not inside) the photos.
pub fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub async fn open(dir: &Path) -> Library {
    Library::open(dir, &model(), LibraryConfig::default())
        .await
        .expect("open library")
}

pub fn opts() -> IndexOptions {
    IndexOptions {
        batch_size: 3,
        decode_threads: 2,
        ..IndexOptions::default()
    }
}

pub async fn index(lib: &Library, root: &Path, fake: &Arc<FakeEmbedder>) -> IndexReport {
    lib.index(&[root.to_path_buf()], fake.image(), &opts(), &|_| {})
        .await
        .expect("index")
}

/// Runs an index job, recording every progress snapshot.
pub async fn index_recording(
    lib: &Library,
    root: &Path,
    fake: &Arc<FakeEmbedder>,
    opts: &IndexOptions,
    cancel_when_done: Option<u64>,
) -> (IndexReport, Vec<Progress>) {
    let seen = Mutex::new(Vec::new());
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let progress = |p: &Progress| {
        seen.lock().unwrap().push(p.clone());
        if cancel_when_done.is_some_and(|n| p.done >= n) {
            flag.store(true, Ordering::SeqCst);
        }
    };
    let report = lib
        .index_cancellable(&[root.to_path_buf()], fake.image(), opts, &progress, cancel)
        .await
        .expect("index");
    (report, seen.into_inner().unwrap())
}

/// File names (relative to `root`) of the hits, best first.
pub fn names(hits: &[magpie_engine::SearchHit], root: &Path) -> Vec<String> {
    hits.iter()
        .map(|h| {
            Path::new(&h.path)
                .strip_prefix(root)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| h.path.clone())
        })
        .collect()
}

pub fn assert_descending(hits: &[magpie_engine::SearchHit]) {
    for w in hits.windows(2) {
        assert!(
            w[0].score >= w[1].score,
            "scores not descending: {} then {}",
            w[0].score,
            w[1].score
        );
    }
}

pub async fn id_of(lib: &Library, path: &Path) -> i64 {
    lib.store()
        .file_by_path(path)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{} not in the store", path.display()))
        .id
}
