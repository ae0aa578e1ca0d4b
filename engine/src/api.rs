//! fleet's REST API (`/fleet/v1`), served by every engine replica from its cluster view.
//!
//! Field names, status codes and error bodies follow the original fleet so its clients keep
//! working. Writes go straight to etcd in transactions and answer once committed; the next read
//! through the same replica waits until its view shows them (see [`Api::written`]).

use crate::auth::{AuditDetail, Auth, Caller, Role};
use crate::cluster::{Cluster, ClusterView};
use crate::leader::SharedStatus;
use axum::extract::{Path, Query, State};
use axum::handler::Handler;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use fleet_api as wire;
use fleet_model::rules::Rules;
use fleet_model::schema::{decode, encode};
use fleet_model::{DesiredState, Keys, UnitFile, UnitName, UnitOption, UnitRecord};
use fleet_store::etcd::Client;
use serde::Deserialize;
use std::ops::Bound;
use std::time::Duration;

#[derive(Clone)]
pub struct Api {
    pub client: Client,
    pub keys: Keys,
    pub cluster: Cluster,
    pub status: SharedStatus,
    pub token_limit: u16,
    /// HTTP client for agents' APIs (status, journal).
    pub agents: reqwest::Client,
    pub fleetlock: crate::fleetlock::FleetLockConfig,
    /// The newest etcd revision this replica wrote. Writes answer once committed; a later read
    /// through this replica first waits until its view shows this revision, so a client still
    /// reads its own writes without every write paying for the view's catch-up.
    pub written: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// Requests this replica has served (shown by `/engine/status`).
    pub requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Api {
    /// Records a committed write's revision (see [`Api::written`]).
    pub(crate) fn wrote(&self, revision: i64) {
        self.written.fetch_max(revision, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The API behind its auth middleware: every request is identified and checked first.
pub fn router(api: Api, auth: std::sync::Arc<Auth>) -> Router {
    let v1 = Router::new()
        .route(
            "/units",
            get(list_units)
                .post(create_units.layer(batch_limit()))
                .fallback(|req| refuse(req, method_not_allowed("only GET and POST supported against this resource"))),
        )
        .route(
            "/units/{name}",
            get(get_unit).put(put_unit).delete(delete_unit).fallback(|req| {
                refuse(req, method_not_allowed("only GET, PUT and DELETE supported against this resource"))
            }),
        )
        .route("/units:batchGet", axum::routing::post(crate::batch::batch_get.layer(batch_limit())))
        .route("/units:batchUpdate", axum::routing::post(crate::batch::batch_update.layer(batch_limit())))
        .route("/units:batchDelete", axum::routing::post(crate::batch::batch_delete.layer(batch_limit())))
        .route("/units:wait", axum::routing::post(crate::batch::wait.layer(batch_limit())))
        .route("/units/{name}/status", get(unit_status))
        .route("/units/{name}/journal", get(unit_journal))
        .route(
            "/units/{name}/move",
            axum::routing::post(move_unit).delete(forget_move).fallback(|req| {
                refuse(req, method_not_allowed("only POST and DELETE supported against this resource"))
            }),
        )
        .route(
            "/state",
            get(list_states)
                .fallback(|req| refuse(req, method_not_allowed("only GET supported against this resource"))),
        )
        .route(
            "/state/{name}",
            get(get_state).fallback(|req| refuse(req, method_not_allowed("only GET supported against this resource"))),
        )
        .route(
            "/machines",
            get(list_machines)
                .patch(patch_machines)
                .fallback(|req| refuse(req, method_not_allowed("only GET and PATCH supported against this resource"))),
        )
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], crate::openapi::document()) }),
        )
        .route(
            "/machines/{id}/drain",
            axum::routing::post(drain_machine).delete(undrain_machine).fallback(|req| {
                refuse(req, method_not_allowed("only POST and DELETE supported against this resource"))
            }),
        )
        .route(
            "/discovery",
            get(discovery)
                .fallback(|req| refuse(req, ApiError::bad_request("only HTTP GET supported against this resource"))),
        );
    let v1 = v1
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(refuse_oversized));
    let not_allowed = |req| refuse(req, ApiError::new(StatusCode::METHOD_NOT_ALLOWED, ""));
    Router::new()
        .nest("/fleet/v1", v1.clone())
        // The original's legacy prefix, with the same handlers.
        .nest("/v1-alpha", v1)
        .route("/", axum::routing::any(not_allowed))
        .route("/fleet/v1", axum::routing::any(not_allowed))
        .route("/engine/status", get(engine_status))
        .route("/v1/pre-reboot", axum::routing::post(crate::fleetlock::pre_reboot))
        .route("/v1/steady-state", axum::routing::post(crate::fleetlock::steady_state))
        .fallback(|req| refuse(req, ApiError::new(StatusCode::NOT_FOUND, "")))
        .layer(axum::middleware::from_fn_with_state(auth, crate::auth::authorize))
        .layer(axum::middleware::from_fn_with_state(api.requests.clone(), count_request))
        .layer(axum::middleware::map_response(server_header))
        .with_state(api)
}

/// The body limit of a request naming many units.
fn batch_limit() -> axum::extract::DefaultBodyLimit {
    axum::extract::DefaultBodyLimit::max(MAX_BATCH_BODY_BYTES)
}

/// Counts every request, refused or not: what a client costs the engine is visible from outside.
async fn count_request(
    State(count): State<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    next.run(req).await
}

/// fleet's discovery document (Google discovery format); `$ENDPOINT` is left for clients to fill.
pub const DISCOVERY: &str = include_str!("discovery.json");

async fn discovery() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DISCOVERY).into_response()
}

/// How much of an oversized body is read and thrown away so the client sees the 413.
const OVERSIZED_DRAIN_BYTES: u64 = 16 << 20;
const OVERSIZED_DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

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
async fn refuse(req: axum::extract::Request, error: ApiError) -> ApiError {
    drain(req).await;
    error
}

