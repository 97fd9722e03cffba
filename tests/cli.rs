//! The `magpie` binary as a new user runs it: index a folder of real photos with the tiny
//! fixture model, then search, similar, embed, status, reindex, with and without --json.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model() -> String {
    root().join("tests/fixtures/clip/tiny-a").display().to_string()
}

fn magpie(data: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_magpie"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("MAGPIE_MODEL")
        .output()
        .unwrap();
    out
}

fn ok(data: &Path, args: &[&str]) -> String {
    let out = magpie(data, args);
    assert!(out.status.success(), "magpie {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn json(data: &Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&ok(data, &a)).unwrap()
}

/// A photo folder: the fixture photos, a truncated JPEG, a text file named .jpg, and a
/// README that is not an image at all.
fn photo_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(root().join("tests/fixtures/photos")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "png" || x == "jpg") {
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let jpeg = std::fs::read(root().join("tests/fixtures/photos/rocket.jpg")).unwrap();
    std::fs::write(dir.path().join("broken.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    std::fs::write(dir.path().join("notes.jpg"), "not a picture\n").unwrap();
    std::fs::write(dir.path().join("README.txt"), "holiday photos\n").unwrap();
    dir
}

#[test]
fn index_search_similar_embed_status() {
    let photos = photo_folder();
    let data = tempfile::tempdir().unwrap();
    let m = model();
    let n_images = std::fs::read_dir(photos.path()).unwrap().count() - 3;

    // Global options are accepted after the subcommand too.
    let report = json(data.path(), &["index", photos.path().to_str().unwrap(), "--model", &m]);
    assert_eq!(report["added"].as_u64().unwrap() as usize, n_images, "{report}");
    let failed: Vec<String> = report["failed"].as_array().unwrap().iter().map(|f| f[0].as_str().unwrap().to_string()).collect();
    assert_eq!(failed.len(), 2, "{report}");
    assert!(failed.iter().any(|p| p.ends_with("broken.jpg")) && failed.iter().any(|p| p.ends_with("notes.jpg")));
    assert_eq!(report["ignored"], 1);

    // Human output names the skipped files with their reasons.
    let again = ok(data.path(), &["--model", &m, "index", photos.path().to_str().unwrap()]);
    assert!(again.contains("0 new, 0 updated") && again.contains(&format!("{} unchanged", n_images + 2)), "{again}");

    let status = json(data.path(), &["status"]);
    assert_eq!(status["counts"]["indexed"].as_u64().unwrap() as usize, n_images);
    assert_eq!(status["counts"]["failed"], 2);
    assert!(status["model"]["id"].as_str().unwrap().starts_with("tiny-a@"));
    assert_eq!(status["index"]["up_to_date"], true);
    // The CPU kernels and the precision CLIP runs in, and --precision f32 forcing f32.
    let prec = status["compute"]["clip_precision"].as_str().unwrap();
    assert!(prec == "bf16" || prec == "f32", "{status}");
    // Auto takes bf16 where the CPU has BF16 dot products (AVX-512 or AMX) and they
    // measured at least 1.1× f32's speed here, in an optimised build (a debug build's
    // race times unoptimised kernels, and auto keeps f32 there).
    let cpu = status["compute"]["cpu"].as_str().unwrap();
    let speedup = status["compute"]["bf16_speedup"].as_f64();
    assert_eq!(speedup.is_some(), cpu == "avx512bf16" || cpu == "amx", "{status}");
    assert_eq!(prec == "bf16", speedup.is_some_and(|s| s >= 1.1) && !cfg!(debug_assertions), "{status}");
    assert_eq!(json(data.path(), &["--precision", "f32", "status"])["compute"]["clip_precision"], "f32");
    assert!(!magpie(data.path(), &["--precision", "f8", "status"]).status.success());
    let human = ok(data.path(), &["status"]);
    assert!(human.contains(&format!("compute   CLIP in {prec} on the CPU")), "{human}");
    // Capped by MAGPIE_CPU_ISA, auto is f32 on the AVX2 kernels, and says why.
    let capped = Command::new(env!("CARGO_BIN_EXE_magpie"))
        .args(["--data-dir", data.path().to_str().unwrap(), "status"])
        .env("MAGPIE_CPU_ISA", "avx2")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let capped = String::from_utf8(capped.stdout).unwrap();
    assert!(capped.contains("compute   CLIP in f32 on the CPU ("), "{capped}");
    if cpu == "avx512bf16" || cpu == "amx" {
        assert!(capped.contains("avx2 kernels; MAGPIE_CPU_ISA keeps"), "{capped}");
    }
    assert!(human.contains("indexed") && human.contains("tiny-a@") && human.contains("up to date"), "{human}");

    let hits = json(data.path(), &["--model", &m, "search", "a photo of a cat", "-k", "3"]);
    let hits = hits.as_array().unwrap();
    assert_eq!(hits.len(), 3);
    let scores: Vec<f64> = hits.iter().map(|h| h["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");

    // The query photo finds itself first when given as a path (its stored vector) …
    let chelsea = photos.path().join("chelsea.png");
    let sim = json(data.path(), &["--model", &m, "similar", chelsea.to_str().unwrap(), "-k", "4"]);
    let sim = sim.as_array().unwrap();
    assert_eq!(sim.len(), 4);
    assert!(sim.iter().all(|h| !h["path"].as_str().unwrap().ends_with("/chelsea.png")), "itself excluded");
    // … and the same neighbours come back by id.
    let id = json(data.path(), &["--model", &m, "search", "cat", "-k", "50"])
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["path"].as_str().unwrap().ends_with("/chelsea.png"))
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    let by_id = json(data.path(), &["--model", &m, "similar", &id.to_string(), "-k", "4"]);
    assert_eq!(by_id.as_array().unwrap().iter().map(|h| h["id"].clone()).collect::<Vec<_>>(), sim.iter().map(|h| h["id"].clone()).collect::<Vec<_>>());

    // An image outside the library is embedded on the fly; its nearest neighbour is its
    // copy inside the library.
    let outside = tempfile::tempdir().unwrap();
    let copy = outside.path().join("cat.png");
    std::fs::copy(&chelsea, &copy).unwrap();
    let sim = json(data.path(), &["--model", &m, "similar", copy.to_str().unwrap(), "-k", "1"]);
    assert!(sim[0]["path"].as_str().unwrap().ends_with("/chelsea.png"), "{sim}");
    // The same pixels, the same precision in every process (in a debug build auto no
    // longer follows the race, whose verdict there once split the indexing and this query
    // between bf16 and f32: their embeddings of this photo agree only to 0.99989 on tiny-a).
    assert!(sim[0]["score"].as_f64().unwrap() > 0.9999, "{sim}");

    let e = json(data.path(), &["--model", &m, "embed", "--text", "a cat"]);
    let v: Vec<f64> = e["vector"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(v.len(), e["dim"].as_u64().unwrap() as usize);
    assert!((v.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-4);
    let plain = ok(data.path(), &["--model", &m, "embed", "--image", chelsea.to_str().unwrap()]);
    assert_eq!(plain.split_whitespace().count(), v.len());

    // Deleting a photo retires it.
    std::fs::remove_file(&chelsea).unwrap();
    let report = json(data.path(), &["--model", &m, "index", photos.path().to_str().unwrap()]);
    assert_eq!(report["deleted"], 1);
    let all = json(data.path(), &["--model", &m, "search", "cat", "-k", "100"]);
    assert_eq!(all.as_array().unwrap().len(), n_images - 1);
    assert!(magpie(data.path(), &["--model", &m, "similar", &id.to_string()]).status.code() == Some(1));

    let r = json(data.path(), &["--model", &m, "reindex"]);
    assert_eq!(r["vectors"].as_u64().unwrap() as usize, n_images - 1);
}

#[test]
fn clear_errors() {
    let data = tempfile::tempdir().unwrap();
    let photos = photo_folder();
    let m = model();
    let err = |args: &[&str]| {
        let out = magpie(data.path(), args);
        assert_eq!(out.status.code(), Some(1), "{args:?} should fail");
        String::from_utf8(out.stderr).unwrap()
    };
    assert!(err(&["--model", "/no/such/model", "search", "x"]).contains("/no/such/model"));
    assert!(err(&["--model", &m, "--device", "cuda", "search", "x"]).contains("without CUDA"));
    let e = err(&["--model", "someone/some-model", "search", "x"]);
    assert!(e.contains("HF_HUB_OFFLINE") && e.contains("--model /path/to/dir"), "{e}");
    assert!(err(&["--model", &m, "search", "x"]).contains("magpie index"));
    assert!(err(&["--model", &m, "index", "/no/such/folder"]).contains("/no/such/folder"));
    ok(data.path(), &["--model", &m, "index", photos.path().to_str().unwrap()]);
    let other = root().join("tests/fixtures/clip/tiny-b");
    let e = err(&["--model", other.to_str().unwrap(), "search", "x"]);
    assert!(e.contains("tiny-a@") && e.contains("tiny-b@") && e.contains("--data-dir"), "{e}");
    assert!(err(&["--model", &m, "similar", "nonsense"]).contains("nonsense"));
    let bad_device = magpie(data.path(), &["--device", "tpu", "status"]);
    assert_eq!(bad_device.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_device.stderr).contains("tpu"));
}

#[test]
fn serve_answers_on_loopback_and_needs_a_token_elsewhere() {
    use std::io::{BufRead, BufReader, Read, Write};
    let data = tempfile::tempdir().unwrap();
    let photos = photo_folder();
    let m = model();
    // Not loopback without a token: refused before anything is loaded.
    let out = magpie(data.path(), &["--model", &m, "serve", "--bind", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("0.0.0.0:0") && e.contains("--token"), "{e}");
    let out = magpie(data.path(), &["--model", &m, "serve", "--root", "/no/such/folder"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/folder"));

    // On loopback (port 0: the system picks), the page and the API answer over a socket.
    let mut child = Command::new(env!("CARGO_BIN_EXE_magpie"))
        .arg("--data-dir")
        .arg(data.path())
        .args(["--model", &m, "serve", "--bind", "127.0.0.1:0", "--token", "t0k", "--root"])
        .arg(photos.path())
        .env("HF_HUB_OFFLINE", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("server exited").unwrap();
        if let Some(rest) = line.split("serving on http://").nth(1) {
            break rest.trim_end_matches('/').to_string();
        }
    };
    let get = |path: &str, auth: bool| -> String {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let auth = if auth { "Authorization: Bearer t0k\r\n" } else { "" };
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    };
    let health = get("/api/health", false);
    assert!(health.starts_with("HTTP/1.1 200") && health.contains("\"ok\":true"), "{health}");
    assert!(get("/api/status", false).starts_with("HTTP/1.1 401"));
    let status = get("/api/status", true);
    assert!(status.starts_with("HTTP/1.1 200") && status.contains("\"indexed\":0"), "{status}");
    assert!(get("/", false).contains("<html"));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn reindex_with_another_model_switches_the_library() {
    let data = tempfile::tempdir().unwrap();
    let photos = photo_folder();
    let a = model();
    let b = root().join("tests/fixtures/clip/tiny-b").display().to_string();
    ok(data.path(), &["--model", &a, "index", photos.path().to_str().unwrap()]);
    let before = json(data.path(), &["--model", &a, "search", "a cat", "-k", "50"]);
    let n = before.as_array().unwrap().len();
    assert!(n >= 10);
    // Another model is refused, with the way out in the message.
    let out = magpie(data.path(), &["--model", &b, "search", "a cat"]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("magpie reindex --model") && e.contains("tiny-b@"), "{e}");
    // The switch: every image re-embedded with tiny-b, then the library uses it.
    let r = json(data.path(), &["--model", &b, "reindex"]);
    assert_eq!(r["switched"], true, "{r}");
    assert_eq!(r["embedded"].as_u64(), Some(n as u64));
    assert_eq!(r["vectors"].as_u64(), Some(n as u64));
    let after = json(data.path(), &["--model", &b, "search", "a cat", "-k", "50"]);
    assert_eq!(after.as_array().unwrap().len(), n);
    let status = json(data.path(), &["status"]);
    assert!(status["model"]["id"].as_str().unwrap().contains("tiny-b"), "{status}");
    assert_eq!(status["index"]["up_to_date"], true);
    // Now the old model is the one refused; and reindexing to the same model just rebuilds.
    assert!(!magpie(data.path(), &["--model", &a, "search", "a cat"]).status.success());
    let again = json(data.path(), &["--model", &b, "reindex"]);
    assert_eq!(again["vectors"].as_u64(), Some(n as u64));
}

#[test]
fn index_watch_follows_new_and_deleted_files() {
    use std::io::{BufRead, BufReader};
    let data = tempfile::tempdir().unwrap();
    let photos = photo_folder();
    let mut child = Command::new(env!("CARGO_BIN_EXE_magpie"))
        .arg("--data-dir")
        .arg(data.path())
        .args(["--model", &model(), "--json", "index", "--watch"])
        .arg(photos.path())
        .env("HF_HUB_OFFLINE", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let wait_for = |what: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if pred(&v) {
                        return v;
                    }
                }
            }
        }
        panic!("no {what} event");
    };
    wait_for("watching", &|v| v["event"] == "watching");
    std::fs::copy(root().join("tests/fixtures/photos/rocket.jpg"), photos.path().join("rocket-2.jpg")).unwrap();
    let e = wait_for("indexed (new)", &|v| v["event"] == "indexed" && v["report"]["added"] == 1);
    assert_eq!(e["rescan"], false);
    std::fs::remove_file(photos.path().join("chelsea.png")).unwrap();
    wait_for("indexed (removed)", &|v| v["event"] == "indexed" && v["report"]["deleted"] == 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let status = json(data.path(), &["status"]);
    let n_images = std::fs::read_dir(root().join("tests/fixtures/photos")).unwrap().filter(|e| {
        let p = e.as_ref().unwrap().path();
        p.extension().is_some_and(|x| x == "png" || x == "jpg")
    }).count();
    assert_eq!(status["counts"]["indexed"].as_u64(), Some(n_images as u64), "{status}");
}

/// Every CPU kernel level, forced with `MAGPIE_CPU_ISA`, gives the same f32 embeddings
/// (and the BF16 path, where the CPU has it, stays within cosine 0.999 of them); a level
/// above the CPU's falls back instead of faulting.
#[test]
fn every_cpu_level_embeds_alike() {
    let data = tempfile::tempdir().unwrap();
    let photo = root().join("tests/fixtures/photos/chelsea.png");
    let photo = photo.to_str().unwrap();
    let run = |isa: &str, precision: &str, what: &[&str]| -> (Vec<f32>, Value) {
        let m = model();
        let mut args = vec!["--model", &m, "--precision", precision, "embed"];
        args.extend_from_slice(what);
        args.push("--json");
        let out = Command::new(env!("CARGO_BIN_EXE_magpie"))
            .arg("--data-dir")
            .arg(data.path())
            .args(&args)
            .env("MAGPIE_CPU_ISA", isa)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "MAGPIE_CPU_ISA={isa}: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        (v["vector"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect(), v)
    };
    let status = |isa: &str| -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_magpie"))
            .arg("--data-dir")
            .arg(data.path())
            .args(["status", "--json"])
            .env("MAGPIE_CPU_ISA", isa)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for what in [&["--image", photo][..], &["--text", "a cat on a sofa"][..]] {
        let (reference, _) = run("scalar", "f32", what);
        assert_eq!(reference.len(), 24);
        for isa in ["avx2", "avx512", "avx512bf16", "amx"] {
            let (v, _) = run(isa, "f32", what);
            let worst = v.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{isa} f32 vs scalar: max difference {worst}");
        }
        // BF16 on AVX-512 dot products and on AMX tiles (three-term QKV there), each
        // falling back to f32 where the CPU lacks it.
        for isa in ["avx512bf16", "amx"] {
            let (v, _) = run(isa, "bf16", what);
            assert!(cos(&v, &reference) > 0.999, "{isa} bf16: cosine {}", cos(&v, &reference));
        }
    }
    // Status names the level in use: capped by the variable, never above the CPU's.
    assert_eq!(status("scalar")["compute"]["cpu"], "scalar");
    assert_eq!(status("scalar")["compute"]["clip_precision"], "f32");
    let below = status("avx512bf16")["compute"]["cpu"].as_str().unwrap().to_string();
    assert!(["scalar", "avx2", "avx512", "avx512bf16"].contains(&below.as_str()), "{below}");
    let top = status("amx")["compute"]["cpu"].as_str().unwrap().to_string();
    assert!(["scalar", "avx2", "avx512", "avx512bf16", "amx"].contains(&top.as_str()), "{top}");
    assert_eq!(top == "amx", magpie_models::bf16_gemm::amx_available(), "{top}");
}
