//! API errors as Docker sends them: a status code and `{"message": "..."}`.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use shoal_api::ErrorResponse;

use crate::net::NetError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or inconsistent (400); nothing was changed.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the state (409); nothing was changed.
    #[error("{0}")]
    Conflict(String),
    /// The daemon failed to carry out a valid request (500).
    #[error("{0}")]
    Internal(String),
}

impl From<NetError> for ApiError {
    fn from(e: NetError) -> Self {
        if matches!(e, NetError::StaleSequence { .. }) {
            ApiError::Conflict(e.to_string())
        } else if e.is_bad_input() {
            ApiError::BadRequest(e.to_string())
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(ErrorResponse { message: self.to_string() })).into_response()
    }
}

/// Docker answers unknown paths with 404 and a JSON message; the CLI relies on the 404.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("page not found: {}", uri.path()))
}