/// Refuses a body whose declared length is over the route's limit before any handler runs.
/// Answering and closing while the client is still writing makes it see a broken pipe
/// instead of the answer (as nginx's lingering close knows), so a moderately oversized body
/// is read to its end, unparsed and bounded in size and time, before the 413.
async fn refuse_oversized(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
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
async fn server_header(resp: Response) -> Response {
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

/// An etcd call with retries on transient errors: with several members, a request can land on a
/// dead one, and the next attempt picks another.
pub(crate) async fn etcd<T, F, Fut>(what: &str, op: F) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    etcd_within(what, Duration::from_secs(3), op).await
}

/// [`etcd`] for bulk writes, which may queue behind a busy cluster's other writers.
pub(crate) async fn etcd_patient<T, F, Fut>(what: &str, op: F) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    etcd_within(what, Duration::from_secs(30), op).await
}

/// One etcd transaction with [`etcd`]'s retries (or [`etcd_patient`]'s, for bulk writes).
pub(crate) async fn etcd_txn(
    api: &Api,
    what: &str,
    txn: &Txn,
    patient: bool,
) -> Result<etcd_client::TxnResponse, ApiError> {
    let op = || {
        let mut kv = api.client.kv_client();
        let t = txn.clone();
        async move { kv.txn(t).await }
    };
    match patient {
        true => etcd_patient(what, op).await,
        false => etcd(what, op).await,
    }
}

/// Four attempts of at most `attempt` each; an etcd that cannot be reached is a 503.
async fn etcd_within<T, F, Fut>(what: &str, attempt: Duration, op: F) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let policy = fleet_store::retry::RetryPolicy {
        attempts: 4,
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        timeout: attempt,
    };
    policy.run(what, fleet_store::etcd::is_transient, op).await.map_err(|e| {
        tracing::warn!(error = %e, "API request failed on etcd");
        match e {
            fleet_store::retry::RetryError::Failed { source, .. } => ApiError::from(source),
            fleet_store::retry::RetryError::TimedOut { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "fleet server unable to communicate with etcd")
            }
        }
    })
}

/// Waits until this replica's view shows `revision`; if its watch seems stuck (a dead etcd
/// member), restarts the watch and waits once more.
pub(crate) async fn settle(api: &Api, revision: i64) {
    if !api.cluster.caught_up(revision, Duration::from_secs(1)).await {
        api.cluster.kick();
        api.cluster.caught_up(revision, Duration::from_secs(5)).await;
    }
}

fn method_not_allowed(msg: &str) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, msg)
}

impl From<etcd_client::Error> for ApiError {
    fn from(e: etcd_client::Error) -> Self {
        if fleet_store::etcd::is_transient(&e) {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "fleet server unable to communicate with etcd")
        } else {
            ApiError::internal(format!("etcd: {e}"))
        }
    }
}

/// Where a unit is scheduled and how far its machine got (`currentState`), as the API shows
/// them; both empty for a global unit (its per-machine states are in /state).
pub(crate) fn placement_of(v: &ClusterView, rec: &UnitRecord) -> (DesiredState, Option<String>) {
    if matches!(v.rules.get(&rec.name), Some(Ok(r)) if r.global) {
        return (DesiredState::Inactive, None);
    }
    match v.schedule.get(&rec.name).and_then(|e| e.iter().next()) {
        None => (DesiredState::Inactive, Some(String::new())),
        Some((m, _)) => {
            let state = v.states.get(&rec.name).and_then(|s| s.get(m)).filter(|s| s.hash == rec.hash);
            (state.map(|s| s.applied).unwrap_or(DesiredState::Inactive), Some(m.clone()))
        }
    }
}

/// A unit as the API shows it: stored options and desired state, plus where it is scheduled
/// and how far its machine got (`currentState`).
pub(crate) fn api_unit(v: &ClusterView, rec: &UnitRecord) -> wire::Unit {
    let options =
        v.bodies.get(&rec.hash).and_then(|(text, _)| UnitFile::parse(text).ok()).map(|f| f.options).unwrap_or_default();
    let (current, machine) = match placement_of(v, rec) {
        (_, None) => (String::new(), String::new()),
        (state, Some(m)) => (state.to_string(), m),
    };
    wire::Unit {
        name: rec.name.to_string(),
        options,
        desired_state: rec.desired_state.to_string(),
        current_state: current,
        machine_id: machine,
        reason: v.why.get(&rec.name).cloned().unwrap_or_default(),
        move_refused: v.moves.get(&rec.name).map(|m| m.refused.clone()).unwrap_or_default(),
    }
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    #[serde(rename = "nextPageToken")]
    next_page_token: Option<String>,
    #[serde(rename = "unitName")]
    unit_name: Option<String>,
    #[serde(rename = "machineID")]
    machine_id: Option<String>,
}

/// Where a page starts. fleet's page tokens are base64url of a little-endian u16 limit and u16
/// page number; ours append the last key of the page before, so the next page is a range lookup
/// in the view rather than a skip from its start (page numbers alone made a full listing of
/// 100,000 states quadratic). Clients treat tokens as opaque: fleet's clients follow ours, and
/// tokens made by fleet (no key) are still honoured by page number.
#[derive(Debug, Default, PartialEq)]
struct PageStart {
    page: u16,
    after: Option<String>,
}

impl PageStart {
    /// How many items to skip in a listing that already starts after `after`.
    fn skip(&self, limit: u16) -> usize {
        match self.after {
            Some(_) => 0,
            None => (self.page as usize).saturating_sub(1) * limit as usize,
        }
    }
}

