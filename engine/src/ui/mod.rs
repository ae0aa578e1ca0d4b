//! The dashboard: a web page every engine serves at `/`, built into the binary (no build step,
//! nothing fetched from elsewhere). The page and its script hold no data and are served to
//! anyone; everything it shows it reads from `/fleet/v1` with the visitor's own credentials (a
//! token or a client certificate), so an anonymous visitor gets the sign-in prompt and nothing
//! else. A strict Content-Security-Policy allows only this engine's own script and API.
//!
//! Depends on axum only: it imports nothing of the engine.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("index.html");
const APP: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

/// Only this origin's script, style and API; no frames, no inline script.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // A new engine version brings its own page: never a stale script against a newer API.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// `/` and `/ui/*`, without authentication (see the module's doc).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) })
                .fallback(|| async { (StatusCode::METHOD_NOT_ALLOWED, "only GET supported against this resource") }),
        )
        .route("/ui/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP) }))
        .route("/ui/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
}

#[cfg(test)]
mod tests {
    /// The page loads only what this router serves, so the CSP and the routes agree.
    #[test]
    fn the_page_refers_only_to_served_assets() {
        for link in ["/ui/style.css", "/ui/app.js"] {
            assert!(super::INDEX.contains(link), "index.html does not load {link}");
        }
        assert!(!super::INDEX.contains("<script>"), "inline script is refused by the CSP");
        assert!(!super::APP.contains("innerHTML"), "build nodes, never HTML strings (no injection)");
    }
}
