//! Write bodies as the API reads them: UTF-8 text up to [`MAX_BODY`], refused with a
//! message that names the limit and the fix, never with a bare codec error.

use axum::{
    extract::{FromRequest, Request},
    http::StatusCode,
};

use super::ApiError;

/// The largest write body: 4 MiB holds thousands of resources, and bounds what one
/// request can make the control plane parse and hold.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// A request body as text.
pub(super) struct TextBody(pub String);

impl<S: Send + Sync> FromRequest<S> for TextBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::to_bytes(request.into_body(), MAX_BODY).await.map_err(|error| {
            if over_limit(&error) {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the request body is over the API's limit of {} MiB: apply fewer or smaller files at a time",
                        MAX_BODY / (1024 * 1024)
                    ),
                )
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, format!("cannot read the request body: {error}"))
            }
        })?;
        String::from_utf8(bytes.into()).map(TextBody).map_err(|error| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "the request body is not UTF-8 (invalid byte at offset {}): YAML and JSON documents must be UTF-8",
                    error.utf8_error().valid_up_to()
                ),
            )
        })
    }
}

/// Whether reading failed on the length limit (somewhere in the error's sources).
fn over_limit(error: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if current.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = current.source();
    }
    false
}
