//! The `magpie` binary with captions and chat: index --captions, caption, search --mode,
//! ask and chat, with the tiny random-weight CLIP and BLIP-2 fixtures. Their captions are
//! gibberish, so these tests check plumbing and persistence, not wording (the engine's
//! tests check the prompts and ranking with fake models).

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn clip() -> String {
    root().join("tests/fixtures/clip/tiny-a").display().to_string()
}

fn blip2() -> String {
    root().join("tests/fixtures/blip2/tiny-a").display().to_string()
}

fn command(data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_magpie"));
    c.arg("--data-dir")
        .arg(data)
        .args(["--model", &clip(), "--caption-model", &blip2(), "--device", "cpu"])
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("MAGPIE_MODEL")
        .env_remove("MAGPIE_CAPTION_MODEL");
    c
}

fn run(data: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = command(data, args);
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn ok(data: &Path, args: &[&str], stdin: Option<&str>) -> (String, String) {
    let out = run(data, args, stdin);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "magpie {args:?} failed:\n{err}");
    (String::from_utf8(out.stdout).unwrap(), err)
}

fn json(data: &Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&ok(data, &a, None).0).unwrap()
}

/// Two fixture photos, one of them in a folder whose name is the only place a word is.
fn photo_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let photos = root().join("tests/fixtures/photos");
    std::fs::copy(photos.join("rocket.jpg"), dir.path().join("rocket.jpg")).unwrap();
    std::fs::create_dir(dir.path().join("2019_Wedding")).unwrap();
    std::fs::copy(photos.join("chelsea.png"), dir.path().join("2019_Wedding/IMG cake-cutting.png")).unwrap();
    std::fs::copy(photos.join("coins.png"), dir.path().join("coins.png")).unwrap();
    dir
}

#[test]
fn index_with_captions_then_search_caption_ask_and_chat() {
    let photos = photo_folder();
    let data = tempfile::tempdir().unwrap();
    let dir = photos.path().to_str().unwrap();

    // Index, then caption: both reports, in one JSON stream of two documents.
    let (out, _) = ok(data.path(), &["index", dir, "--captions", "--max-new-tokens", "6", "--json"], None);
    let docs: Vec<Value> = serde_json::Deserializer::from_str(&out).into_iter().map(|v| v.unwrap()).collect();
    assert_eq!(docs.len(), 2, "{out}");
    assert_eq!(docs[0]["added"], 3);
    assert_eq!((docs[1]["captioned"].as_u64(), docs[1]["remaining"].as_u64()), (Some(3), Some(0)), "{out}");

    let status = json(data.path(), &["status"]);
    assert_eq!(status["captions"], 3);
    assert_eq!(status["text_index"]["up_to_date"], true);
    assert_eq!(status["text_index"]["documents"], 3);

    // Resumable: nothing left to caption.
    let again = json(data.path(), &["caption", "--all", "--max-new-tokens", "6"]);
    assert_eq!((again["captioned"].as_u64(), again["remaining"].as_u64()), (Some(0), Some(0)));

    // A word only in a folder name, in text and hybrid modes; hits carry their captions.
    let hits = json(data.path(), &["search", "wedding", "--mode", "text"]);
    let hits = hits.as_array().unwrap();
    assert_eq!(hits.len(), 1);
    assert!(hits[0]["path"].as_str().unwrap().ends_with("2019_Wedding/IMG cake-cutting.png"));
    let wedding_id = hits[0]["id"].as_i64().unwrap();
    let stored_caption = hits[0]["caption"].as_str().unwrap().to_string();
    let hybrid = json(data.path(), &["search", "wedding", "-k", "3"]);
    assert_eq!(hybrid[0]["id"].as_i64(), Some(wedding_id), "{hybrid}");
    assert_eq!(hybrid.as_array().unwrap().len(), 3);
    let vector = json(data.path(), &["search", "wedding", "--mode", "vector", "-k", "3"]);
    assert_eq!(vector.as_array().unwrap().len(), 3);
    let bad = run(data.path(), &["search", "x", "--mode", "fuzzy"], None);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown search mode"));

    // Captioning one image again (greedy: deterministic) stores the same caption.
    let one = json(data.path(), &["caption", &wedding_id.to_string(), "--max-new-tokens", "6"]);
    assert_eq!(one["stored"], true);
    assert_eq!(one["caption"].as_str(), Some(stored_caption.as_str()));
    // Precision is a flag: f32 and the default (q8_0 on a CPU) both caption the image.
    for p in ["f32", "q8_0", "f16"] {
        let c = json(data.path(), &["caption", &wedding_id.to_string(), "--max-new-tokens", "6", "--caption-precision", p]);
        assert!(!c["caption"].as_str().unwrap().is_empty(), "{p}: {c}");
    }
    // A file outside the library is captioned but not stored.
    let outside = root().join("tests/fixtures/photos/moon.png");
    let o = json(data.path(), &["caption", outside.to_str().unwrap(), "--max-new-tokens", "3"]);
    assert_eq!((o["stored"].as_bool(), o["id"].is_null()), (Some(false), true));

    // ask: one question, then a second in the same conversation.
    let rocket = photos.path().join("rocket.jpg");
    let rocket = rocket.to_str().unwrap();
    let a1 = json(data.path(), &["ask", rocket, "what is this?", "--max-new-tokens", "4"]);
    let conv = a1["conversation"].as_i64().unwrap();
    assert_eq!(a1["question"], "what is this?");
    let a2 = json(data.path(), &["ask", rocket, "and then?", "--conversation", &conv.to_string(), "--max-new-tokens", "4"]);
    assert_eq!(a2["conversation"].as_i64(), Some(conv));
    // Human output: the answer on stdout, the conversation id on stderr.
    let (out, err) = ok(data.path(), &["ask", rocket, "more?", "--conversation", &conv.to_string(), "--max-new-tokens", "4"], None);
    assert!(out.ends_with('\n'));
    assert!(err.contains(&format!("--conversation {conv}")), "{err}");
    // The conversation is about the rocket, not the wedding photo.
    let wrong = run(data.path(), &["ask", &wedding_id.to_string(), "q", "--conversation", &conv.to_string()], None);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains(&format!("conversation {conv} is about image")));

    // chat: questions from stdin, blank lines skipped, /quit ends; then resumed.
    let (out, err) = ok(data.path(), &["chat", rocket, "--json", "--max-new-tokens", "3"], Some("first\n\n  second \n/quit\nnever asked\n"));
    let answers: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(answers.len(), 2, "{out}");
    assert_eq!(answers[1]["question"], "second");
    let chat_conv = answers[0]["conversation"].as_i64().unwrap();
    assert_ne!(chat_conv, conv);
    assert!(err.contains(&format!("magpie chat --resume {chat_conv}")), "{err}");
    let (out, _) = ok(data.path(), &["chat", "--resume", &chat_conv.to_string(), "--max-new-tokens", "3"], Some("third\n"));
    // Human output replays the history first.
    assert!(out.starts_with("> first\n"), "{out}");
    assert!(out.contains("> second\n"), "{out}");

    // reindex rebuilds both indexes.
    let r = json(data.path(), &["reindex"]);
    assert_eq!((r["vectors"].as_u64(), r["text_documents"].as_u64()), (Some(3), Some(3)));
}

