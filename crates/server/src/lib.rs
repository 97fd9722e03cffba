//! magpie's HTTP service: the JSON API of `API.md` (described by `web/openapi.json`)
//! and the web page of `web/`, over one [`Library`].
//!
//! The router is built by [`router`] from an [`AppState`], by `magpie serve` and by the
//! tests alike (which drive it with `tower::ServiceExt::oneshot`). Models come in as
//! `magpie-core` traits: CLIP at start, the captioning/chat model on first use.
//!
//! ```no_run
//! # async fn run(state: magpie_server::AppState) {
//! let app = magpie_server::router(state);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7878").await.unwrap();
//! axum::serve(listener, app).await.unwrap();
//! # }
//! ```

mod api;
mod error;
mod jobs;

pub use error::{ApiError, ApiResult};
pub use jobs::{Job, JobKind, JobState};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use magpie_core::{Captioner, ImageEmbedder, TextEmbedder, VisualChat};
use magpie_engine::{CaptionOptions, IndexOptions, Library};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// CLIP, as the server needs it: images and texts.
pub trait ClipModel: ImageEmbedder + TextEmbedder {}
impl<T: ImageEmbedder + TextEmbedder + ?Sized> ClipModel for T {}

/// The captioning and chat model (BLIP-2).
pub trait ChatModel: Captioner + VisualChat {}
impl<T: Captioner + VisualChat + ?Sized> ChatModel for T {}

/// Loads the chat model; called on first use (and again after a failure).
pub type ChatLoader = Arc<dyn Fn() -> Result<Arc<dyn ChatModel>, String> + Send + Sync>;

/// Settings of a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Required on every `/api` request (but `/api/health`) when set.
    pub token: Option<String>,
    /// Folders index jobs may index (empty: the library's recorded roots).
    pub roots: Vec<PathBuf>,
    /// Largest request body accepted.
    pub body_limit: usize,
    /// Time allowed to produce a response (a chat stream's body may take longer).
    pub request_timeout: Duration,
    pub index: IndexOptions,
    pub caption: CaptionOptions,
    /// Chat answers: new tokens at most.
    pub chat_max_new_tokens: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            token: None,
            roots: vec![],
            body_limit: 32 << 20,
            request_timeout: Duration::from_secs(120),
            index: IndexOptions::default(),
            caption: CaptionOptions::default(),
            chat_max_new_tokens: 60,
        }
    }
}

/// What every handler sees. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub(crate) struct Inner {
    pub(crate) lib: Arc<Library>,
    pub(crate) clip: Arc<dyn ClipModel>,
    pub(crate) chat_model_id: String,
    chat_loader: ChatLoader,
    chat: tokio::sync::OnceCell<Arc<dyn ChatModel>>,
    pub(crate) config: ServerConfig,
    pub(crate) jobs: jobs::Jobs,
}

impl AppState {
    /// `chat_model_id` names the chat model before it is loaded (for `/api/status`).
    pub fn new(
        lib: Arc<Library>,
        clip: Arc<dyn ClipModel>,
        chat_model_id: String,
        chat_loader: ChatLoader,
        config: ServerConfig,
    ) -> Self {
        Self(Arc::new(Inner {
            lib,
            clip,
            chat_model_id,
            chat_loader,
            chat: tokio::sync::OnceCell::new(),
            config,
            jobs: jobs::Jobs::default(),
        }))
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.0
    }

    /// The chat model, loaded on first use on the blocking pool.
    pub(crate) async fn chat(&self) -> ApiResult<Arc<dyn ChatModel>> {
        let loader = self.0.chat_loader.clone();
        self.0
            .chat
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || loader())
                    .await
                    .map_err(|e| e.to_string())?
            })
            .await
            .cloned()
            .map_err(|e| {
                tracing::error!("cannot load the chat model: {e}");
                ApiError::unavailable(format!("the captioning/chat model could not be loaded: {e}"))
            })
    }

    /// Waits for running jobs to stop after asking them to (server shutdown).
    pub async fn cancel_jobs(&self) {
        self.0.jobs.cancel_all_and_wait().await;
    }
}

/// The web page's files, built into the binary.
const INDEX_HTML: &str = include_str!("../../../web/index.html");
const APP_JS: &str = include_str!("../../../web/app.js");
const STYLE_CSS: &str = include_str!("../../../web/style.css");
pub const OPENAPI_JSON: &str = include_str!("../../../web/openapi.json");

fn static_file(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// The whole service: API, page, limits, token check, timeouts.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/health", get(api::health))
        .route("/status", get(api::status))
        .route("/openapi.json", get(|| async { static_file(OPENAPI_JSON, "application/json") }))
        .route("/search", get(api::search))
        .route("/search/image", post(api::search_image))
        .route("/images/{id}", get(api::image))
        .route("/images/{id}/similar", get(api::similar))
        .route("/images/{id}/thumbnail", get(api::thumbnail))
        .route("/images/{id}/original", get(api::original))
        .route("/images/{id}/caption", get(api::caption).post(api::caption_now))
        .route("/classify", post(api::classify))
        .route("/labels", get(api::label_sets))
        .route("/labels/{name}", get(api::export_labels).delete(api::delete_labels))
        .route("/conversations", get(api::conversations).post(api::start_conversation))
        .route("/conversations/{id}", get(api::conversation))
        .route("/conversations/{id}/messages", post(api::ask))
        .route("/duplicates", get(api::duplicates))
        .route("/jobs", get(api::jobs))
        .route("/jobs/index", post(api::start_index))
        .route("/jobs/caption", post(api::start_caption))
        .route("/jobs/{id}", get(api::job).delete(api::cancel_job))
        .fallback(|| async { ApiError::not_found("not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this endpoint does not take that method")
        });
    Router::new()
        .nest("/api", api)
        .route("/", get(|| async { static_file(INDEX_HTML, "text/html; charset=utf-8") }))
        .route("/index.html", get(|| async { static_file(INDEX_HTML, "text/html; charset=utf-8") }))
        .route("/app.js", get(|| async { static_file(APP_JS, "text/javascript; charset=utf-8") }))
        .route("/style.css", get(|| async { static_file(STYLE_CSS, "text/css; charset=utf-8") }))
        // `/api/` and any other unknown path: the API's 404, not an empty body.
        .fallback(|| async { ApiError::not_found("not_found", "no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        // Bodies are read by the handlers up to `body_limit` (an over-long one is a 413
        // in the API's error shape); this only lifts axum's default 2 MB cap on multipart.
        .layer(axum::extract::DefaultBodyLimit::max(state.0.config.body_limit))
        .with_state(state)
}

/// Token check and response timeout, for every request.
async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if let Some(token) = &state.0.config.token {
        if path.starts_with("/api/") && path != "/api/health" && !authorized(&req, token) {
            return ApiError::unauthorized().into_response();
        }
    }
    let timeout = state.0.config.request_timeout;
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!("no response within {} s", timeout.as_secs()),
        )
        .into_response(),
    }
}

fn authorized(req: &Request, token: &str) -> bool {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let query = req.uri().query().and_then(|q| {
        serde_urlencoded::from_str::<Vec<(String, String)>>(q)
            .ok()?
            .into_iter()
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v)
    });
    header.is_some_and(|h| constant_time_eq(h, token)) || query.is_some_and(|q| constant_time_eq(&q, token))
}

/// Compares without stopping at the first difference, so timing does not tell how much
/// of a guess was right.
fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "abcd"));
    }
}
