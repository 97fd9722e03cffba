//! The HTTP API through the router (`tower::ServiceExt::oneshot`), with the tiny
//! fixture CLIP and BLIP-2 models and the fixture photos: every endpoint, and every
//! error case of API.md.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use magpie_engine::{IndexOptions, Library, LibraryConfig};
use magpie_models::{Blip2, Clip};
use magpie_server::{router, AppState, ChatLoader, ChatModel, ServerConfig};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(p: &str) -> PathBuf {
    root().join("tests/fixtures").join(p)
}

struct Env {
    app: Router,
    photos: tempfile::TempDir,
    _data: tempfile::TempDir,
}

/// A folder of fixture photos in two subfolders, indexed (unless `index` is false),
/// behind a router.
async fn env(config: ServerConfig, index: bool) -> Env {
    let photos = tempfile::tempdir().unwrap();
    let src = fixture("photos");
    std::fs::create_dir(photos.path().join("cats")).unwrap();
    std::fs::create_dir(photos.path().join("space")).unwrap();
    for (from, to) in [
        ("chelsea.png", "cats/chelsea.png"),
        ("chelsea_exif6.jpg", "cats/chelsea_exif6.jpg"),
        ("rocket.jpg", "space/rocket.jpg"),
        ("moon.png", "space/moon.png"),
        ("coins.png", "coins.png"),
        ("coffee_rgba.png", "coffee.png"),
        ("horse.png", "horse.png"),
    ] {
        std::fs::copy(src.join(from), photos.path().join(to)).unwrap();
    }
    let data = tempfile::tempdir().unwrap();
    let clip = Arc::new(Clip::load(fixture("clip/tiny-a").to_str().unwrap(), magpie_core::Device::Cpu).unwrap());
    let lib = Arc::new(Library::open(data.path(), clip.info(), LibraryConfig::default()).await.unwrap());
    if index {
        let emb: Arc<dyn magpie_core::ImageEmbedder> = clip.clone();
        let r = lib.index(&[photos.path().to_path_buf()], emb, &IndexOptions::default(), &|_| {}).await.unwrap();
        assert_eq!(r.added, 7, "{:?}", r.failed);
    }
    let blip_dir = fixture("blip2/tiny-a");
    let loader: ChatLoader = Arc::new(move || {
        Blip2::load(blip_dir.to_str().unwrap(), magpie_core::Device::Cpu)
            .map(|m| Arc::new(m) as Arc<dyn ChatModel>)
            .map_err(|e| e.to_string())
    });
    let mut config = config;
    if config.roots.is_empty() {
        config.roots = vec![std::fs::canonicalize(photos.path()).unwrap()];
    }
    config.caption.generation.max_new_tokens = 8;
    config.chat_max_new_tokens = 8;
    let state = AppState::new(lib, clip, "tests/fixtures/blip2/tiny-a".into(), loader, config);
    Env { app: router(state), photos, _data: data }
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts an error reply: status, code, and that the message mentions `needle`.
    fn error(&self, status: StatusCode, code: &str, needle: &str) {
        assert_eq!(self.status, status, "{}", String::from_utf8_lossy(&self.body));
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "message `{msg}` should mention `{needle}`");
    }
}

async fn send(app: &Router, req: Request<Body>) -> Reply {
    let r = app.clone().oneshot(req).await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.into_body().collect().await.unwrap().to_bytes().to_vec();
    Reply { status, headers, body }
}

async fn get(app: &Router, uri: &str) -> Reply {
    send(app, Request::get(uri).body(Body::empty()).unwrap()).await
}

async fn post_json(app: &Router, uri: &str, body: Value) -> Reply {
    send(
        app,
        Request::post(uri).header(header::CONTENT_TYPE, "application/json").body(Body::from(body.to_string())).unwrap(),
    )
    .await
}

fn ids(v: &Value) -> Vec<i64> {
    v["hits"].as_array().unwrap().iter().map(|h| h["id"].as_i64().unwrap()).collect()
}