#[test]
fn caption_and_chat_errors_are_clear() {
    let data = tempfile::tempdir().unwrap();
    // No library yet.
    let out = run(data.path(), &["caption", "--all"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("run `magpie index DIR` first"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(data.path(), &["ask", "1", "hi"], None);
    assert!(!out.status.success());
    // A missing captioning model is named.
    let out = run(data.path(), &["caption", "--all", "--caption-model", "/nonexistent/blip"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loading captioning model /nonexistent/blip"));
    // A bad precision is refused by name, with the accepted values.
    let out = run(data.path(), &["caption", "--all", "--caption-precision", "q3"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--caption-precision") && err.contains("q8_0"), "{err}");
    // PATH|ID is required unless --all / --resume.
    assert!(!run(data.path(), &["caption"], None).status.success());
    assert!(!run(data.path(), &["chat"], None).status.success());
}

/// `magpie bench` measures both models and touches no library.
#[test]
fn bench_reports_clip_and_blip2_figures() {
    let data = tempfile::tempdir().unwrap();
    let v = json(data.path(), &["bench", "--seconds", "0", "--batch", "3", "--captions"]);
    let pos = |x: &Value| x.as_f64().is_some_and(|f| f > 0.0 && f.is_finite());
    assert!(pos(&v["clip"]["images_per_s"]["1"]) && pos(&v["clip"]["images_per_s"]["3"]), "{v}");
    assert!(pos(&v["clip"]["text_query_ms"]["8"]), "{v}");
    assert!(pos(&v["clip"]["text_query_ms"]["77"]), "{v}");
    for k in ["vision_s", "token_ms", "caption_s", "caption_s_per_image_batched"] {
        assert!(pos(&v["blip2"][k]), "{k}: {v}");
    }
    assert_eq!(v["blip2"]["batch"], 3);
    assert!(v["device"].as_str().unwrap().starts_with("cpu"));
    assert_eq!(std::fs::read_dir(data.path()).unwrap().count(), 0, "no library is created");
    let bad = run(data.path(), &["bench", "--seconds=-1"], None);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--seconds"));
}