fn page_of(token: Option<&str>, limit: u16) -> Result<PageStart, ApiError> {
    let Some(token) = token else { return Ok(PageStart { page: 1, after: None }) };
    let bytes = base64::engine::general_purpose::URL_SAFE
        .decode(token)
        .map_err(|_| ApiError::bad_request("invalid page token"))?;
    if bytes.len() < 4 {
        return Err(ApiError::bad_request("invalid page token"));
    }
    let (l, p) = (u16::from_le_bytes([bytes[0], bytes[1]]), u16::from_le_bytes([bytes[2], bytes[3]]));
    if l != limit {
        return Err(ApiError::bad_request(format!("token limit must be {limit}")));
    }
    if p == 0 {
        return Err(ApiError::bad_request("token page must be greater than zero"));
    }
    let after = match &bytes[4..] {
        [] => None,
        key => Some(String::from_utf8(key.to_vec()).map_err(|_| ApiError::bad_request("invalid page token"))?),
    };
    Ok(PageStart { page: p, after })
}

fn token(limit: u16, page: u16, after: &str) -> String {
    let mut b = limit.to_le_bytes().to_vec();
    b.extend(page.to_le_bytes());
    b.extend(after.as_bytes());
    base64::engine::general_purpose::URL_SAFE.encode(b)
}

/// One page of `items`, which starts after `start.after` when the token carried a key. Callers
/// pass a lazy iterator and build the (costly) API objects after paging. `key` names an item
/// in the order of the listing, for the next token.
fn paginate<T>(
    items: impl IntoIterator<Item = T>,
    start: &PageStart,
    limit: u16,
    key: impl Fn(&T) -> String,
) -> (Vec<T>, Option<String>) {
    let chunk: Vec<T> = items.into_iter().skip(start.skip(limit)).take(limit as usize).collect();
    let next = match chunk.last() {
        Some(last) if chunk.len() == limit as usize => Some(token(limit, start.page.saturating_add(1), &key(last))),
        _ => None,
    };
    (chunk, next)
}

/// The bound a range over the view starts from.
fn after(start: &PageStart) -> Bound<&str> {
    start.after.as_deref().map_or(Bound::Unbounded, Bound::Excluded)
}

fn ready(api: &Api) -> Result<(), ApiError> {
    if api.cluster.revision() == 0 {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "fleet server unable to communicate with etcd"));
    }
    Ok(())
}

/// [`ready`], and the view shows every write this replica answered (read your own writes).
pub(crate) async fn fresh(api: &Api) -> Result<(), ApiError> {
    ready(api)?;
    let written = api.written.load(std::sync::atomic::Ordering::Relaxed);
    if api.cluster.revision() < written {
        settle(api, written).await;
    }
    Ok(())
}

async fn list_units(State(api): State<Api>, Query(q): Query<PageQuery>) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let start = page_of(q.next_page_token.as_deref(), api.token_limit)?;
    let (units, next) = api.cluster.read(|v| {
        let from = v.units.range::<str, _>((after(&start), Bound::Unbounded)).map(|(_, u)| u);
        let (page, next) = paginate(from, &start, api.token_limit, |u| u.name.to_string());
        (page.into_iter().map(|u| api_unit(v, u)).collect::<Vec<wire::Unit>>(), next)
    });
    Ok(Json(wire::UnitPage { units, next_page_token: next }).into_response())
}

pub(crate) fn parse_name(name: &str) -> Result<UnitName, ApiError> {
    UnitName::parse(name).map_err(|e| ApiError::bad_request(e.to_string()))
}

async fn get_unit(State(api): State<Api>, Path(name): Path<String>) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let name = parse_name(&name)?;
    if let Some(u) = api.cluster.read(|v| v.units.get(&name).map(|u| api_unit(v, u))) {
        return Ok(Json(u).into_response());
    }
    // Not in this replica's view. Before saying 404, ask etcd itself: the view may lag a write
    // just made through another path (its watch can sit on an etcd member that died).
    let key = api.keys.unit(&name);
    let resp = etcd("read unit", || {
        let mut kv = api.client.kv_client();
        let k = key.clone();
        async move { kv.get(k, None).await }
    })
    .await?;
    let Some(rec) = resp.kvs().first().and_then(|kv| decode::<UnitRecord>(kv.value()).ok()) else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unit does not exist"));
    };
    api.cluster.kick();
    let body_key = api.keys.body(&rec.hash);
    let body = etcd("read unit body", || {
        let mut kv = api.client.kv_client();
        let k = body_key.clone();
        async move { kv.get(k, None).await }
    })
    .await?;
    let options = body
        .kvs()
        .first()
        .and_then(|kv| UnitFile::parse(&String::from_utf8_lossy(kv.value())).ok())
        .map(|f| f.options)
        .unwrap_or_default();
    Ok(Json(wire::Unit {
        name: rec.name.to_string(),
        options,
        desired_state: rec.desired_state.to_string(),
        current_state: DesiredState::Inactive.to_string(),
        ..Default::default()
    })
    .into_response())
}

pub(crate) fn check_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let types: Vec<_> = headers.get_all(header::CONTENT_TYPE).iter().collect();
    if types.len() != 1 {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("expected 1 Content-Type, got {}", types.len()),
        ));
    }
    let media = types[0].to_str().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if media != "application/json" {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "only acceptable Content-Type is application/json",
        ));
    }
    Ok(())
}

/// A `PUT /units/{name}` request, checked without looking at the cluster.
#[derive(Debug)]
pub struct PutUnit {
    pub name: UnitName,
    pub desired: Option<DesiredState>,
    /// The unit file, when the request carries one, and its rules.
    pub file: Option<(UnitFile, Rules)>,
}

/// Decodes and validates a `PUT /units/{name}` body: everything that can be said about it
/// without the cluster (the fuzz target `api_put_unit` drives this with arbitrary input).
pub fn parse_put_unit(url_name: &str, body: &[u8]) -> Result<PutUnit, ApiError> {
    let req: wire::Unit =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("unable to decode body: {e}")))?;
    if !req.name.is_empty() && req.name != url_name {
        return Err(ApiError::bad_request(format!(
            "name in URL {url_name:?} differs from unit name in request body {:?}",
            req.name
        )));
    }
    check_put(url_name, &req.desired_state, req.options)
}