async fn id_of(app: &Router, name: &str) -> i64 {
    let v = get(app, "/api/search?q=photo&mode=vector&k=200").await.json();
    v["hits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["path"].as_str().unwrap().ends_with(name))
        .unwrap_or_else(|| panic!("{name} not found in {v}"))["id"]
        .as_i64()
        .unwrap()
}

async fn wait_job(app: &Router, id: i64) -> Value {
    for _ in 0..600 {
        let j = get(app, &format!("/api/jobs/{id}")).await.json();
        if j["state"] != "running" {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id} did not finish");
}

/// Every route of the router, as (method, path template).
const ROUTES: &[(&str, &str)] = &[
    ("get", "/api/health"),
    ("get", "/api/status"),
    ("get", "/api/openapi.json"),
    ("get", "/api/search"),
    ("post", "/api/search/image"),
    ("get", "/api/images/{id}"),
    ("get", "/api/images/{id}/similar"),
    ("get", "/api/images/{id}/thumbnail"),
    ("get", "/api/images/{id}/original"),
    ("get", "/api/images/{id}/caption"),
    ("post", "/api/images/{id}/caption"),
    ("post", "/api/classify"),
    ("get", "/api/labels"),
    ("get", "/api/labels/{name}"),
    ("delete", "/api/labels/{name}"),
    ("get", "/api/conversations"),
    ("post", "/api/conversations"),
    ("get", "/api/conversations/{id}"),
    ("post", "/api/conversations/{id}/messages"),
    ("get", "/api/duplicates"),
    ("get", "/api/jobs"),
    ("post", "/api/jobs/index"),
    ("post", "/api/jobs/caption"),
    ("get", "/api/jobs/{id}"),
    ("delete", "/api/jobs/{id}"),
];

#[tokio::test]
async fn openapi_documents_every_route_and_the_page_is_served() {
    let e = env(ServerConfig::default(), false).await;
    let doc = get(&e.app, "/api/openapi.json").await;
    assert_eq!(doc.status, StatusCode::OK);
    let doc = doc.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (method, path) in ROUTES {
        let p = path.strip_prefix("/api").unwrap();
        let documented = paths.get(*path).or_else(|| paths.get(p));
        assert!(documented.and_then(|d| d.get(*method)).is_some(), "{method} {path} is not in openapi.json");
        // And the route exists (a wrong method or a missing route would be 405/404 `not_found`).
        let uri = path.replace("{id}", "1").replace("{name}", "x");
        let r = send(&e.app, Request::builder().method(method.to_uppercase().as_str()).uri(&uri).body(Body::empty()).unwrap()).await;
        assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
        if r.status == StatusCode::NOT_FOUND {
            assert_ne!(r.json()["error"]["code"], "not_found", "{method} {uri} is not routed");
        }
    }
    // And nothing is documented that does not exist.
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys().filter(|m| ["get", "post", "delete", "put", "patch"].contains(&m.as_str())) {
            let full = if path.starts_with("/api") { path.clone() } else { format!("/api{path}") };
            assert!(ROUTES.contains(&(method.as_str(), full.as_str())), "openapi.json documents {method} {path}, which the router lacks");
        }
    }
    for (uri, ct) in [("/", "text/html"), ("/app.js", "text/javascript"), ("/style.css", "text/css")] {
        let r = get(&e.app, uri).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}");
        assert!(r.headers[header::CONTENT_TYPE].to_str().unwrap().starts_with(ct));
        assert!(!r.body.is_empty());
    }
    let h = get(&e.app, "/api/health").await.json();
    assert_eq!(h["ok"], true);
    get(&e.app, "/api/nope").await.error(StatusCode::NOT_FOUND, "not_found", "endpoint");
    // Found by fuzzing: `/api/` and unknown pages got an empty 404, a non-UTF-8 path
    // segment a plain-text 400.
    get(&e.app, "/api/").await.error(StatusCode::NOT_FOUND, "not_found", "endpoint");
    get(&e.app, "/nope").await.error(StatusCode::NOT_FOUND, "not_found", "endpoint");
    get(&e.app, "/api/images/%FF").await.error(StatusCode::BAD_REQUEST, "bad_request", "path");
    get(&e.app, "/api/labels/%FF").await.error(StatusCode::BAD_REQUEST, "bad_request", "path");
    let r = send(&e.app, Request::put("/api/search").body(Body::empty()).unwrap()).await;
    r.error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method");
}

