//! `magpie duplicates` on generated variants of the fixture photos (which come from the
//! shared photo set): exact copies, resized, re-encoded and slightly cropped copies must
//! group with their original, and different photos must not group together.

use magpie_media::image::{imageops::FilterType, DynamicImage};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn magpie(data: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_magpie"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

fn load(name: &str) -> DynamicImage {
    magpie_media::decode_file(&root().join("tests/fixtures/photos").join(name), &Default::default()).unwrap().image
}

#[test]
fn duplicates_group_copies_and_variants_but_not_different_photos() {
    let photos = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let originals = ["chelsea.png", "rocket.jpg", "motorcycle_wide.png", "coins.png", "moon.png"];
    for name in originals {
        let stem = name.split('.').next().unwrap();
        let img = load(name);
        let (w, h) = (img.width(), img.height());
        let dir = photos.path().join(stem);
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(root().join("tests/fixtures/photos").join(name), dir.join(name)).unwrap();
        // An exact copy elsewhere, a resized copy, a re-encoded JPEG, a cropped copy.
        std::fs::copy(root().join("tests/fixtures/photos").join(name), photos.path().join(format!("copy-of-{name}"))).unwrap();
        img.resize(w * 3 / 5, h * 3 / 5, FilterType::Triangle).to_rgb8().save(dir.join(format!("{stem}-small.png"))).unwrap();
        let mut jpeg = Vec::new();
        magpie_media::image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 70).encode_image(&img.to_rgb8()).unwrap();
        std::fs::write(dir.join(format!("{stem}-q70.jpg")), jpeg).unwrap();
        img.crop_imm(w / 100, h / 100, w - 2 * (w / 100), h - 2 * (h / 100)).to_rgb8().save(dir.join(format!("{stem}-cropped.png"))).unwrap();
    }
    // The random-weight test models are far less invariant than a trained CLIP: with
    // tiny-b these variants stay at cosine ≥ 0.959 to their original while different
    // photos stay ≤ 0.59 (tiny-a drops below 0.95 for a 3% crop of coins.png).
    let model = root().join("tests/fixtures/clip/tiny-b");
    let out = magpie(data.path(), &["--model", model.to_str().unwrap(), "index", photos.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = magpie(data.path(), &["duplicates", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    let stems = |files: &Value| -> BTreeSet<String> {
        files
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let p = f["path"].as_str().unwrap();
                let file = p.rsplit('/').next().unwrap();
                let file = file.strip_prefix("copy-of-").unwrap_or(file);
                file.split(['.', '-']).next().unwrap().to_string()
            })
            .collect()
    };
    // Exact: each original with its copy.
    let exact = d["exact"].as_array().unwrap();
    assert_eq!(exact.len(), originals.len(), "{d:#}");
    for g in exact {
        assert_eq!(g["files"].as_array().unwrap().len(), 2);
        assert_eq!(stems(&g["files"]).len(), 1, "{g}");
    }
    // Near: one group per original, holding its 5 files, never two photos together.
    let near = d["near"].as_array().unwrap();
    let mut seen = BTreeSet::new();
    for g in near {
        let s = stems(&g["files"]);
        assert_eq!(s.len(), 1, "a near group mixes different photos: {g:#}");
        assert!(g["min_cosine"].as_f64().unwrap() >= 0.95);
        seen.insert(s.into_iter().next().unwrap());
        assert_eq!(g["files"].as_array().unwrap().len(), 5, "{g:#}");
    }
    let want: BTreeSet<String> = originals.iter().map(|n| n.split('.').next().unwrap().to_string()).collect();
    assert_eq!(seen, want, "{d:#}");
    // Exact only; and the text report.
    let out = magpie(data.path(), &["duplicates", "--exact-only", "--json"]);
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(d["near"].as_array().unwrap().is_empty());
    let text = String::from_utf8(magpie(data.path(), &["duplicates"]).stdout).unwrap();
    assert!(text.contains("5 groups of exact copies") && text.contains("5 groups of near-duplicates"), "{text}");
    let bad = magpie(data.path(), &["duplicates", "--threshold", "2"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--threshold"));
}
