//! The agent's small HTTP API, used by the engine to show `systemctl status` and journal lines
//! of fleet's units without SSH. It answers only for units this agent manages (a file in its
//! units directory), so it cannot be used to read anything else on the machine.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fleet_model::UnitName;
use serde::Deserialize;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

#[derive(Clone)]
pub struct UnitApi {
    pub units_dir: PathBuf,
    pub metrics: std::sync::Arc<crate::metrics::AgentMetrics>,
}

pub fn router(api: UnitApi) -> Router {
    Router::new()
        .route("/units/{name}/status", get(status))
        .route("/units/{name}/journal", get(journal))
        .route("/metrics", get(metrics))
        .with_state(api)
}

/// The agent's metrics (docs/metrics.md), in Prometheus' text format.
pub async fn metrics(State(api): State<UnitApi>) -> Response {
    let text = api.metrics.render();
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}

/// Only `/metrics`, for a plain listener on localhost (`metrics_listen`).
pub fn metrics_router(api: UnitApi) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(api)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = fleet_api::ErrorBody {
        error: fleet_api::ErrorDetail { code: status.as_u16(), message: message.into() },
        units: Vec::new(),
    };
    (status, Json(body)).into_response()
}

fn managed(api: &UnitApi, name: &str) -> Result<UnitName, Box<Response>> {
    let unit = UnitName::parse(name).map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, e.to_string())))?;
    if !api.units_dir.join(unit.as_str()).is_file() {
        return Err(Box::new(error(StatusCode::NOT_FOUND, format!("{unit} is not loaded on this machine"))));
    }
    Ok(unit)
}

/// `systemctl status -l` of one unit: its output and exit code.
async fn status(State(api): State<UnitApi>, Path(name): Path<String>) -> Response {
    let unit = match managed(&api, &name) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    let run = tokio::process::Command::new("systemctl")
        .args(["status", "-l", "--no-pager", "--full", "--", unit.as_str()])
        .env("SYSTEMD_COLORS", "0")
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(10), run).await {
        // The engine names the machine: it knows which agent it asked.
        Ok(Ok(out)) => Json(fleet_api::AgentStatus {
            machine_id: String::new(),
            exit_code: out.status.code().unwrap_or(1),
            output: String::from_utf8_lossy(&out.stdout).into_owned(),
        })
        .into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot run systemctl: {e}")),
        Err(_) => error(StatusCode::GATEWAY_TIMEOUT, "systemctl status timed out"),
    }
}

#[derive(Debug, Deserialize)]
pub struct JournalQuery {
    #[serde(default = "ten")]
    lines: u32,
    #[serde(default)]
    follow: bool,
    #[serde(default = "short")]
    output: String,
}

fn ten() -> u32 {
    10
}
fn short() -> String {
    "short".into()
}

const OUTPUT_MODES: &[&str] = &[
    "short",
    "short-iso",
    "short-iso-precise",
    "short-precise",
    "short-monotonic",
    "short-unix",
    "verbose",
    "export",
    "json",
    "json-pretty",
    "json-sse",
    "cat",
    "with-unit",
];

/// Journal lines of one unit, streamed; with `follow` the stream stays open (journalctl is
/// killed when the client goes away).
async fn journal(State(api): State<UnitApi>, Path(name): Path<String>, Query(q): Query<JournalQuery>) -> Response {
    let unit = match managed(&api, &name) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    if !OUTPUT_MODES.contains(&q.output.as_str()) {
        return error(StatusCode::BAD_REQUEST, format!("unknown journal output mode {:?}", q.output));
    }
    let mut cmd = tokio::process::Command::new("journalctl");
    cmd.args(["--unit", unit.as_str(), "--no-pager", "-n", &q.lines.min(100_000).to_string(), "--output", &q.output]);
    if q.follow {
        cmd.arg("--follow");
    }
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).stdin(Stdio::null()).kill_on_drop(true).spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot run journalctl: {e}")),
    };
    let Some(stdout) = child.stdout.take() else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "journalctl has no output");
    };
    // The child is moved into the stream so it lives (and dies) with the response.
    let stream = futures::stream::unfold((tokio_util::io::ReaderStream::new(stdout), child), |(mut s, c)| async move {
        use futures::StreamExt;
        s.next().await.map(|item| (item, (s, c)))
    });
    Response::builder()
        .header("content-type", "text/plain; charset=utf-8")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}