#[tokio::test]
async fn text_search_filters_sorts_and_pages() {
    let e = env(ServerConfig::default(), true).await;
    let all = get(&e.app, "/api/search?q=a%20photo%20of%20a%20cat&mode=vector&k=200").await;
    assert_eq!(all.status, StatusCode::OK);
    let all = all.json();
    assert_eq!(all["mode"], "vector");
    let every = ids(&all);
    assert_eq!(every.len(), 7);
    assert!(all["next_cursor"].is_null());
    let h = &all["hits"][0];
    for key in ["id", "path", "score", "width", "height", "format", "caption", "labels", "thumbnail", "original"] {
        assert!(h.get(key).is_some(), "hit lacks {key}: {h}");
    }
    // Pages of 3 walk the same ranking.
    let mut walked = Vec::new();
    let mut uri = "/api/search?q=a%20photo%20of%20a%20cat&mode=vector&k=3".to_string();
    loop {
        let page = get(&e.app, &uri).await.json();
        walked.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(c) => uri = format!("/api/search?q=a%20photo%20of%20a%20cat&mode=vector&k=3&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(walked, every);
    // Filters.
    let cats = get(&e.app, &format!("/api/search?q=cat&mode=vector&folder={}/cats", e.photos.path().display())).await.json();
    assert_eq!(cats["hits"].as_array().unwrap().len(), 2, "{cats}");
    assert!(cats["hits"].as_array().unwrap().iter().all(|h| h["path"].as_str().unwrap().contains("/cats/")));
    let jpegs = get(&e.app, "/api/search?q=cat&mode=vector&type=jpg").await.json();
    assert_eq!(jpegs["hits"].as_array().unwrap().len(), 2, "{jpegs}");
    let top = all["hits"][0]["score"].as_f64().unwrap();
    let min = get(&e.app, &format!("/api/search?q=a%20photo%20of%20a%20cat&mode=vector&min_score={top}")).await.json();
    assert!(!min["hits"].as_array().unwrap().is_empty() && min["hits"].as_array().unwrap().len() < 7);
    let none = get(&e.app, "/api/search?q=cat&mode=vector&camera=hasselblad").await.json();
    assert_eq!(none["hits"].as_array().unwrap().len(), 0);
    let dated = get(&e.app, "/api/search?q=cat&mode=vector&from=1990-01-01").await.json();
    assert_eq!(dated["hits"].as_array().unwrap().len(), 0, "fixture photos carry no dates");
    // Sorting by date keeps the set (no photo has a date: relevance order stays).
    let by_date = get(&e.app, "/api/search?q=a%20photo%20of%20a%20cat&mode=vector&k=200&sort=date").await.json();
    assert_eq!(ids(&by_date), every);
    // A negative text changes the ranking's scores.
    let neg = get(&e.app, "/api/search?q=a%20photo%20of%20a%20cat&mode=vector&k=200&negative=a%20rocket").await.json();
    assert_eq!(ids(&neg).len(), 7);
    assert_ne!(neg["hits"][0]["score"], all["hits"][0]["score"]);
    // Text mode finds folder words; hybrid is the default.
    let text = get(&e.app, "/api/search?q=space&mode=text").await.json();
    assert_eq!(text["hits"].as_array().unwrap().len(), 2, "{text}");
    assert_eq!(get(&e.app, "/api/search?q=space").await.json()["mode"], "hybrid");

    // Errors.
    get(&e.app, "/api/search").await.error(StatusCode::BAD_REQUEST, "bad_request", "q");
    get(&e.app, "/api/search?q=%20").await.error(StatusCode::BAD_REQUEST, "bad_request", "q");
    get(&e.app, "/api/search?q=x&k=0").await.error(StatusCode::BAD_REQUEST, "bad_request", "k");
    get(&e.app, "/api/search?q=x&k=ten").await.error(StatusCode::BAD_REQUEST, "bad_request", "k");
    get(&e.app, "/api/search?q=x&mode=fuzzy").await.error(StatusCode::BAD_REQUEST, "bad_request", "mode");
    get(&e.app, "/api/search?q=x&sort=size").await.error(StatusCode::BAD_REQUEST, "bad_request", "sort");
    get(&e.app, "/api/search?q=x&cursor=zzz").await.error(StatusCode::BAD_REQUEST, "bad_request", "cursor");
    get(&e.app, "/api/search?q=x&from=yesterday").await.error(StatusCode::BAD_REQUEST, "bad_request", "from");
    get(&e.app, "/api/search?q=x&label=nolabel").await.error(StatusCode::BAD_REQUEST, "bad_request", "label");
    get(&e.app, "/api/search?q=x&colour=red").await.error(StatusCode::BAD_REQUEST, "bad_request", "colour");
}

fn multipart(bytes: &[u8], part: &str) -> (String, Vec<u8>) {
    let boundary = "XmagpieBoundaryX";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{part}\"; filename=\"q.png\"\r\nContent-Type: image/png\r\n\r\n")
            .as_bytes(),
    );
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test]
async fn image_search_by_upload_and_by_id() {
    let config = ServerConfig { body_limit: 1 << 20, ..Default::default() };
    let e = env(config, true).await;
    let rocket = std::fs::read(fixture("photos/rocket.jpg")).unwrap();
    let rocket_id = id_of(&e.app, "space/rocket.jpg").await;
    // Multipart: the same photo is its own nearest neighbour.
    let (ct, body) = multipart(&rocket, "image");
    let r = send(&e.app, Request::post("/api/search/image?k=3").header(header::CONTENT_TYPE, ct).body(Body::from(body)).unwrap()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(ids(&v)[0], rocket_id);
    assert!(v["hits"][0]["score"].as_f64().unwrap() > 0.999);
    assert_eq!(ids(&v).len(), 3);
    assert!(v["next_cursor"].is_string());
    // Raw body, with a filter.
    let r = send(
        &e.app,
        Request::post("/api/search/image?type=png").header(header::CONTENT_TYPE, "image/jpeg").body(Body::from(rocket.clone())).unwrap(),
    )
    .await;
    let v = r.json();
    assert!(!ids(&v).contains(&rocket_id) && ids(&v).len() == 5, "{v}");
    // By id: itself excluded, the EXIF-turned copy of the cat is the cat's nearest.
    let cat = id_of(&e.app, "cats/chelsea.png").await;
    let turned = id_of(&e.app, "cats/chelsea_exif6.jpg").await;
    let v = get(&e.app, &format!("/api/images/{cat}/similar?k=6")).await.json();
    assert!(!ids(&v).contains(&cat));
    assert_eq!(ids(&v)[0], turned, "{v}");

    // Errors.
    let r = send(&e.app, Request::post("/api/search/image").header(header::CONTENT_TYPE, "image/png").body(Body::from("not an image")).unwrap()).await;
    r.error(StatusCode::BAD_REQUEST, "not_an_image", "");
    let r = send(&e.app, Request::post("/api/search/image").header(header::CONTENT_TYPE, "image/png").body(Body::empty()).unwrap()).await;
    r.error(StatusCode::BAD_REQUEST, "not_an_image", "empty");
    let big = vec![0u8; (1 << 20) + 10];
    let r = send(&e.app, Request::post("/api/search/image").header(header::CONTENT_TYPE, "image/png").body(Body::from(big.clone())).unwrap()).await;
    r.error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "limit");
    let (ct, body) = multipart(&big, "image");
    let r = send(&e.app, Request::post("/api/search/image").header(header::CONTENT_TYPE, ct).body(Body::from(body)).unwrap()).await;
    r.error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "limit");
    let r = send(&e.app, Request::post("/api/search/image").header(header::CONTENT_TYPE, "text/plain").body(Body::from("hi")).unwrap()).await;
    r.error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "text/plain");
    let (ct, body) = multipart(b"x", "notes");
    let r = send(&e.app, Request::post("/api/search/image").header(header::CONTENT_TYPE, ct).body(Body::from(body)).unwrap()).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    get(&e.app, "/api/images/999999/similar").await.error(StatusCode::NOT_FOUND, "unknown_id", "999999");
    get(&e.app, "/api/images/abc/similar").await.error(StatusCode::BAD_REQUEST, "bad_request", "abc");
}

