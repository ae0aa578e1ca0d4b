//! The bottom of the engine's HTTP layer: the error every handler answers with (fleet's JSON
//! error shape), the body limits, and the plumbing that refuses an oversized body so that the
//! client still reads the answer. It imports nothing else of the engine: auth, the API and
//! FleetLock all build on it.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fleet_api as wire;

/// The body limit of a request naming many units.
pub(crate) fn batch_limit() -> axum::extract::DefaultBodyLimit {
    axum::extract::DefaultBodyLimit::max(MAX_BATCH_BODY_BYTES)
}

/// Counts every request, refused or not: what a client costs the engine is visible from outside.
pub(crate) async fn count_request(
    State(count): State<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    next.run(req).await
}

/// How much of an oversized body is read and thrown away so the client sees the 413.
pub(crate) const OVERSIZED_DRAIN_BYTES: u64 = 16 << 20;
pub(crate) const OVERSIZED_DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads a request's body to its end and throws it away, bounded in size and time. A request
/// refused before its body was read must still get its answer: over HTTP/1.1 a client still
/// writing sees the connection close instead, and over HTTP/2 the unread body makes the server
/// reset the stream, which clients (curl: "Stream error in the HTTP/2 framing layer") report
/// instead of the answer.
pub(crate) async fn drain(req: axum::extract::Request) {
    use futures::StreamExt;
    let mut body = req.into_body().into_data_stream();
    let _ = tokio::time::timeout(OVERSIZED_DRAIN_TIME, async {
        let mut read = 0u64;
        while let Some(Ok(chunk)) = body.next().await {
            read += chunk.len() as u64;
            if read > MAX_BATCH_BODY_BYTES as u64 + OVERSIZED_DRAIN_BYTES {
                break;
            }
        }
    })
    .await;
}

/// Answers `error` once the request's body is read (see [`drain`]).
pub(crate) async fn refuse(req: axum::extract::Request, error: ApiError) -> ApiError {
    drain(req).await;
    error
}

/// Refuses a body whose declared length is over the route's limit before any handler runs.
/// Answering and closing while the client is still writing makes it see a broken pipe
/// instead of the answer (as nginx's lingering close knows), so a moderately oversized body
/// is read to its end, unparsed and bounded in size and time, before the 413.
pub(crate) async fn refuse_oversized(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = req.uri().path();
    let many_units = path.ends_with("/units") || path.rsplit('/').next().is_some_and(|last| last.starts_with("units:"));
    let limit =
        if req.method() == axum::http::Method::POST && many_units { MAX_BATCH_BODY_BYTES } else { MAX_BODY_BYTES }
            as u64;
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let Some(declared) = declared.filter(|d| *d > limit) else {
        return next.run(req).await;
    };
    if declared <= limit + OVERSIZED_DRAIN_BYTES {
        drain(req).await;
    }
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body is {declared} bytes; at most {limit} accepted here"),
    )
    .into_response()
}

/// axum answers an oversized body with plain text; fleet's clients expect its JSON error shape.
pub(crate) async fn server_header(resp: Response) -> Response {
    let mut resp = if resp.status() == StatusCode::PAYLOAD_TOO_LARGE
        && resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/plain"))
    {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large").into_response()
    } else {
        resp
    };
    if let Ok(v) = format!("fleetd/{}", env!("CARGO_PKG_VERSION")).parse() {
        resp.headers_mut().insert(header::SERVER, v);
    }
    resp
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        self.status
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
    /// etcd cannot be reached (the original fleet's words, which its clients may look for).
    pub(crate) fn unavailable() -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "fleet server unable to communicate with etcd")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = wire::ErrorBody {
            error: wire::ErrorDetail { code: self.status.as_u16(), message: self.message },
            units: Vec::new(),
        };
        (self.status, Json(body)).into_response()
    }
}

pub(crate) fn method_not_allowed(msg: &str) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, msg)
}

impl From<fleet_store::kv::StoreError> for ApiError {
    fn from(e: fleet_store::kv::StoreError) -> Self {
        match e.is_transient() {
            true => ApiError::unavailable(),
            false => ApiError::internal(format!("etcd: {e}")),
        }
    }
}

/// A refusal of a whole batch, with what was wrong with each unit.
#[derive(Debug)]
pub struct BatchError {
    pub error: ApiError,
    pub units: Vec<wire::UnitError>,
}

impl From<ApiError> for BatchError {
    fn from(error: ApiError) -> Self {
        BatchError { error, units: Vec::new() }
    }
}

impl IntoResponse for BatchError {
    fn into_response(self) -> Response {
        let status = self.error.status();
        let body = wire::ErrorBody {
            error: wire::ErrorDetail { code: status.as_u16(), message: self.error.message().to_string() },
            units: self.units,
        };
        (status, Json(body)).into_response()
    }
}

/// Refuses the batch if any unit was refused: `what` says why, `units` which and how.
pub(crate) fn refuse_batch(status: StatusCode, what: &str, units: Vec<wire::UnitError>) -> Result<(), BatchError> {
    if units.is_empty() {
        return Ok(());
    }
    let first = units.iter().take(3).map(|u| format!("{}: {}", u.name, u.error)).collect::<Vec<_>>().join("; ");
    let more = if units.len() > 3 { format!(" (and {} more)", units.len() - 3) } else { String::new() };
    Err(BatchError { error: ApiError::new(status, format!("{what}: {first}{more}")), units })
}

/// Largest request body, except a batch of units.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Largest `POST /units` body (up to [`MAX_UNITS_PER_REQUEST`] units).
pub const MAX_BATCH_BODY_BYTES: usize = 64 << 20;
