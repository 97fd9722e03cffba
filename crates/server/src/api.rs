//! The handlers of `/api`. Each parses its input itself (query strings with
//! `serde_urlencoded`, bodies with `serde_json` up to the body limit), so that every
//! malformed request gets the API's error shape with the offending field named.

use crate::error::{ApiError, ApiResult};
use crate::jobs::{JobHandle, JobKind};
use crate::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, RawQuery, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use magpie_core::{GenerationOptions, ImageId};
use magpie_engine::{
    CaptionOptions, Classes, FileRecord, Page, Query, SearchFilter, SearchHit, SearchMode, SortOrder, THUMBNAIL_SIDES,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;

const DEFAULT_K: usize = 40;
const MAX_K: usize = 200;

// ---------------------------------------------------------------------------------
// Input parsing

fn parse_query<T: DeserializeOwned>(raw: &Option<String>) -> ApiResult<T> {
    let raw = raw.as_deref().unwrap_or("");
    serde_urlencoded::from_str(raw).map_err(|e| {
        // serde_urlencoded does not say which parameter failed: find the first one that
        // fails on its own (for reasons other than other fields missing).
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw).unwrap_or_default();
        for (k, v) in &pairs {
            let one = serde_urlencoded::to_string([(k, v)]).unwrap_or_default();
            if let Err(e) = serde_urlencoded::from_str::<T>(&one) {
                let msg = e.to_string();
                if !msg.starts_with("missing field") {
                    return ApiError::bad_request(format!("{k}: `{v}`: {msg}"));
                }
            }
        }
        ApiError::bad_request(format!("query string: {e}"))
    })
}

/// The body of `req` as JSON of type `T`: Content-Type must be JSON (or absent with an
/// empty body, read as `{}` when `empty_ok`), and the body within the limit.
async fn json_body<T: DeserializeOwned>(state: &AppState, req: Request, empty_ok: bool) -> ApiResult<T> {
    let ct = content_type(req.headers());
    let bytes = read_body(state, req).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        if empty_ok {
            return serde_json::from_str("{}").map_err(|e| ApiError::bad_request(format!("body: {e}")));
        }
        return Err(ApiError::bad_request("body: a JSON object is required"));
    }
    if !(ct.is_empty() || ct == "application/json" || ct.ends_with("+json")) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("expected Content-Type application/json, not {ct}"),
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("body: {e}")))
}

fn content_type(h: &HeaderMap) -> String {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .unwrap_or_default()
}

async fn read_body(state: &AppState, req: Request) -> ApiResult<Bytes> {
    let limit = state.inner().config.body_limit;
    axum::body::to_bytes(req.into_body(), limit).await.map_err(|_| ApiError::too_large(limit))
}

/// `Path`, with its rejections (e.g. a segment that is not UTF-8) in the API's error
/// shape.
pub(crate) struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(ApiError::bad_request(format!("path: {}", e.body_text()))),
        }
    }
}

fn parse_id(raw: &str, what: &str) -> ApiResult<i64> {
    raw.parse::<i64>().map_err(|_| ApiError::bad_request(format!("{what}: `{raw}` is not an id")))
}

/// Search parameters shared by every search endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchParams {
    q: Option<String>,
    k: Option<usize>,
    mode: Option<String>,
    negative: Option<String>,
    folder: Option<String>,
    from: Option<String>,
    to: Option<String>,
    camera: Option<String>,
    #[serde(rename = "type")]
    format: Option<String>,
    label: Option<String>,
    min_score: Option<f32>,
    sort: Option<String>,
    cursor: Option<String>,
    /// The API token may ride in the query string.
    #[allow(dead_code)]
    token: Option<String>,
}