#[tokio::test]
async fn images_thumbnails_originals_and_captions() {
    let e = env(ServerConfig::default(), true).await;
    let turned = id_of(&e.app, "cats/chelsea_exif6.jpg").await;
    let v = get(&e.app, &format!("/api/images/{turned}")).await.json();
    assert_eq!(v["id"], turned);
    assert_eq!(v["exif"]["orientation"], 6);
    assert_eq!((v["width"].as_u64(), v["height"].as_u64()), (Some(451), Some(300)), "{v}");
    assert!(v["conversations"].as_array().unwrap().is_empty());
    // Thumbnail: JPEG, upright (the stored pixels are 300×451; EXIF turns them).
    let t = get(&e.app, &format!("/api/images/{turned}/thumbnail?size=200")).await;
    assert_eq!(t.status, StatusCode::OK);
    assert_eq!(t.headers[header::CONTENT_TYPE], "image/jpeg");
    assert!(t.headers[header::CACHE_CONTROL].to_str().unwrap().contains("max-age"));
    let img = magpie_media::decode_bytes(&t.body, &Default::default(), "thumb").unwrap().image;
    assert_eq!((img.width(), img.height()), (200, 133));
    // Cached: the same bytes again, from a file in the library.
    assert_eq!(get(&e.app, &format!("/api/images/{turned}/thumbnail?size=200")).await.body, t.body);
    get(&e.app, &format!("/api/images/{turned}/thumbnail?size=5000")).await.error(StatusCode::BAD_REQUEST, "bad_request", "size");
    // The original: the file's bytes.
    let o = get(&e.app, &format!("/api/images/{turned}/original")).await;
    assert_eq!(o.status, StatusCode::OK);
    assert_eq!(o.headers[header::CONTENT_TYPE], "image/jpeg");
    assert_eq!(o.body, std::fs::read(fixture("photos/chelsea_exif6.jpg")).unwrap());
    for uri in ["/api/images/424242", "/api/images/424242/thumbnail", "/api/images/424242/original", "/api/images/424242/caption"] {
        get(&e.app, uri).await.error(StatusCode::NOT_FOUND, "unknown_id", "424242");
    }
    // There is no way to name a path: traversal attempts are not ids.
    get(&e.app, "/api/images/..%2F..%2Fetc%2Fpasswd/original").await.error(StatusCode::BAD_REQUEST, "bad_request", "not an id");
    // A file deleted after indexing: a clear 404, not a 500.
    let coins = id_of(&e.app, "coins.png").await;
    std::fs::remove_file(e.photos.path().join("coins.png")).unwrap();
    get(&e.app, &format!("/api/images/{coins}/original")).await.error(StatusCode::NOT_FOUND, "not_found", "cannot be read");

    // Captions: none, then one on demand.
    let c = get(&e.app, &format!("/api/images/{turned}/caption")).await.json();
    assert!(c["caption"].is_null());
    let r = send(&e.app, Request::post(format!("/api/images/{turned}/caption")).body(Body::empty()).unwrap()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let made = r.json();
    assert!(made["caption"].is_string() && made["model"].is_string());
    let c = get(&e.app, &format!("/api/images/{turned}/caption")).await.json();
    assert_eq!(c["caption"], made["caption"]);
    post_json(&e.app, &format!("/api/images/{turned}/caption"), json!({"max_new_tokens": 0}))
        .await
        .error(StatusCode::BAD_REQUEST, "bad_request", "max_new_tokens");
    post_json(&e.app, &format!("/api/images/{turned}/caption"), json!({"beams": 3}))
        .await
        .error(StatusCode::BAD_REQUEST, "bad_request", "beams");
}

#[tokio::test]
async fn zero_shot_labels_are_classified_stored_filtered_and_exported() {
    let e = env(ServerConfig::default(), true).await;
    let every = ids(&get(&e.app, "/api/search?q=x&mode=vector&k=200").await.json());
    let labels = json!(["cat", "rocket", "coins"]);
    let r = post_json(&e.app, "/api/classify", json!({"labels": labels, "ids": every[..3]})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["results"].as_array().unwrap().len(), 3);
    for res in v["results"].as_array().unwrap() {
        let probs = res["probs"].as_object().unwrap();
        let sum: f64 = probs.values().map(|p| p.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-4, "{res}");
        let best = probs.iter().max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap())).unwrap().0;
        assert_eq!(res["label"].as_str(), Some(best.as_str()));
    }
    assert!(v["stored_as"].is_null());
    assert!(get(&e.app, "/api/labels").await.json().as_array().unwrap().is_empty());
    // From a search, stored.
    let r = post_json(
        &e.app,
        "/api/classify",
        json!({"labels": labels, "template": "a picture of {}", "query": {"q": "a photo", "mode": "vector", "k": 4}, "store_as": "kind"}),
    )
    .await;
    assert_eq!(r.json()["results"].as_array().unwrap().len(), 4);
    // The whole library, as a job.
    let r = post_json(&e.app, "/api/classify", json!({"labels": labels, "all": true, "store_as": "kind"})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let job = r.json()["job"].clone();
    assert_eq!(job["kind"], "classify");
    let done = wait_job(&e.app, job["id"].as_i64().unwrap()).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["result"]["images"], 7);
    let sets = get(&e.app, "/api/labels").await.json();
    assert_eq!(sets[0]["name"], "kind");
    assert_eq!(sets[0]["images"], 7);
    let counts = sets[0]["labels"].as_object().unwrap();
    // A label that exists filters the search to its images.
    let (label, n) = counts.iter().next().unwrap();
    let filtered = get(&e.app, &format!("/api/search?q=x&mode=vector&k=200&label=kind:{label}")).await.json();
    assert_eq!(filtered["hits"].as_array().unwrap().len() as u64, n.as_u64().unwrap());
    assert!(filtered["hits"].as_array().unwrap().iter().all(|h| h["labels"]["kind"] == label.as_str()));
    // Exports.
    let csv = get(&e.app, "/api/labels/kind?format=csv").await;
    assert_eq!(csv.status, StatusCode::OK);
    assert!(csv.headers[header::CONTENT_DISPOSITION].to_str().unwrap().contains("labels-kind.csv"));
    let text = String::from_utf8(csv.body).unwrap();
    assert!(text.starts_with("id,path,label,prob\n"));
    assert_eq!(text.lines().count(), 8);
    let js = get(&e.app, "/api/labels/kind").await.json();
    assert_eq!(js.as_array().unwrap().len(), 7);
    get(&e.app, "/api/labels/kind?format=xml").await.error(StatusCode::BAD_REQUEST, "bad_request", "format");
    get(&e.app, "/api/labels/nope").await.error(StatusCode::NOT_FOUND, "unknown_label_set", "nope");

    // Errors.
    post_json(&e.app, "/api/classify", json!({"labels": ["cat"], "ids": [every[0]]})).await.error(StatusCode::BAD_REQUEST, "bad_request", "labels");
    post_json(&e.app, "/api/classify", json!({"labels": ["a", "b"], "template": "photo", "ids": [every[0]]}))
        .await
        .error(StatusCode::BAD_REQUEST, "bad_request", "template");
    post_json(&e.app, "/api/classify", json!({"labels": ["a", "b"], "ids": [every[0]], "all": true}))
        .await
        .error(StatusCode::BAD_REQUEST, "bad_request", "exactly one");
    post_json(&e.app, "/api/classify", json!({"labels": ["a", "b"], "all": true})).await.error(StatusCode::BAD_REQUEST, "bad_request", "store_as");
    post_json(&e.app, "/api/classify", json!({"labels": ["a", "b"], "ids": [999_999]})).await.error(StatusCode::NOT_FOUND, "unknown_id", "999999");
    post_json(&e.app, "/api/classify", json!({"ids": [1]})).await.error(StatusCode::BAD_REQUEST, "bad_request", "labels");
    let r = send(&e.app, Request::post("/api/classify").header(header::CONTENT_TYPE, "application/json").body(Body::from("{\"labels\": [")).unwrap()).await;
    r.error(StatusCode::BAD_REQUEST, "bad_request", "body");
    let r = send(&e.app, Request::post("/api/classify").header(header::CONTENT_TYPE, "text/plain").body(Body::from("{}")).unwrap()).await;
    r.error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "application/json");
    let r = send(&e.app, Request::delete("/api/labels/kind").body(Body::empty()).unwrap()).await;
    assert_eq!(r.json()["deleted"], 7);
    let r = send(&e.app, Request::delete("/api/labels/kind").body(Body::empty()).unwrap()).await;
    r.error(StatusCode::NOT_FOUND, "unknown_label_set", "kind");
}

