//! The one error shape of the API, `{"error": {"code", "message"}}`, and the mapping of
//! every engine error to an HTTP status. Internals (paths of the data directory, SQL,
//! model errors) stay in the server log.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use magpie_engine::Error as EngineError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("the request body is over the limit of {limit} bytes"))
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this server needs its API token: `Authorization: Bearer TOKEN` or `?token=TOKEN`",
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log")
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match &e {
            EngineError::UnknownId(_) => ApiError::not_found("unknown_id", e.to_string()),
            EngineError::UnknownConversation(_) => ApiError::not_found("unknown_conversation", e.to_string()),
            EngineError::EmptyQuestion => ApiError::bad_request("question: the question is empty"),
            EngineError::Empty(_) => ApiError::new(StatusCode::CONFLICT, "empty_library", "the library is empty: index a folder first"),
            // An uploaded image that cannot be decoded: the media error names the upload.
            EngineError::Media(m) => ApiError::new(StatusCode::BAD_REQUEST, "not_an_image", m.to_string()),
            EngineError::Model(magpie_core::Error::Dimension { .. }) => ApiError::bad_request(e.to_string()),
            EngineError::Switched { .. } => ApiError::new(StatusCode::CONFLICT, "model_switched", e.to_string()),
            _ => {
                tracing::error!("request failed: {e}");
                ApiError::internal()
            }
        }
    }
}
