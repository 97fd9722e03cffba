//! Parity of magpie's CLIP with Hugging Face `transformers` on the random-weight fixtures
//! that `scripts/fixtures/make_clip.py` writes (reference outputs in expected.*).

use candle_core::{Device, Tensor};
use magpie_core::{ImageEmbedder, TextEmbedder};
use magpie_models::loader::ModelDir;
use magpie_models::{Clip, ClipPrecision};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const MODELS: [&str; 2] = ["tiny-a", "tiny-b"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Fixture {
    clip: Clip,
    json: serde_json::Value,
    t: HashMap<String, Tensor>,
}

fn load(name: &str) -> Fixture {
    let dir = fixtures().join("clip").join(name);
    let clip = Clip::from_dir(&ModelDir { id: dir.display().to_string(), dir: dir.clone() }, magpie_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let t = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    Fixture { clip, json, t }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

fn ids(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()).collect()
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    let d: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    d / (n(a) * n(b))
}

#[test]
fn token_ids_are_identical() {
    for name in MODELS {
        let f = load(name);
        for (texts, key) in [("texts", "input_ids"), ("labels", "label_input_ids")] {
            let texts = strings(&f.json[texts]);
            let want = ids(&f.json[key]);
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let got = f.clip.tokenize(&refs).unwrap();
            assert!(texts.len() >= 5);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "{name}: text {i} {:?}", texts[i]);
                assert!(g.len() <= 77);
            }
        }
        // Over-long texts are truncated to the context length and still end with EOS.
        let long = "a very long caption ".repeat(60);
        let t = f.clip.tokenize(&[long.as_str()]).unwrap();
        assert_eq!(t[0].len(), 77);
        assert_eq!(*t[0].last().unwrap(), 49407);
    }
}

#[test]
fn text_embeddings_match_reference() {
    for name in MODELS {
        let f = load(name);
        let texts = strings(&f.json["texts"]);
        let want: Vec<Vec<f32>> = f.t["text_embeds"].to_vec2().unwrap();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        // Batched (padded) and one at a time must both match.
        let batched = f.clip.embed_texts(&refs).unwrap();
        let mut worst = 1.0f32;
        for (i, w) in want.iter().enumerate() {
            let single = f.clip.embed_texts(&[refs[i]]).unwrap();
            worst = worst.min(cos(&single[0], w)).min(cos(&batched[i], w));
        }
        println!("{name}: worst text cosine {worst:.6} over {} texts", texts.len());
        assert!(worst >= 0.9999, "{name}: worst text cosine {worst}");
        assert_eq!(batched[0].len(), f.clip.info().dim);
    }
}

#[test]
fn image_embeddings_from_reference_pixels_match() {
    for name in MODELS {
        let f = load(name);
        let got = f.clip.embed_pixel_tensor(&f.t["pixel_values"]).unwrap();
        let want: Vec<Vec<f32>> = f.t["image_embeds"].to_vec2().unwrap();
        assert_eq!(got.len(), want.len());
        let worst = got.iter().zip(&want).map(|(g, w)| cos(g, w)).fold(1.0f32, f32::min);
        println!("{name}: worst image cosine {worst:.6} over {} images", got.len());
        assert!(worst >= 0.9999, "{name}: worst image cosine {worst}");
    }
}

#[test]
fn zero_shot_probabilities_match() {
    for name in MODELS {
        let f = load(name);
        let labels = strings(&f.json["labels"]);
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        let l = f.clip.embed_texts(&refs).unwrap();
        let imgs = f.clip.embed_pixel_tensor(&f.t["pixel_values"]).unwrap();
        let scale = f.clip.logit_scale();
        let want_scale = f.json["logit_scale"].as_f64().unwrap() as f32;
        assert!((scale - want_scale).abs() < 1e-3 * want_scale, "{scale} vs {want_scale}");
        let want: Vec<Vec<f32>> = f.t["zero_shot_probs"].to_vec2().unwrap();
        let mut worst = 0f32;
        for (img, w) in imgs.iter().zip(&want) {
            let logits: Vec<f32> = l.iter().map(|t| scale * cos(img, t)).collect();
            let m = logits.iter().cloned().fold(f32::MIN, f32::max);
            let e: Vec<f32> = logits.iter().map(|x| (x - m).exp()).collect();
            let s: f32 = e.iter().sum();
            for (p, q) in e.iter().map(|x| x / s).zip(w) {
                worst = worst.max((p - q).abs());
            }
        }
        println!("{name}: max zero-shot probability difference {worst:.2e}");
        assert!(worst <= 1e-3, "{name}: {worst}");
    }
}