/// The events of a `text/event-stream` body: (event, data).
fn events(body: &[u8]) -> Vec<(String, Value)> {
    let text = String::from_utf8_lossy(body);
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut event = String::from("message");
        let mut data = String::new();
        for line in block.lines() {
            if let Some(e) = line.strip_prefix("event:") {
                event = e.trim().to_string();
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.trim_start());
            }
        }
        if !data.is_empty() {
            out.push((event, serde_json::from_str(&data).unwrap()));
        }
    }
    out
}

#[tokio::test]
async fn chat_streams_answers_and_keeps_history() {
    let e = env(ServerConfig::default(), true).await;
    let rocket = id_of(&e.app, "space/rocket.jpg").await;
    let r = post_json(&e.app, "/api/conversations", json!({"image_id": rocket})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.body));
    let conv = r.json();
    let cid = conv["id"].as_i64().unwrap();
    assert_eq!(conv["image_id"], rocket);
    let r = post_json(&e.app, &format!("/api/conversations/{cid}/messages"), json!({"question": "what is this?"})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/event-stream"));
    let ev = events(&r.body);
    let (last, done) = ev.last().unwrap();
    assert_eq!(last, "done", "{ev:?}");
    let pieces: String = ev.iter().filter(|(e, _)| e == "token").map(|(_, d)| d["text"].as_str().unwrap()).collect();
    assert_eq!(pieces.trim(), done["answer"].as_str().unwrap());
    assert_eq!(done["conversation"], cid);
    // A second turn, then the history.
    let r = post_json(&e.app, &format!("/api/conversations/{cid}/messages"), json!({"question": "and then?"})).await;
    assert_eq!(events(&r.body).last().unwrap().0, "done");
    let h = get(&e.app, &format!("/api/conversations/{cid}")).await.json();
    let msgs = h["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 4);
    assert_eq!((msgs[0]["role"].as_str(), msgs[0]["text"].as_str()), (Some("user"), Some("what is this?")));
    assert_eq!(msgs[1]["text"], done["answer"]);
    assert_eq!(h["title"], "what is this?");
    let list = get(&e.app, &format!("/api/conversations?image_id={rocket}")).await.json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let detail = get(&e.app, &format!("/api/images/{rocket}")).await.json();
    assert_eq!(detail["conversations"][0]["id"], cid);

    // Errors, as JSON before any stream.
    post_json(&e.app, &format!("/api/conversations/{cid}/messages"), json!({"question": "  "}))
        .await
        .error(StatusCode::BAD_REQUEST, "bad_request", "question");
    post_json(&e.app, &format!("/api/conversations/{cid}/messages"), json!({})).await.error(StatusCode::BAD_REQUEST, "bad_request", "question");
    post_json(&e.app, "/api/conversations/777/messages", json!({"question": "hi"}))
        .await
        .error(StatusCode::NOT_FOUND, "unknown_conversation", "777");
    get(&e.app, "/api/conversations/777").await.error(StatusCode::NOT_FOUND, "unknown_conversation", "777");
    post_json(&e.app, "/api/conversations", json!({"image_id": 31337})).await.error(StatusCode::NOT_FOUND, "unknown_id", "31337");
    post_json(&e.app, "/api/conversations", json!({"image": 1})).await.error(StatusCode::BAD_REQUEST, "bad_request", "image");
    get(&e.app, "/api/conversations?image_id=x").await.error(StatusCode::BAD_REQUEST, "bad_request", "image_id");
}

#[tokio::test]
async fn chat_model_that_cannot_load_is_a_503() {
    let e = env(ServerConfig::default(), false).await;
    let loader: ChatLoader = Arc::new(|| Err("/models/blip2: has no config.json".to_string()));
    let (app, _data) = with_loader(&e, loader, ServerConfig::default()).await;
    let id = id_of(&app, "rocket.jpg").await;
    let r = send(&app, Request::post(format!("/api/images/{id}/caption")).body(Body::empty()).unwrap()).await;
    r.error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "config.json");
    let conv = post_json(&app, "/api/conversations", json!({"image_id": id})).await.json();
    post_json(&app, &format!("/api/conversations/{}/messages", conv["id"]), json!({"question": "hi"}))
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "config.json");
    post_json(&app, "/api/jobs/caption", json!({})).await.error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "config.json");
}