struct Paging {
    filter: SearchFilter,
    sort: SortOrder,
    offset: usize,
    k: usize,
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.as_ref().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn check_date(s: &Option<String>, field: &str) -> ApiResult<Option<String>> {
    let Some(v) = non_empty(s) else { return Ok(None) };
    let b = v.as_bytes();
    let ok = v.len() >= 10
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && b[7] == b'-'
        && b[8..10].iter().all(u8::is_ascii_digit)
        && (v.len() == 10 || b[10] == b'T' || b[10] == b' ');
    if !ok {
        return Err(ApiError::bad_request(format!("{field}: `{v}` is not a date (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS)")));
    }
    Ok(Some(v.replacen(' ', "T", 1)))
}

impl SearchParams {
    fn paging(&self) -> ApiResult<Paging> {
        let k = self.k.unwrap_or(DEFAULT_K);
        if k == 0 || k > MAX_K {
            return Err(ApiError::bad_request(format!("k: must be between 1 and {MAX_K}, not {k}")));
        }
        let label = match non_empty(&self.label) {
            None => None,
            Some(l) => match l.split_once(':') {
                Some((set, label)) if !set.is_empty() && !label.is_empty() => Some((set.to_string(), label.to_string())),
                _ => return Err(ApiError::bad_request(format!("label: `{l}` is not SET:LABEL"))),
            },
        };
        if let Some(m) = self.min_score {
            if !m.is_finite() {
                return Err(ApiError::bad_request("min_score: must be a number"));
            }
        }
        let filter = SearchFilter {
            folder: non_empty(&self.folder),
            from: check_date(&self.from, "from")?,
            to: check_date(&self.to, "to")?,
            camera: non_empty(&self.camera),
            format: non_empty(&self.format),
            label,
            min_score: self.min_score,
        };
        let sort = match non_empty(&self.sort) {
            Some(s) => s.parse().map_err(|e: String| ApiError::bad_request(format!("sort: {e}")))?,
            None => SortOrder::Relevance,
        };
        let offset = match non_empty(&self.cursor) {
            Some(c) => decode_cursor(&c)?,
            None => 0,
        };
        Ok(Paging { filter, sort, offset, k })
    }
}

/// Cursors are opaque to clients: the offset of the next page, in a versioned wrapper.
fn encode_cursor(offset: usize) -> String {
    format!("o1.{offset:x}")
}

fn decode_cursor(c: &str) -> ApiResult<usize> {
    c.strip_prefix("o1.")
        .and_then(|h| usize::from_str_radix(h, 16).ok())
        .filter(|&o| o <= magpie_engine::MAX_DEPTH)
        .ok_or_else(|| ApiError::bad_request(format!("cursor: `{c}` is not a cursor this server gave")))
}

// ---------------------------------------------------------------------------------
// Responses

fn image_urls(id: ImageId) -> (String, String) {
    (format!("/api/images/{id}/thumbnail"), format!("/api/images/{id}/original"))
}

fn hit_json(h: SearchHit) -> Value {
    let (thumbnail, original) = image_urls(h.id);
    let mut v = serde_json::to_value(h).unwrap_or(Value::Null);
    v["thumbnail"] = thumbnail.into();
    v["original"] = original.into();
    v
}

fn page_json(page: Page, paging: &Paging, mode: Option<SearchMode>) -> Json<Value> {
    let next = page.more.then(|| encode_cursor(paging.offset + paging.k));
    let mut out = json!({
        "hits": page.hits.into_iter().map(hit_json).collect::<Vec<_>>(),
        "next_cursor": next,
    });
    if let Some(m) = mode {
        out["mode"] = m.to_string().into();
    }
    Json(out)
}

// ---------------------------------------------------------------------------------
// Service

pub(crate) async fn health() -> Json<Value> {
    Json(json!({"ok": true, "version": env!("CARGO_PKG_VERSION")}))
}

pub(crate) async fn status(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let s = state.inner();
    let counts = s.lib.store().counts().await.map_err(magpie_engine::Error::from)?;
    let captions = s.lib.store().caption_count().await.map_err(magpie_engine::Error::from)?;
    let roots = index_roots(&state).await?;
    Ok(Json(json!({
        "images": counts,
        "captions": captions,
        "model": s.lib.model().id,
        "caption_model": s.chat_model_id,
        "index": {"vectors": s.lib.indexed_vectors(), "state": s.lib.index_state()},
        "text_index": {"documents": s.lib.text_documents()},
        "roots": roots,
        "jobs": s.jobs.list(),
    })))
}

async fn index_roots(state: &AppState) -> ApiResult<Vec<PathBuf>> {
    let s = state.inner();
    if !s.config.roots.is_empty() {
        return Ok(s.config.roots.clone());
    }
    let roots = s.lib.store().roots().await.map_err(magpie_engine::Error::from)?;
    Ok(roots.into_iter().map(|r| r.path).collect())
}

// ---------------------------------------------------------------------------------
// Search

pub(crate) async fn search(State(state): State<AppState>, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    let p: SearchParams = parse_query(&raw)?;
    let (page, paging, mode) = text_search(&state, &p, "").await?;
    Ok(page_json(page, &paging, Some(mode)))
}

/// A text search from its parameters; `field` prefixes the names of bad fields in errors
/// (`"query."` inside a classify body).
async fn text_search(state: &AppState, p: &SearchParams, field: &str) -> ApiResult<(Page, Paging, SearchMode)> {
    let paging = p.paging().map_err(|e| ApiError::bad_request(format!("{field}{}", e.message)))?;
    let q = non_empty(&p.q).ok_or_else(|| ApiError::bad_request(format!("{field}q: the search text is required")))?;
    let mode = match non_empty(&p.mode) {
        Some(m) => m.parse::<SearchMode>().map_err(|e| ApiError::bad_request(format!("{field}mode: {e}")))?,
        None => SearchMode::Hybrid,
    };
    let s = state.inner();
    let negative = non_empty(&p.negative);
    let page = s
        .lib
        .search_page(
            Query::Text { text: &q, negative: negative.as_deref(), mode, embedder: s.clip.as_ref() },
            &paging.filter,
            paging.sort,
            paging.offset,
            paging.k,
        )
        .await?;
    Ok((page, paging, mode))
}

/// An uploaded image: multipart part `image` (or the first file part), or the raw body.
async fn upload(state: &AppState, req: Request) -> ApiResult<(Bytes, String)> {
    let ct = content_type(req.headers());
    let limit = state.inner().config.body_limit;
    if ct == "multipart/form-data" {
        let mut mp = axum::extract::Multipart::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("body: {}", e.body_text())))?;
        let mut first = None;
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(ApiError::too_large(limit)),
                Err(e) => return Err(ApiError::bad_request(format!("body: {}", e.body_text()))),
            };
            let is_image = field.name() == Some("image");
            let name = field.file_name().unwrap_or("upload").to_string();
            if !is_image && (first.is_some() || field.file_name().is_none()) {
                continue;
            }
            let bytes = field.bytes().await.map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large(limit)
                } else {
                    ApiError::bad_request(format!("body: {}", e.body_text()))
                }
            })?;
            if is_image {
                return Ok((bytes, name));
            }
            first = Some((bytes, name));
        }
        return first.ok_or_else(|| ApiError::bad_request("image: the multipart body has no `image` part"));
    }
    if !(ct.is_empty() || ct.starts_with("image/") || ct == "application/octet-stream") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("send the image as multipart/form-data, image/*, or application/octet-stream, not {ct}"),
        ));
    }
    let bytes = read_body(state, req).await?;
    Ok((bytes, "upload".into()))
}