/// What a request to change one unit says, checked without looking at the cluster: its name, a
/// desired state (empty: unchanged) and unit file options (empty: unchanged).
pub(crate) fn check_put(name: &str, desired: &str, options: Vec<UnitOption>) -> Result<PutUnit, ApiError> {
    let name = parse_name(name)?;
    let desired = match desired {
        "" => None,
        s => Some(s.parse::<DesiredState>().map_err(|e| ApiError::bad_request(e.to_string()))?),
    };
    if name.is_template() && desired.is_some_and(|d| d != DesiredState::Inactive) {
        return Err(ApiError::bad_request(format!("cannot activate template {:?}", name.as_str())));
    }
    let file = match options.is_empty() {
        true => None,
        false => {
            let f = UnitFile::from_options(options);
            validate_options(&f)?;
            // What depends on the instance is checked when an instance is made.
            let rules = match name.is_template() {
                true => Rules::parse_template(&name, &f),
                false => Rules::parse(&name, &f),
            }
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
            Some((f, rules))
        }
    };
    Ok(PutUnit { name, desired, file })
}

async fn put_unit(
    State(api): State<Api>,
    caller: Option<axum::Extension<Caller>>,
    Path(url_name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_json(&headers)?;
    let PutUnit { name, desired, file } = parse_put_unit(&url_name, &body)?;
    if let Some((_, rules)) = &file {
        check_replace_cycles(&api, &name, rules)?;
    }
    fresh(&api).await?;
    let key = api.keys.unit(&name);
    // Optimistic concurrency: read, decide, write only if the unit did not change meanwhile.
    for _ in 0..5 {
        let resp = etcd("read unit", || {
            let mut kv = api.client.kv_client();
            let k = key.clone();
            async move { kv.get(k, None).await }
        })
        .await?;
        let existing = resp.kvs().first().map(|kv| (decode::<UnitRecord>(kv.value()), kv.mod_revision()));
        let new_file = file.as_ref().map(|(f, _)| f.clone());
        // New unit, or new contents: the body's desired state or `inactive`, guarded by what was read.
        let fresh = |f: &UnitFile, guard: Compare| {
            let rec = UnitRecord {
                name: name.clone(),
                hash: f.hash(),
                desired_state: desired.unwrap_or(DesiredState::Inactive),
            };
            (StatusCode::CREATED, rec, Some(f.canonical()), guard)
        };
        let submits = match (&existing, &new_file) {
            (None, _) => true,
            (Some((Ok(old), _)), Some(f)) => f.hash() != old.hash,
            _ => false,
        };
        if submits {
            let caller = caller.as_ref().map(|c| c.0.clone()).unwrap_or(Caller {
                who: "?".into(),
                role: Role::Read,
                machine: None,
            });
            caller.require(Role::Admin, &format!("submitting the unit file of {name}"))?;
        }
        let (status, record, body_text, guard) = match (existing, new_file) {
            (None, None) => {
                return Err(ApiError::new(StatusCode::CONFLICT, "unit does not exist and options field empty"))
            }
            (None, Some(f)) => fresh(&f, Compare::create_revision(key.clone(), CompareOp::Equal, 0)),
            (Some((Err(e), _)), _) => return Err(ApiError::internal(format!("stored unit is unreadable: {e}"))),
            (Some((Ok(old), rev)), Some(f)) if f.hash() != old.hash => {
                fresh(&f, Compare::mod_revision(key.clone(), CompareOp::Equal, rev))
            }
            (Some((Ok(old), rev)), _) => {
                let Some(d) = desired else {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "must provide DesiredState to update existing unit",
                    ));
                };
                if d == old.desired_state {
                    return Ok(StatusCode::NO_CONTENT.into_response());
                }
                (
                    StatusCode::NO_CONTENT,
                    UnitRecord { desired_state: d, ..old },
                    None,
                    Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
                )
            }
        };
        let mut ops = Vec::new();
        if let Some(text) = &body_text {
            ops.push(TxnOp::put(api.keys.body(&record.hash), text.clone(), None));
        }
        ops.push(TxnOp::put(key.clone(), encode(&record).map_err(|e| ApiError::internal(e.to_string()))?, None));
        let txn = Txn::new().when([guard]).and_then(ops);
        let resp = etcd_txn(&api, "write unit", &txn, false).await?;
        if resp.succeeded() {
            let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
            api.wrote(rev);
            let what = if body_text.is_some() { "unit file submitted, " } else { "" };
            let detail = AuditDetail(format!("{what}desired state {}", record.desired_state));
            return Ok((status, axum::Extension(detail)).into_response());
        }
    }
    Err(ApiError::new(StatusCode::CONFLICT, format!("unit {name} changed concurrently; try again")))
}

/// Most units one `POST /fleet/v1/units` may create.
pub const MAX_UNITS_PER_REQUEST: usize = wire::MAX_UNITS_PER_REQUEST;
/// Units per etcd transaction (a unit and its body are two operations, under etcd's 128).
pub(crate) const UNITS_PER_TXN: usize = 60;