#[tokio::test]
async fn index_and_caption_jobs_report_progress_and_searches_go_on() {
    let e = env(ServerConfig::default(), false).await;
    let s = get(&e.app, "/api/status").await.json();
    assert_eq!(s["images"]["indexed"], 0);
    let r = post_json(&e.app, "/api/jobs/index", json!({})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&r.body));
    let job = r.json();
    assert_eq!((job["kind"].as_str(), job["state"].as_str()), (Some("index"), Some("running")));
    // Queries are answered while it runs.
    let q = get(&e.app, "/api/search?q=cat&mode=vector").await;
    assert_eq!(q.status, StatusCode::OK);
    assert_eq!(get(&e.app, "/api/status").await.status, StatusCode::OK);
    let done = wait_job(&e.app, job["id"].as_i64().unwrap()).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["result"]["added"], 7);
    assert_eq!(done["progress"]["done"], 7);
    assert!(done["finished_at"].is_string());
    let s = get(&e.app, "/api/status").await.json();
    assert_eq!(s["images"]["indexed"], 7);
    assert_eq!(s["index"]["vectors"], 7);
    assert_eq!(s["jobs"][0]["id"], job["id"]);
    // Captions for all, as a job.
    let r = post_json(&e.app, "/api/jobs/caption", json!({})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let cj = wait_job(&e.app, r.json()["id"].as_i64().unwrap()).await;
    assert_eq!(cj["state"], "done", "{cj}");
    assert_eq!(cj["result"]["captioned"], 7);
    assert_eq!(get(&e.app, "/api/status").await.json()["captions"], 7);
    // Jobs listed newest first; cancelling a finished job leaves it done.
    let list = get(&e.app, "/api/jobs").await.json();
    assert_eq!(list[0]["kind"], "caption");
    let c = send(&e.app, Request::delete(format!("/api/jobs/{}", job["id"])).body(Body::empty()).unwrap()).await;
    assert_eq!(c.json()["state"], "done");
    // An index job that is cancelled at once stops as cancelled (or done, if it won).
    let r = post_json(&e.app, "/api/jobs/index", json!({})).await.json();
    send(&e.app, Request::delete(format!("/api/jobs/{}", r["id"])).body(Body::empty()).unwrap()).await;
    let end = wait_job(&e.app, r["id"].as_i64().unwrap()).await;
    assert!(end["state"] == "cancelled" || end["state"] == "done", "{end}");

    // Errors.
    get(&e.app, "/api/jobs/99").await.error(StatusCode::NOT_FOUND, "unknown_job", "99");
    let r = send(&e.app, Request::delete("/api/jobs/99").body(Body::empty()).unwrap()).await;
    r.error(StatusCode::NOT_FOUND, "unknown_job", "99");
    post_json(&e.app, "/api/jobs/index", json!({"root": "/etc"})).await.error(StatusCode::BAD_REQUEST, "bad_request", "/etc");
    post_json(&e.app, "/api/jobs/index", json!({"roots": []})).await.error(StatusCode::BAD_REQUEST, "bad_request", "roots");
}