/// Copies a fixture model into a temp dir with its weights changed by `edit`.
fn edited_model(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> (tempfile::TempDir, ModelDir) {
    let src = fixtures().join("clip/tiny-a");
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    std::fs::copy(fixtures().join("clip/tokenizer.json"), tmp.path().join("tokenizer.json")).unwrap();
    let mut w = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut w);
    candle_core::safetensors::save(&w, tmp.path().join("model.safetensors")).unwrap();
    let dir = ModelDir { id: tmp.path().display().to_string(), dir: tmp.path().to_path_buf() };
    (tmp, dir)
}

fn load_err(dir: &ModelDir) -> String {
    match Clip::from_dir(dir, magpie_core::Device::Cpu) {
        Ok(_) => panic!("loading should fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_tensor_is_checked() {
    let name = "text_model.encoder.layers.1.mlp.fc2.bias";
    let (_t, dir) = edited_model(|w| {
        w.remove(name).unwrap();
    });
    let e = load_err(&dir);
    assert!(e.contains(name) && e.contains("missing") && e.contains("model.safetensors"), "{e}");

    let (_t, dir) = edited_model(|w| {
        let t = w.remove("visual_projection.weight").unwrap();
        let (a, b) = t.dims2().unwrap();
        w.insert("visual_projection.weight".into(), Tensor::zeros((a, b + 1), t.dtype(), &Device::Cpu).unwrap());
    });
    let e = load_err(&dir);
    assert!(e.contains("visual_projection.weight") && e.contains("shape"), "{e}");

    let (_t, dir) = edited_model(|w| {
        w.insert("vision_model.extra_head.weight".into(), Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap());
    });
    let e = load_err(&dir);
    assert!(e.contains("vision_model.extra_head.weight") && e.contains("not used"), "{e}");

    // The untouched copy loads, so the failures above come from the edits.
    let (_t, dir) = edited_model(|_| {});
    Clip::from_dir(&dir, magpie_core::Device::Cpu).unwrap();
}

#[test]
fn bad_config_names_the_file_and_field() {
    let (tmp, dir) = edited_model(|_| {});
    let cfg = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"quick_gelu\"", "\"swishy\"");
    std::fs::write(&cfg, text).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("config.json") && e.contains("swishy"), "{e}");

    let missing = ModelDir { id: "x".into(), dir: tmp.path().join("nope") };
    assert!(load_err(&missing).contains("nope"));
    assert!(magpie_models::loader::resolve("/definitely/not/here", &["config.json"], &[]).unwrap_err().to_string().contains("no such directory"));
}

#[test]
fn model_id_is_stable_and_distinguishes_models() {
    let a = load("tiny-a");
    let b = load("tiny-b");
    assert_ne!(a.clip.info().id, b.clip.info().id);
    assert!(a.clip.info().id.starts_with("tiny-a@"));
    assert_eq!(a.clip.info().id, load("tiny-a").clip.info().id);
    assert_eq!(ImageEmbedder::model(&a.clip).dim, a.t["image_embeds"].dim(1).unwrap());
}

/// Our own decode (magpie-media: EXIF turn, RGBA, 16-bit, grayscale) + preprocessing
/// against `CLIPProcessor`'s pixel values, and the embeddings they give.
#[test]
fn own_preprocessing_matches_processor() {
    for name in MODELS {
        let f = load(name);
        let images = strings(&f.json["images"]);
        let want_px = &f.t["pixel_values"];
        let want_emb: Vec<Vec<f32>> = f.t["image_embeds"].to_vec2().unwrap();
        let mut worst_px = 0f32;
        let mut worst_cos = 1f32;
        for (i, rel) in images.iter().enumerate() {
            let path = fixtures().join(rel);
            let decoded = magpie_media::decode_file(&path, &magpie_media::DecodeOptions::default()).unwrap();
            let px = f.clip.preprocess(&decoded.image).unwrap();
            let want: Vec<f32> = want_px.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(px.data.len(), want.len(), "{name} {rel}");
            let mad = px.data.iter().zip(&want).map(|(a, b)| (a - b).abs()).sum::<f32>() / want.len() as f32;
            let emb = f.clip.embed_pixels(&[px]).unwrap();
            let c = cos(&emb[0], &want_emb[i]);
            println!("{name} {rel}: mean |Δpixel| {mad:.2e}, cosine {c:.6}");
            worst_px = worst_px.max(mad);
            worst_cos = worst_cos.min(c);
        }
        assert!(worst_px <= 0.01, "{name}: mean abs pixel difference {worst_px}");
        assert!(worst_cos >= 0.99, "{name}: cosine {worst_cos}");
    }
}