/// Decodes and validates a `POST /units` body: every unit, before anything is written (the
/// fuzz target `api_create_units` drives this with arbitrary input).
pub fn parse_create_units(body: &[u8]) -> Result<Vec<(UnitRecord, UnitFile, Option<Rules>)>, ApiError> {
    let req: wire::CreateUnits =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("unable to decode body: {e}")))?;
    if req.units.is_empty() {
        return Err(ApiError::bad_request("units is empty"));
    }
    if req.units.len() > MAX_UNITS_PER_REQUEST {
        return Err(ApiError::bad_request(format!(
            "{} units in one request; at most {MAX_UNITS_PER_REQUEST}",
            req.units.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    let mut records = Vec::with_capacity(req.units.len());
    for (i, u) in req.units.iter().enumerate() {
        let at = |e: String| ApiError::bad_request(format!("units[{i}] ({}): {e}", u.name));
        let name = UnitName::parse(&u.name).map_err(|e| at(e.to_string()))?;
        if !seen.insert(name.clone()) {
            return Err(at("named twice in this request".into()));
        }
        if u.options.is_empty() {
            return Err(at("options field empty".into()));
        }
        let desired = match u.desired_state.as_str() {
            "" => DesiredState::Inactive,
            s => s.parse::<DesiredState>().map_err(|e| at(e.to_string()))?,
        };
        if name.is_template() && desired != DesiredState::Inactive {
            return Err(at("cannot activate a template".into()));
        }
        let f = UnitFile::from_options(u.options.clone());
        validate_options(&f).map_err(|e| at(e.message))?;
        let rules = match name.is_template() {
            true => {
                Rules::parse_template(&name, &f).map_err(|e| at(e.to_string()))?;
                None
            }
            false => Some(Rules::parse(&name, &f).map_err(|e| at(e.to_string()))?),
        };
        records.push((UnitRecord { name, hash: f.hash(), desired_state: desired }, f, rules));
    }
    Ok(records)
}

/// Not in the original API: creates many new units in one request, as many small transactions
/// (each unit with its body, guarded so an existing unit is never overwritten). Everything is
/// validated before anything is written; a unit that already exists is refused with 409 and the
/// units of that transaction are not written (those of earlier transactions are).
async fn create_units(
    State(api): State<Api>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_json(&headers)?;
    let units = parse_create_units(&body)?;
    let mut records = Vec::with_capacity(units.len());
    for (i, (record, f, rules)) in units.into_iter().enumerate() {
        if let Some(rules) = &rules {
            check_replace_cycles(&api, &record.name, rules)
                .map_err(|e| ApiError::bad_request(format!("units[{i}] ({}): {}", record.name, e.message)))?;
        }
        records.push((record, f.canonical()));
    }
    fresh(&api).await?;
    tracing::debug!(units = records.len(), "creating units");
    let mut last_rev = 0;
    for chunk in records.chunks(UNITS_PER_TXN) {
        let mut chunk: Vec<&(UnitRecord, String)> = chunk.iter().collect();
        // A unit that exists with the same contents and desired state counts as created, so a
        // client may retry a request whose answer it did not get.
        for _ in 0..3 {
            match write_new_units(&api, &chunk).await? {
                Ok(rev) => {
                    last_rev = rev;
                    chunk.clear();
                    break;
                }
                Err(existing) => {
                    let differing: Vec<String> = existing
                        .iter()
                        .filter(|(name, stored)| {
                            chunk.iter().any(|(r, _)| r.name.as_str() == name.as_str() && Some(r) != stored.as_ref())
                        })
                        .map(|(n, _)| n.clone())
                        .collect();
                    if !differing.is_empty() {
                        return Err(ApiError::new(
                            StatusCode::CONFLICT,
                            format!(
                                "units already exist with other contents or state: {}; units before them in the request were created",
                                differing.join(" ")
                            ),
                        ));
                    }
                    chunk.retain(|(r, _)| !existing.iter().any(|(n, _)| n.as_str() == r.name.as_str()));
                    if chunk.is_empty() {
                        break;
                    }
                }
            }
        }
        if !chunk.is_empty() {
            return Err(ApiError::new(StatusCode::CONFLICT, "units changed concurrently; try again"));
        }
    }
    tracing::debug!(units = records.len(), revision = last_rev, "units created; settling");
    api.wrote(last_rev);
    Ok((StatusCode::CREATED, Json(wire::Created { created: records.len(), revision: last_rev })).into_response())
}

/// Writes units that must not exist yet, in one transaction. `Ok(revision)`, or the units of
/// `chunk` that exist already with what is stored for them.
async fn write_new_units(
    api: &Api,
    chunk: &[&(UnitRecord, String)],
) -> Result<Result<i64, Vec<(String, Option<UnitRecord>)>>, ApiError> {
    {
        let mut guards = Vec::new();
        let mut ops = Vec::new();
        let mut bodies = std::collections::HashSet::new();
        for (rec, text) in chunk {
            let key = api.keys.unit(&rec.name);
            guards.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
            if bodies.insert(rec.hash.clone()) {
                ops.push(TxnOp::put(api.keys.body(&rec.hash), text.as_str(), None));
            }
            ops.push(TxnOp::put(key, encode(rec).map_err(|e| ApiError::internal(e.to_string()))?, None));
        }
        let txn = Txn::new().when(guards).and_then(ops);
        let resp = etcd_txn(api, "write units", &txn, true).await?;
        if resp.succeeded() {
            return Ok(Ok(resp.header().map(|h| h.revision()).unwrap_or(0)));
        }
        let mut existing = Vec::new();
        for (rec, _) in chunk {
            let key = api.keys.unit(&rec.name);
            let got = etcd_patient("read unit", || {
                let mut kv = api.client.kv_client();
                let k = key.clone();
                async move { kv.get(k, None).await }
            })
            .await?;
            if let Some(kv) = got.kvs().first() {
                existing.push((rec.name.to_string(), decode::<UnitRecord>(kv.value()).ok()));
            }
        }
        Ok(Err(existing))
    }
}

/// Refuses a unit that would replace a unit which replaces it: neither could ever settle.
pub(crate) fn check_replace_cycles(api: &Api, name: &UnitName, rules: &Rules) -> Result<(), ApiError> {
    if rules.replaces.is_empty() {
        return Ok(());
    }
    api.cluster.read(|v| {
        for (other, r) in v.rules.iter().filter(|(o, _)| *o != name) {
            if let Ok(r) = r {
                if rules.replaces_unit(name.as_str(), other.as_str()) && r.replaces_unit(other.as_str(), name.as_str())
                {
                    return Err(ApiError::bad_request(format!(
                        "circular Replaces: {name} and {other} replace each other"
                    )));
                }
            }
        }
        Ok(())
    })
}

/// Rejects unit files fleet could not run.
/// Largest unit file accepted, as stored (sections, names and values).
pub const MAX_UNIT_FILE_BYTES: usize = 64 * 1024;
/// Most options in one unit file.
pub const MAX_UNIT_OPTIONS: usize = 1000;
/// Largest request body, except a batch of units.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Largest `POST /units` body (up to [`MAX_UNITS_PER_REQUEST`] units).
pub const MAX_BATCH_BODY_BYTES: usize = 64 << 20;

pub(crate) fn validate_options(f: &UnitFile) -> Result<(), ApiError> {
    if f.options.len() > MAX_UNIT_OPTIONS {
        return Err(ApiError::bad_request(format!(
            "unit file has {} options; at most {MAX_UNIT_OPTIONS}",
            f.options.len()
        )));
    }
    let size: usize = f.options.iter().map(|o| o.section.len() + o.name.len() + o.value.len() + 4).sum();
    if size > MAX_UNIT_FILE_BYTES {
        return Err(ApiError::bad_request(format!("unit file is {size} bytes; at most {MAX_UNIT_FILE_BYTES}")));
    }
    for o in &f.options {
        if o.section.is_empty() || o.name.is_empty() {
            return Err(ApiError::bad_request("unit option with empty section or name"));
        }
        if o.section.contains(['[', ']', '\n']) || o.name.contains(['=', '\n']) {
            return Err(ApiError::bad_request(format!("invalid unit option [{}] {}", o.section, o.name)));
        }
        if o.value.len() >= fleet_model::unit_file::MAX_LINE {
            return Err(ApiError::bad_request(format!(
                "option [{}] {}: line too long (max {} bytes)",
                o.section,
                o.name,
                fleet_model::unit_file::MAX_LINE
            )));
        }
    }
    Ok(())
}

/// Not in the original API: asks the leader to move a placed unit to `machineID` (full id or
/// unique prefix), or to the best other machine when none is given. 202: the request is stored;
/// the unit's `machineID` changes when it is done, or `moveRefused` says why it was not.
async fn move_unit(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let name = parse_name(&name)?;
    fresh(&api).await?;
    let req: wire::MoveRequest = if body.is_empty() {
        wire::MoveRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("unable to decode body: {e}")))?
    };
    let request = api.cluster.read(|v| {
        if !v.units.contains_key(&name) {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "unit does not exist"));
        }
        if matches!(v.rules.get(&name), Some(Ok(r)) if r.global) {
            return Err(ApiError::bad_request(format!("{name} is global: it runs on every eligible machine")));
        }
        let Some(from) = v.schedule.get(&name).and_then(|e| e.keys().next()).cloned() else {
            return Err(ApiError::new(StatusCode::CONFLICT, format!("{name} is not scheduled to any machine")));
        };
        let to = if req.machine_id.is_empty() {
            String::new()
        } else {
            let matches: Vec<&String> = v.machines.keys().filter(|m| m.starts_with(&req.machine_id)).collect();
            match matches.as_slice() {
                [one] => (*one).clone(),
                [] => return Err(ApiError::bad_request(format!("no machine matches {:?}", req.machine_id))),
                _ => return Err(ApiError::bad_request(format!("machine id {:?} is ambiguous", req.machine_id))),
            }
        };
        if to == from {
            return Err(ApiError::bad_request(format!("{name} already runs on {to}")));
        }
        Ok(fleet_model::schema::MoveRequest { from, to, refused: String::new() })
    })?;
    let value = encode(&request).map_err(|e| ApiError::internal(e.to_string()))?;
    let key = api.keys.moves(&name);
    let resp = etcd("write move request", || {
        let mut kv = api.client.kv_client();
        let (k, v) = (key.clone(), value.clone());
        async move { kv.put(k, v, None).await }
    })
    .await?;
    if let Some(h) = resp.header() {
        api.wrote(h.revision());
    }
    Ok((StatusCode::ACCEPTED, Json(wire::MoveAccepted { from: request.from, machine_id: request.to })).into_response())
}