#[tokio::test]
async fn duplicates_group_exact_copies_and_look_alikes() {
    let e = env(ServerConfig::default(), false).await;
    // An exact copy of the rocket, and a smaller, re-encoded one.
    std::fs::copy(fixture("photos/rocket.jpg"), e.photos.path().join("rocket-copy.jpg")).unwrap();
    let img = magpie_media::decode_file(&fixture("photos/rocket.jpg"), &Default::default()).unwrap().image;
    let (w, h) = (img.width(), img.height());
    img.resize(w * 3 / 5, h * 3 / 5, magpie_media::image::imageops::FilterType::Triangle)
        .to_rgb8()
        .save(e.photos.path().join("rocket-small.png"))
        .unwrap();
    let r = post_json(&e.app, "/api/jobs/index", json!({})).await.json();
    assert_eq!(wait_job(&e.app, r["id"].as_i64().unwrap()).await["state"], "done");
    let d = get(&e.app, "/api/duplicates").await;
    assert_eq!(d.status, StatusCode::OK);
    let d = d.json();
    let names = |files: &Value| -> Vec<String> {
        let mut v: Vec<String> = files.as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap().rsplit('/').next().unwrap().to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(d["exact"].as_array().unwrap().len(), 1, "{d}");
    assert_eq!(names(&d["exact"][0]["files"]), ["rocket-copy.jpg", "rocket.jpg"]);
    let near = d["near"].as_array().unwrap();
    let rocket_group = near.iter().find(|g| names(&g["files"]).contains(&"rocket.jpg".to_string())).unwrap_or_else(|| panic!("{d}"));
    assert_eq!(names(&rocket_group["files"]), ["rocket-copy.jpg", "rocket-small.png", "rocket.jpg"]);
    assert!(rocket_group["min_cosine"].as_f64().unwrap() >= 0.95);
    let exact_only = get(&e.app, "/api/duplicates?exact_only=true").await.json();
    assert!(exact_only["near"].as_array().unwrap().is_empty());
    get(&e.app, "/api/duplicates?threshold=1.5").await.error(StatusCode::BAD_REQUEST, "bad_request", "threshold");
    get(&e.app, "/api/duplicates?threshold=high").await.error(StatusCode::BAD_REQUEST, "bad_request", "threshold");
}

#[tokio::test]
async fn a_token_guards_the_api() {
    let e = env(ServerConfig { token: Some("s3cret".into()), ..Default::default() }, true).await;
    get(&e.app, "/api/status").await.error(StatusCode::UNAUTHORIZED, "unauthorized", "token");
    get(&e.app, "/api/search?q=cat").await.error(StatusCode::UNAUTHORIZED, "unauthorized", "token");
    get(&e.app, "/api/status?token=wrong").await.error(StatusCode::UNAUTHORIZED, "unauthorized", "token");
    let r = send(&e.app, Request::get("/api/status").header(header::AUTHORIZATION, "Bearer s3cret").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(get(&e.app, "/api/search?q=cat&token=s3cret").await.status, StatusCode::OK);
    let id = ids(&get(&e.app, "/api/search?q=cat&token=s3cret").await.json())[0];
    assert_eq!(get(&e.app, &format!("/api/images/{id}/thumbnail?token=s3cret")).await.status, StatusCode::OK);
    assert_eq!(get(&e.app, "/api/health").await.status, StatusCode::OK);
    assert_eq!(get(&e.app, "/").await.status, StatusCode::OK);
}

/// A server over an indexed copy of the photos whose chat model comes from `loader`.
async fn with_loader(e: &Env, loader: ChatLoader, config: ServerConfig) -> (Router, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let clip = Arc::new(Clip::load(fixture("clip/tiny-a").to_str().unwrap(), magpie_core::Device::Cpu).unwrap());
    let lib = Arc::new(Library::open(data.path(), clip.info(), LibraryConfig::default()).await.unwrap());
    let emb: Arc<dyn magpie_core::ImageEmbedder> = clip.clone();
    lib.index(&[e.photos.path().to_path_buf()], emb, &IndexOptions::default(), &|_| {}).await.unwrap();
    (router(AppState::new(lib, clip, "/models/blip2".into(), loader, config)), data)
}

#[tokio::test]
async fn slow_responses_time_out_in_the_error_shape() {
    let e = env(ServerConfig::default(), false).await;
    let loader: ChatLoader = Arc::new(|| {
        std::thread::sleep(Duration::from_millis(500));
        Err("too slow".to_string())
    });
    let (app, _data) = with_loader(&e, loader, ServerConfig { request_timeout: Duration::from_millis(100), ..Default::default() }).await;
    let id = id_of(&app, "rocket.jpg").await;
    let r = send(&app, Request::post(format!("/api/images/{id}/caption")).body(Body::empty()).unwrap()).await;
    r.error(StatusCode::SERVICE_UNAVAILABLE, "timeout", "no response");
}