pub(crate) async fn search_image(State(state): State<AppState>, RawQuery(raw): RawQuery, req: Request) -> ApiResult<Json<Value>> {
    let p: SearchParams = parse_query(&raw)?;
    let paging = p.paging()?;
    let (bytes, name) = upload(&state, req).await?;
    if bytes.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "not_an_image", "the upload is empty"));
    }
    let clip = state.inner().clip.clone();
    let vector = tokio::task::spawn_blocking(move || magpie_engine::embed_bytes(&bytes, &name, clip.as_ref()))
        .await
        .map_err(|_| ApiError::internal())??;
    let page = state
        .inner()
        .lib
        .search_page(Query::Vector { vector, exclude: None }, &paging.filter, paging.sort, paging.offset, paging.k)
        .await?;
    Ok(page_json(page, &paging, None))
}

pub(crate) async fn similar(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "id")?;
    let p: SearchParams = parse_query(&raw)?;
    let paging = p.paging()?;
    let lib = &state.inner().lib;
    lib.image(id).await?;
    let e = lib
        .store()
        .embedding(id, &lib.model().id)
        .await
        .map_err(magpie_engine::Error::from)?
        .ok_or(magpie_engine::Error::UnknownId(id))?;
    let page = lib
        .search_page(
            Query::Vector { vector: e.vector().to_vec(), exclude: Some(id) },
            &paging.filter,
            paging.sort,
            paging.offset,
            paging.k,
        )
        .await?;
    Ok(page_json(page, &paging, None))
}