/// Forgets a (refused) move request.
async fn forget_move(State(api): State<Api>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let name = parse_name(&name)?;
    fresh(&api).await?;
    let key = api.keys.moves(&name);
    etcd("delete move request", || {
        let mut kv = api.client.kv_client();
        let k = key.clone();
        async move { kv.delete(k, None).await }
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_unit(State(api): State<Api>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let name = parse_name(&name)?;
    fresh(&api).await?;
    let key = api.keys.unit(&name);
    let resp = etcd("delete unit", || {
        let mut kv = api.client.kv_client();
        let k = key.clone();
        async move { kv.delete(k, None).await }
    })
    .await?;
    if resp.deleted() == 0 {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unit does not exist"));
    }
    if let Some(h) = resp.header() {
        api.wrote(h.revision());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_states(State(api): State<Api>, Query(q): Query<PageQuery>) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let start = page_of(q.next_page_token.as_deref(), api.token_limit)?;
    // A state's key in the listing is its unit and machine; unit names cannot hold a NUL.
    let cursor = start.after.as_deref().map(|a| a.split_once('\0').unwrap_or((a, "")));
    let (states, next) = api.cluster.read(|v| {
        let from = cursor.map_or(Bound::Unbounded, |(u, _)| Bound::Included(u));
        let matching = v
            .states
            .range::<str, _>((from, Bound::Unbounded))
            .filter(|(u, _)| q.unit_name.as_deref().is_none_or(|n| n == u.as_str()))
            .flat_map(|(u, per)| {
                per.iter()
                    .filter(|(m, _)| q.machine_id.as_deref().is_none_or(|id| id == m.as_str()))
                    .map(move |(m, s)| (u, m, s))
            })
            .skip_while(|(u, m, _)| cursor.is_some_and(|c| (u.as_str(), m.as_str()) <= c));
        let (page, next) = paginate(matching, &start, api.token_limit, |(u, m, _)| format!("{u}\0{m}"));
        let states: Vec<wire::UnitState> = page
            .into_iter()
            .map(|(u, m, s)| wire::UnitState {
                name: u.to_string(),
                hash: s.hash.clone(),
                machine_id: m.clone(),
                systemd_load_state: s.load_state.clone(),
                systemd_active_state: s.active_state.clone(),
                systemd_sub_state: s.sub_state.clone(),
            })
            .collect();
        (states, next)
    });
    Ok(Json(wire::UnitStatePage { states, next_page_token: next }).into_response())
}

#[derive(Debug, Deserialize)]
struct ProxyQuery {
    #[serde(rename = "machineID")]
    machine_id: Option<String>,
    lines: Option<u32>,
    follow: Option<bool>,
    output: Option<String>,
}

/// The agents (machine id, agent URL) that report `unit`, limited to `machine` if given.
fn agents_of(api: &Api, unit: &UnitName, machine: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    api.cluster.read(|v| {
        if !v.units.contains_key(unit) {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "unit does not exist"));
        }
        let placed: Vec<&String> = v.schedule.get(unit).map(|e| e.keys().collect()).unwrap_or_default();
        let chosen: Vec<&String> =
            placed.into_iter().filter(|m| machine.is_none_or(|want| m.starts_with(want))).collect();
        if chosen.is_empty() {
            return Err(ApiError::new(StatusCode::CONFLICT, format!("{unit} does not appear to be loaded")));
        }
        Ok(chosen
            .into_iter()
            .map(|m| (m.clone(), v.machines.get(m).map(|r| r.agent_url.clone()).unwrap_or_default()))
            .collect())
    })
}

/// The client the engine reaches agents with: with the cluster's TLS files it trusts only the
/// cluster CA and presents the engine's certificate, which agents require.
pub fn agent_client(tls: Option<&fleet_store::tls::ClientTls>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(3)).use_rustls_tls();
    if let Some(tls) = tls {
        let (ca, identity) = tls.pems()?;
        builder = builder
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
            .identity(reqwest::Identity::from_pem(&identity)?);
    }
    Ok(builder.build()?)
}

/// Not in the original API: `systemctl status` of a unit on its machine(s), fetched from the
/// agents: `{"statuses":[{"machineID","exitCode","output"}]}`.
async fn unit_status(
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(q): Query<ProxyQuery>,
) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let name = parse_name(&name)?;
    let client = api.agents.clone();
    let mut statuses = Vec::new();
    for (machine, url) in agents_of(&api, &name, q.machine_id.as_deref())? {
        if url.is_empty() {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("the agent of machine {machine} serves no status"),
            ));
        }
        let resp = client
            .get(format!("{url}/units/{}/status", percent(name.as_str())))
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("agent of machine {machine}: {e}")))?;
        let mut status: wire::AgentStatus = resp
            .json()
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("agent of machine {machine}: {e}")))?;
        status.machine_id = machine;
        statuses.push(status);
    }
    Ok(Json(wire::UnitStatuses { statuses }).into_response())
}