/// The worst image and text cosines of `clip`'s embeddings against fixture `f`'s reference.
fn worst_cosines(clip: &Clip, f: &Fixture) -> (f32, f32) {
    let got = clip.embed_pixel_tensor(&f.t["pixel_values"]).unwrap();
    let want: Vec<Vec<f32>> = f.t["image_embeds"].to_vec2().unwrap();
    let img = got.iter().zip(&want).map(|(g, w)| cos(g, w)).fold(1.0f32, f32::min);
    let texts = strings(&f.json["texts"]);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let want: Vec<Vec<f32>> = f.t["text_embeds"].to_vec2().unwrap();
    let got = clip.embed_texts(&refs).unwrap();
    (img, got.iter().zip(&want).map(|(g, w)| cos(g, w)).fold(1.0f32, f32::min))
}

#[test]
fn bf16_kernels_stay_within_a_thousandth_of_the_reference() {
    if !magpie_models::bf16_gemm::available() {
        eprintln!("this CPU has no AVX-512 BF16: the bf16 path falls back to f32");
        let dir = fixtures().join("clip/tiny-a");
        let c = Clip::from_dir_with(&ModelDir { id: "x".into(), dir }, magpie_core::Device::Cpu, ClipPrecision::Bf16).unwrap();
        assert_eq!(c.precision(), "f32");
        return;
    }
    for name in MODELS {
        let f = load(name);
        let dir = fixtures().join("clip").join(name);
        let clip = Clip::from_dir_with(&ModelDir { id: dir.display().to_string(), dir }, magpie_core::Device::Cpu, ClipPrecision::Bf16).unwrap();
        assert_eq!(clip.precision(), "bf16");
        assert!(clip.clip_model().vision_model.patch_embedding_is_bf16());
        assert!(!f.clip.clip_model().vision_model.patch_embedding_is_bf16());
        assert_eq!(clip.info(), f.clip.info(), "same model id whatever the precision");
        let (worst_img, worst_txt) = worst_cosines(&clip, &f);
        println!("{name} bf16: worst image cosine {worst_img:.6}, worst text cosine {worst_txt:.6}");
        // Issue 6's bar for making bf16 the default. Measured (image / text): tiny-a
        // 0.99989 / 0.99988, tiny-b 0.99998 / 0.99988 (0.99994 and 0.999996 for the images
        // with the patch embedding in f32). The image tower keeps its Q and K
        // projections in f32 (three bf16 terms on AMX), V is bf16: with Q and K in one bf16
        // term tiny-a's images fell to 0.9977 (the fixtures' sharp random attention
        // amplifies errors in Q·Kᵀ); the text tower's are bf16.
        assert!(worst_img >= 0.999 && worst_txt >= 0.999, "{name}: {worst_img} / {worst_txt}");
        let auto = Clip::from_dir_with(&ModelDir { id: "auto".into(), dir: fixtures().join("clip").join(name) }, magpie_core::Device::Cpu, ClipPrecision::Auto).unwrap();
        // Auto picks bf16 where it measured at least 1.1× f32's speed (in an optimised
        // build; a debug build keeps f32).
        let fast = magpie_models::bf16_gemm::speedup_over_f32(magpie_models::cpu::Isa::detect()).unwrap() >= magpie_models::clip::AUTO_BF16_SPEEDUP;
        assert_eq!(magpie_models::clip::auto_takes_bf16(magpie_models::cpu::Isa::detect()), fast && !cfg!(debug_assertions));
        assert_eq!(auto.precision(), if fast && !cfg!(debug_assertions) { "bf16" } else { "f32" });
        // And it is not secretly f32.
        let exact = f.clip.embed_pixel_tensor(&f.t["pixel_values"]).unwrap();
        assert!(clip.embed_pixel_tensor(&f.t["pixel_values"]).unwrap()[0] != exact[0]);
    }
}

/// The candle path in f16, as GPUs run it (here on the CPU): embeddings within cosine
/// 0.999 of the reference (issue 7's bar), LayerNorms and softmax kept in f32.
#[test]
fn f16_weights_stay_within_a_thousandth_of_the_reference() {
    for name in MODELS {
        let f = load(name);
        let dir = fixtures().join("clip").join(name);
        let clip = Clip::from_dir_dtype(&ModelDir { id: "f16".into(), dir }, candle_core::Device::Cpu, ClipPrecision::F32, candle_core::DType::F16).unwrap();
        assert_eq!(clip.precision(), "f16");
        let (worst_img, worst_txt) = worst_cosines(&clip, &f);
        println!("{name} f16: worst image cosine {worst_img:.6}, worst text cosine {worst_txt:.6}");
        assert!(worst_img >= 0.999 && worst_txt >= 0.999, "{name}: {worst_img} / {worst_txt}");
        assert!(worst_img < 1.0, "f16 must really be f16");
    }
}