// ---------------------------------------------------------------------------------
// Images

fn record_json(f: &FileRecord, caption: Option<&str>, labels: Value, conversations: Value) -> Value {
    let (thumbnail, original) = image_urls(f.id);
    let meta = f.meta.as_ref();
    let exif = meta.map(|m| serde_json::to_value(&m.exif).unwrap_or(Value::Null)).unwrap_or(Value::Null);
    let camera = meta.and_then(|m| magpie_engine::camera_name(&m.exif));
    json!({
        "id": f.id,
        "path": f.path.to_string_lossy(),
        "size": f.size,
        "width": meta.map(|m| m.width),
        "height": meta.map(|m| m.height),
        "format": meta.map(|m| m.format.clone()),
        "taken_at": meta.and_then(|m| m.exif.taken_at.clone()),
        "camera": camera,
        "exif": exif,
        "caption": caption,
        "labels": labels,
        "conversations": conversations,
        "thumbnail": thumbnail,
        "original": original,
    })
}

pub(crate) async fn image(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "id")?;
    let lib = &state.inner().lib;
    let f = lib.image(id).await?;
    let caption = lib.caption(id).await?.map(|c| c.text);
    let labels = lib.store().labels_for(&[id]).await.map_err(magpie_engine::Error::from)?.remove(&id).unwrap_or_default();
    let mut convs = lib.conversations(Some(id)).await?;
    convs.reverse();
    let convs: Vec<Value> = convs.into_iter().map(|c| conversation_json(&c, None)).collect();
    Ok(Json(record_json(&f, caption.as_deref(), json!(labels), json!(convs))))
}

#[derive(Deserialize)]
struct ThumbParams {
    size: Option<u32>,
    #[allow(dead_code)]
    token: Option<String>,
}

/// A file that is indexed but can no longer be read (moved, deleted, unreadable).
fn unreadable(id: ImageId, e: magpie_engine::Error) -> ApiError {
    match e {
        magpie_engine::Error::UnknownId(_) => e.into(),
        other => {
            tracing::warn!("image {id}: {other}");
            ApiError::not_found("not_found", format!("image {id} is indexed but its file cannot be read now"))
        }
    }
}

pub(crate) async fn thumbnail(State(state): State<AppState>, ApiPath(id): ApiPath<String>, RawQuery(raw): RawQuery) -> ApiResult<Response> {
    let id = parse_id(&id, "id")?;
    let p: ThumbParams = parse_query(&raw)?;
    let size = p.size.unwrap_or(320);
    if !THUMBNAIL_SIDES.contains(&size) {
        return Err(ApiError::bad_request(format!(
            "size: must be between {} and {}, not {size}",
            THUMBNAIL_SIDES.start(),
            THUMBNAIL_SIDES.end()
        )));
    }
    let bytes = state.inner().lib.thumbnail(id, size).await.map_err(|e| unreadable(id, e))?;
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg")),
            (header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=86400")),
        ],
        bytes,
    )
        .into_response())
}

pub(crate) async fn original(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> ApiResult<Response> {
    let id = parse_id(&id, "id")?;
    let lib = &state.inner().lib;
    let f = lib.image(id).await?;
    let (_, bytes) = lib.original(id).await.map_err(|e| unreadable(id, e))?;
    let mime = match f.meta.as_ref().map(|m| m.format.as_str()) {
        Some("jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("bmp") => "image/bmp",
        Some("tiff") => "image/tiff",
        Some("avif") => "image/avif",
        Some("heic") | Some("heif") => "image/heif",
        _ => "application/octet-stream",
    };
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static(mime))], Body::from(bytes)).into_response())
}