/// Not in the original API: a unit's journal from its machine's agent, streamed as text; with
/// `follow=true` it stays open. A global unit needs `machineID`.
async fn unit_journal(
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(q): Query<ProxyQuery>,
) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let name = parse_name(&name)?;
    let agents = agents_of(&api, &name, q.machine_id.as_deref())?;
    let [(machine, url)] = agents.as_slice() else {
        return Err(ApiError::bad_request(format!(
            "Unable to retrieve journal of global unit {name}: name a machine with machineID"
        )));
    };
    if url.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("the agent of machine {machine} serves no journal"),
        ));
    }
    let mut req = api.agents.get(format!("{url}/units/{}/journal", percent(name.as_str()))).query(&[
        ("lines", q.lines.unwrap_or(10).to_string()),
        ("follow", q.follow.unwrap_or(false).to_string()),
        ("output", q.output.clone().unwrap_or_else(|| "short".into())),
    ]);
    if !q.follow.unwrap_or(false) {
        req = req.timeout(Duration::from_secs(30));
    }
    let resp = req
        .send()
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("agent of machine {machine}: {e}")))?;
    if !resp.status().is_success() {
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let text = resp.text().await.unwrap_or_default();
        return Err(ApiError::new(status, format!("agent of machine {machine}: {text}")));
    }
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(axum::body::Body::from_stream(resp.bytes_stream()))
        .unwrap_or_else(|e| ApiError::internal(e.to_string()).into_response()))
}

fn percent(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn get_state(State(api): State<Api>, Path(name): Path<String>) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let name = parse_name(&name)?;
    api.cluster
        .read(|v| {
            v.states.get(&name).and_then(|per| per.iter().next()).map(|(m, s)| wire::UnitState {
                name: name.to_string(),
                hash: s.hash.clone(),
                machine_id: m.clone(),
                systemd_load_state: s.load_state.clone(),
                systemd_active_state: s.active_state.clone(),
                systemd_sub_state: s.sub_state.clone(),
            })
        })
        .map(|s| Json(s).into_response())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unit state does not exist"))
}

/// `PATCH /machines`: add/replace/remove metadata keys. Every operation is validated first and
/// all are applied in one etcd transaction, so a bad operation changes nothing.
async fn patch_machines(State(api): State<Api>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let ops: Vec<wire::MetadataOp> =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("unable to decode body: {e}")))?;
    if ops.len() > fleet_model::machine::MAX_METADATA_KEYS {
        return Err(ApiError::bad_request(format!(
            "{} operations in one request; at most {}",
            ops.len(),
            fleet_model::machine::MAX_METADATA_KEYS
        )));
    }
    let mut writes = Vec::new();
    for op in &ops {
        let parts: Vec<&str> = op.path.split('/').collect();
        let (machine, key) = match parts.as_slice() {
            ["", m, "metadata", k] if fleet_model::machine::parse_machine_id(m).is_ok() => (*m, *k),
            // The original's message, word for word: clients match on it.
            _ => return Err(ApiError::bad_request("machine metadata path invalid")),
        };
        let value = match op.value.as_ref() {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Object(o)) => o.get("value").and_then(|v| v.as_str()).unwrap_or("").to_string(),
            _ => String::new(),
        };
        fleet_model::machine::check_metadata(key, &value)
            .map_err(|e| ApiError::bad_request(format!("machine metadata: {e}")))?;
        match op.op.as_str() {
            "add" | "replace" if value.is_empty() => {
                return Err(ApiError::bad_request("invalid value: add and replace require a value"))
            }
            "add" | "replace" => writes.push(TxnOp::put(api.keys.metadata(machine, key), value, None)),
            // An empty value is a tombstone: it also hides a key from the machine's own config.
            "remove" => writes.push(TxnOp::put(api.keys.metadata(machine, key), "", None)),
            _ => return Err(ApiError::bad_request("invalid op: expect add, remove, or replace")),
        }
    }
    fresh(&api).await?;
    if !writes.is_empty() {
        let txn = Txn::new().and_then(writes);
        let resp = etcd_txn(&api, "write metadata", &txn, false).await?;
        if let Some(h) = resp.header() {
            api.wrote(h.revision());
        }
    }
    Ok((StatusCode::NO_CONTENT, [(header::CONTENT_TYPE, "application/json")]).into_response())
}