pub(crate) async fn caption(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "id")?;
    let lib = &state.inner().lib;
    lib.image(id).await?;
    let c = lib.caption(id).await?;
    Ok(Json(json!({"id": id, "caption": c.as_ref().map(|c| &c.text), "model": c.as_ref().map(|c| &c.model_id)})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CaptionBody {
    max_new_tokens: Option<usize>,
}

pub(crate) async fn caption_now(State(state): State<AppState>, ApiPath(id): ApiPath<String>, req: Request) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "id")?;
    let body: CaptionBody = json_body(&state, req, true).await?;
    let lib = &state.inner().lib;
    lib.image(id).await?;
    let mut opts: CaptionOptions = state.inner().config.caption.clone();
    if let Some(n) = body.max_new_tokens {
        if n == 0 || n > 200 {
            return Err(ApiError::bad_request("max_new_tokens: must be between 1 and 200"));
        }
        opts.generation.max_new_tokens = n;
    }
    let model = state.chat().await?;
    let captioner: Arc<dyn magpie_core::Captioner> = model.clone();
    let model_id = captioner.model().id.clone();
    let text = lib.caption_one(id, captioner, &opts).await.map_err(|e| unreadable(id, e))?;
    Ok(Json(json!({"id": id, "caption": text, "model": model_id})))
}

// ---------------------------------------------------------------------------------
// Classification and labels

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassifyBody {
    labels: Vec<String>,
    template: Option<String>,
    ids: Option<Vec<ImageId>>,
    query: Option<ClassifyQuery>,
    #[serde(default)]
    all: bool,
    store_as: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassifyQuery {
    q: String,
    mode: Option<String>,
    k: Option<usize>,
    negative: Option<String>,
    #[serde(flatten)]
    filter: SearchFilterBody,
}

#[derive(Deserialize, Default)]
struct SearchFilterBody {
    folder: Option<String>,
    from: Option<String>,
    to: Option<String>,
    camera: Option<String>,
    #[serde(rename = "type")]
    format: Option<String>,
    label: Option<String>,
    min_score: Option<f32>,
}

fn check_set_name(name: &str) -> ApiResult<String> {
    let n = name.trim();
    if n.is_empty() || n.len() > 64 || n.contains(':') || n.chars().any(char::is_control) {
        return Err(ApiError::bad_request("store_as: a label set name is 1 to 64 characters, without `:`"));
    }
    Ok(n.to_string())
}

pub(crate) async fn classify(State(state): State<AppState>, req: Request) -> ApiResult<Response> {
    let body: ClassifyBody = json_body(&state, req, false).await?;
    let classes = Classes::new(body.labels, body.template).map_err(ApiError::bad_request)?;
    let store_as = body.store_as.as_deref().map(check_set_name).transpose()?;
    let sources = usize::from(body.ids.is_some()) + usize::from(body.query.is_some()) + usize::from(body.all);
    if sources != 1 {
        return Err(ApiError::bad_request("give exactly one of `ids`, `query` and `all`"));
    }
    let s = state.inner();
    if body.all {
        let Some(name) = store_as else {
            return Err(ApiError::bad_request("store_as: labelling the whole library needs a label set name"));
        };
        let handle = s.jobs.start(&state, JobKind::Classify).map_err(job_running)?;
        let st = state.clone();
        let h = handle.clone();
        let task = tokio::spawn(async move {
            let s = st.inner();
            let progress = |done: u64, total: u64| h.progress(done, total, 0);
            let r = s.lib.classify_all(s.clip.as_ref(), &classes, &name, &h.cancel, &progress).await;
            h.finish(r.map(|r| serde_json::to_value(r).unwrap_or(Value::Null)).map_err(|e| e.to_string()));
        });
        s.jobs.set_task(handle.id, task);
        let job = s.jobs.get(handle.id);
        return Ok((StatusCode::ACCEPTED, Json(json!({"job": job}))).into_response());
    }
    let ids: Vec<ImageId> = match (body.ids, body.query) {
        (Some(ids), _) => {
            if ids.is_empty() || ids.len() > 10_000 {
                return Err(ApiError::bad_request("ids: give 1 to 10000 ids"));
            }
            ids
        }
        (None, Some(q)) => {
            let params = SearchParams {
                q: Some(q.q),
                k: q.k,
                mode: q.mode,
                negative: q.negative,
                folder: q.filter.folder,
                from: q.filter.from,
                to: q.filter.to,
                camera: q.filter.camera,
                format: q.filter.format,
                label: q.filter.label,
                min_score: q.filter.min_score,
                ..Default::default()
            };
            let (page, _, _) = text_search(&state, &params, "query.").await?;
            page.hits.iter().map(|h| h.id).collect()
        }
        _ => unreachable!("checked above"),
    };
    let results = s.lib.classify(s.clip.as_ref(), &classes, &ids, store_as.as_deref()).await?;
    let files = s.lib.store().get_files(&ids).await.map_err(magpie_engine::Error::from)?;
    let paths: std::collections::HashMap<ImageId, String> =
        files.into_iter().map(|f| (f.id, f.path.to_string_lossy().into_owned())).collect();
    let results: Vec<Value> = results
        .into_iter()
        .map(|c| {
            json!({
                "id": c.id,
                "path": paths.get(&c.id),
                "thumbnail": image_urls(c.id).0,
                "label": c.label,
                "probs": c.probs,
            })
        })
        .collect();
    Ok(Json(json!({"labels": classes.labels, "results": results, "stored_as": store_as})).into_response())
}

pub(crate) async fn label_sets(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    Ok(Json(serde_json::to_value(state.inner().lib.label_sets().await?).unwrap_or(Value::Null)))
}

#[derive(Deserialize)]
struct ExportParams {
    format: Option<String>,
    #[allow(dead_code)]
    token: Option<String>,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub(crate) async fn export_labels(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Response> {
    let p: ExportParams = parse_query(&raw)?;
    let format = p.format.as_deref().unwrap_or("json").to_ascii_lowercase();
    if format != "json" && format != "csv" {
        return Err(ApiError::bad_request(format!("format: `{format}` is not json or csv")));
    }
    let rows = state
        .inner()
        .lib
        .store()
        .labels_in_set(&name)
        .await
        .map_err(magpie_engine::Error::from)?
        .ok_or_else(|| ApiError::not_found("unknown_label_set", format!("no label set named `{name}`")))?;
    let safe: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    let disposition = HeaderValue::from_str(&format!("attachment; filename=\"labels-{safe}.{format}\""))
        .unwrap_or(HeaderValue::from_static("attachment"));
    if format == "csv" {
        let mut out = String::from("id,path,label,prob\n");
        for r in &rows {
            out.push_str(&format!("{},{},{},{:.6}\n", r.id, csv_field(&r.path), csv_field(&r.label), r.prob));
        }
        return Ok((
            [(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8")), (header::CONTENT_DISPOSITION, disposition)],
            out,
        )
            .into_response());
    }
    Ok(([(header::CONTENT_DISPOSITION, disposition)], Json(serde_json::to_value(rows).unwrap_or(Value::Null))).into_response())
}

pub(crate) async fn delete_labels(State(state): State<AppState>, ApiPath(name): ApiPath<String>) -> ApiResult<Json<Value>> {
    let n = state.inner().lib.store().delete_label_set(&name).await.map_err(magpie_engine::Error::from)?;
    if n == 0 {
        return Err(ApiError::not_found("unknown_label_set", format!("no label set named `{name}`")));
    }
    Ok(Json(json!({"deleted": n})))
}

// ---------------------------------------------------------------------------------
// Chat

fn conversation_json(c: &magpie_engine::Conversation, messages: Option<&[magpie_engine::Message]>) -> Value {
    let mut v = json!({
        "id": c.id,
        "image_id": c.file_id,
        "model": c.model_id,
        "title": c.title,
        "created_at": c.created_at,
    });
    if let Some(ms) = messages {
        v["messages"] = ms.iter().map(|m| json!({"role": m.role, "text": m.text, "at": m.at})).collect();
    }
    v
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartChat {
    image_id: ImageId,
}

pub(crate) async fn start_conversation(State(state): State<AppState>, req: Request) -> ApiResult<Response> {
    let body: StartChat = json_body(&state, req, false).await?;
    let s = state.inner();
    let id = s.lib.start_chat(body.image_id, &s.chat_model_id).await?;
    let h = s.lib.conversation(id).await?;
    Ok((StatusCode::CREATED, Json(conversation_json(&h.conversation, Some(&h.messages)))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListChats {
    image_id: Option<String>,
    #[allow(dead_code)]
    token: Option<String>,
}

pub(crate) async fn conversations(State(state): State<AppState>, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    let p: ListChats = parse_query(&raw)?;
    let image = p.image_id.as_deref().map(|i| parse_id(i, "image_id")).transpose()?;
    let lib = &state.inner().lib;
    if let Some(id) = image {
        lib.image(id).await?;
    }
    let mut list = lib.conversations(image).await?;
    list.reverse();
    Ok(Json(Value::Array(list.iter().map(|c| conversation_json(c, None)).collect())))
}

pub(crate) async fn conversation(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "id")?;
    let h = state.inner().lib.conversation(id).await?;
    Ok(Json(conversation_json(&h.conversation, Some(&h.messages))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ask {
    question: String,
    max_new_tokens: Option<usize>,
}

#[derive(Serialize)]
struct Piece<'a> {
    text: &'a str,
}

pub(crate) async fn ask(State(state): State<AppState>, ApiPath(id): ApiPath<String>, req: Request) -> ApiResult<Response> {
    let id = parse_id(&id, "id")?;
    let body: Ask = json_body(&state, req, false).await?;
    if body.question.trim().is_empty() {
        return Err(ApiError::bad_request("question: the question is empty"));
    }
    let mut opts = GenerationOptions { max_new_tokens: state.inner().config.chat_max_new_tokens, ..Default::default() };
    if let Some(n) = body.max_new_tokens {
        if n == 0 || n > 200 {
            return Err(ApiError::bad_request("max_new_tokens: must be between 1 and 200"));
        }
        opts.max_new_tokens = n;
    }
    // Validate before the stream starts, so these are plain JSON errors.
    state.inner().lib.conversation(id).await?;
    let model = state.chat().await?;
    let chat: Arc<dyn magpie_core::VisualChat> = model;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Event, std::convert::Infallible>>();
    let st = state.clone();
    tokio::spawn(async move {
        let tx2 = tx.clone();
        let mut on_text = move |piece: &str| {
            if !piece.is_empty() {
                let data = serde_json::to_string(&Piece { text: piece }).unwrap_or_default();
                let _ = tx2.send(Ok(Event::default().event("token").data(data)));
            }
        };
        let r = st.inner().lib.ask(id, &body.question, chat, &opts, &mut on_text).await;
        let event = match r {
            Ok(answer) => Event::default().event("done").data(json!({"answer": answer, "conversation": id}).to_string()),
            Err(e) => Event::default().event("error").data(ApiError::from(e).body().to_string()),
        };
        let _ = tx.send(Ok(event));
    });
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

// ---------------------------------------------------------------------------------
// Duplicates

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DuplicateParams {
    threshold: Option<f32>,
    exact_only: Option<bool>,
    #[allow(dead_code)]
    token: Option<String>,
}

pub(crate) async fn duplicates(State(state): State<AppState>, RawQuery(raw): RawQuery) -> ApiResult<Json<Value>> {
    let p: DuplicateParams = parse_query(&raw)?;
    let threshold = p.threshold.unwrap_or(magpie_engine::DEFAULT_NEAR_THRESHOLD);
    if !(threshold > 0.0 && threshold <= 1.0) {
        return Err(ApiError::bad_request(format!("threshold: must be in (0, 1], not {threshold}")));
    }
    let near = (!p.exact_only.unwrap_or(false)).then_some(threshold);
    let d = state.inner().lib.duplicates(near).await?;
    let file = |f: &magpie_engine::DuplicateFile| {
        let (thumbnail, _) = image_urls(f.id);
        json!({"id": f.id, "path": f.path, "size": f.size, "width": f.width, "height": f.height, "thumbnail": thumbnail})
    };
    Ok(Json(json!({
        "threshold": (d.threshold as f64 * 1e6).round() / 1e6,
        "exact": d.exact.iter().map(|g| json!({"content_hash": g.content_hash, "files": g.files.iter().map(file).collect::<Vec<_>>()})).collect::<Vec<_>>(),
        "near": d.near.iter().map(|g| json!({"min_cosine": g.min_cosine, "files": g.files.iter().map(file).collect::<Vec<_>>()})).collect::<Vec<_>>(),
    })))
}

// ---------------------------------------------------------------------------------
// Jobs

fn job_running(job: crate::Job) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "job_running", format!("a {:?} job is already running (job {})", job.kind, job.id).to_lowercase())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct IndexBody {
    root: Option<String>,
}

pub(crate) async fn start_index(State(state): State<AppState>, req: Request) -> ApiResult<Response> {
    let body: IndexBody = json_body(&state, req, true).await?;
    let allowed = index_roots(&state).await?;
    let roots = match body.root.as_deref().map(str::trim).filter(|r| !r.is_empty()) {
        None => allowed,
        Some(r) => {
            let canon = std::fs::canonicalize(r).ok();
            let known = allowed.iter().find(|a| Some(a.as_path()) == canon.as_deref() || a.as_path() == std::path::Path::new(r));
            match known {
                Some(a) => vec![a.clone()],
                None => return Err(ApiError::bad_request(format!("root: `{r}` is not one of this server's folders"))),
            }
        }
    };
    if roots.is_empty() {
        return Err(ApiError::bad_request("root: this server has no folders to index (start it with --root DIR)"));
    }
    let s = state.inner();
    let handle: JobHandle = s.jobs.start(&state, JobKind::Index).map_err(job_running)?;
    let st = state.clone();
    let h = handle.clone();
    let task = tokio::spawn(async move {
        let s = st.inner();
        let emb: Arc<dyn magpie_core::ImageEmbedder> = s.clip.clone();
        let progress = |p: &magpie_engine::Progress| h.progress(p.done, p.total.max(p.done), p.failed);
        let r = s.lib.index_cancellable(&roots, emb, &s.config.index, &progress, h.cancel.clone()).await;
        h.finish(
            r.map(|r| {
                json!({
                    "scanned": r.scanned, "added": r.added, "updated": r.updated, "unchanged": r.unchanged,
                    "deleted": r.deleted, "failed": r.failed.len(), "seconds": r.elapsed.as_secs_f64(),
                })
            })
            .map_err(|e| e.to_string()),
        );
    });
    s.jobs.set_task(handle.id, task);
    Ok((StatusCode::ACCEPTED, Json(json!(s.jobs.get(handle.id)))).into_response())
}

pub(crate) async fn start_caption(State(state): State<AppState>, req: Request) -> ApiResult<Response> {
    let _: serde_json::Map<String, Value> = json_body(&state, req, true).await?;
    let model = state.chat().await?;
    let s = state.inner();
    let handle = s.jobs.start(&state, JobKind::Caption).map_err(job_running)?;
    let st = state.clone();
    let h = handle.clone();
    let task = tokio::spawn(async move {
        let s = st.inner();
        let captioner: Arc<dyn magpie_core::Captioner> = model;
        let progress = |p: &magpie_engine::CaptionProgress| h.progress(p.done, p.total, p.failed);
        let r = s.lib.caption_all(captioner, &s.config.caption, &progress, h.cancel.clone()).await;
        h.finish(
            r.map(|r| json!({"captioned": r.captioned, "failed": r.failed.len(), "remaining": r.remaining}))
                .map_err(|e| e.to_string()),
        );
    });
    s.jobs.set_task(handle.id, task);
    Ok((StatusCode::ACCEPTED, Json(json!(s.jobs.get(handle.id)))).into_response())
}

pub(crate) async fn jobs(State(state): State<AppState>) -> Json<Value> {
    Json(json!(state.inner().jobs.list()))
}

pub(crate) async fn job(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "id")?;
    let job = state.inner().jobs.get(id as u64).filter(|_| id > 0);
    job.map(|j| Json(json!(j))).ok_or_else(|| ApiError::not_found("unknown_job", format!("no job with id {id}")))
}

pub(crate) async fn cancel_job(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "id")?;
    let job = state.inner().jobs.cancel(id as u64).filter(|_| id > 0);
    job.map(|j| Json(json!(j))).ok_or_else(|| ApiError::not_found("unknown_job", format!("no job with id {id}")))
}