/// The one live machine whose id starts with `prefix`.
fn machine_by_prefix(api: &Api, prefix: &str) -> Result<String, ApiError> {
    api.cluster.read(|v| {
        let found: Vec<&String> = v.machines.keys().chain(v.drained.iter()).filter(|m| m.starts_with(prefix)).collect();
        let mut found: Vec<&String> =
            found.into_iter().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        match found.len() {
            1 => Ok(found.remove(0).clone()),
            0 => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no machine matches {prefix:?}"))),
            _ => Err(ApiError::bad_request(format!("machine id {prefix:?} is ambiguous"))),
        }
    })
}

/// Not in the original API: drain a machine. Its units are moved elsewhere and it takes no
/// new ones until undrained (DELETE).
async fn drain_machine(State(api): State<Api>, Path(id): Path<String>) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let id = machine_by_prefix(&api, &id)?;
    let key = api.keys.drain(&id);
    let resp = etcd("write drain", || {
        let mut kv = api.client.kv_client();
        let k = key.clone();
        async move { kv.put(k, "", None).await }
    })
    .await?;
    if let Some(h) = resp.header() {
        api.wrote(h.revision());
    }
    Ok((StatusCode::ACCEPTED, Json(wire::DrainAccepted { id })).into_response())
}

async fn undrain_machine(State(api): State<Api>, Path(id): Path<String>) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let id = machine_by_prefix(&api, &id)?;
    let key = api.keys.drain(&id);
    let resp = etcd("delete drain", || {
        let mut kv = api.client.kv_client();
        let k = key.clone();
        async move { kv.delete(k, None).await }
    })
    .await?;
    if let Some(h) = resp.header() {
        api.wrote(h.revision());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_machines(State(api): State<Api>, Query(q): Query<PageQuery>) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let start = page_of(q.next_page_token.as_deref(), api.token_limit)?;
    let (machines, next) = api.cluster.read(|v| {
        let from = v.machines.range::<str, _>((after(&start), Bound::Unbounded)).map(|(_, m)| m);
        let (page, next) = paginate(from, &start, api.token_limit, |m| m.id.clone());
        let machines: Vec<wire::Machine> = page
            .into_iter()
            .map(|m| wire::Machine {
                id: m.id.clone(),
                primary_ip: m.public_ip.clone(),
                metadata: m.metadata.clone(),
                drained: v.drained.contains(&m.id),
            })
            .collect();
        (machines, next)
    });
    Ok(Json(wire::MachinePage { machines, next_page_token: next }).into_response())
}

/// Not part of fleet's API: which engine leads, and why units could not be placed.
async fn engine_status(State(api): State<Api>) -> Response {
    let status = api.status.lock().map(|s| s.clone()).unwrap_or_default();
    let mut v = serde_json::to_value(status).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("revision".into(), api.cluster.revision().into());
        o.insert("requests".into(), api.requests.load(std::sync::atomic::Ordering::Relaxed).into());
    }
    Json(v).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_match_fleet() {
        assert_eq!(token(100, 2, ""), "ZAACAA==");
        assert_eq!(page_of(Some("ZAACAA=="), 100).ok(), Some(PageStart { page: 2, after: None }));
        assert_eq!(page_of(Some("EwBMLg=="), 100).map_err(|e| e.message), Err("token limit must be 100".to_string()));
        assert!(page_of(Some("ZAAAAA=="), 100).is_err());
        assert!(page_of(Some("!!"), 100).is_err());
        // A fleet token (page number only) skips; ours carry the last key and the caller's
        // iterator already starts after it.
        let key = |i: &i32| i.to_string();
        let (first, next) = paginate(0..5, &PageStart { page: 1, after: None }, 2, key);
        assert_eq!(first, vec![0, 1]);
        let next = page_of(next.as_deref(), 2).ok();
        assert_eq!(next, Some(PageStart { page: 2, after: Some("1".into()) }));
        let (last, next) = paginate(0..5, &PageStart { page: 3, after: None }, 2, key);
        assert_eq!((last, next), (vec![4], None));
        let (resumed, _) = paginate(2..5, &PageStart { page: 2, after: Some("1".into()) }, 2, key);
        assert_eq!(resumed, vec![2, 3]);
        let not_utf8 = base64::engine::general_purpose::URL_SAFE.encode([2, 0, 2, 0, 0xff]);
        assert!(page_of(Some(&not_utf8), 2).is_err());
    }

    #[test]
    fn unit_json_uses_fleet_field_names() {
        let u = wire::Unit {
            name: "a.service".into(),
            options: vec![],
            desired_state: "launched".into(),
            current_state: "inactive".into(),
            machine_id: "m".into(),
            reason: String::new(),
            move_refused: String::new(),
        };
        assert_eq!(
            serde_json::to_string(&u).ok().as_deref(),
            Some(r#"{"name":"a.service","desiredState":"launched","currentState":"inactive","machineID":"m"}"#)
        );
    }
}
