//! The API's handlers through the engine's real router, on the in-memory store: what a client
//! sees (status, body) and what is stored, with the store's faults injected. The view is fed from
//! the same store by `kv::follow`, as an engine's is from etcd. The lab runs the same handlers on
//! etcd (integration/tests/api.rs and the CLI tests); these show the behaviours etcd cannot be
//! made to show on demand.

use crate::api::Api;
use crate::auth::{Auth, AuthConfig, Peer};
use crate::cluster::Cluster;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use fleet_model::schema::decode;
use fleet_model::{DesiredState, Keys, UnitName, UnitRecord};
use fleet_store::kv::{MemStore, Op, Store, Txn};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tower::ServiceExt;

struct Engine {
    store: MemStore,
    keys: Keys,
    api: Api,
    app: axum::Router,
}

async fn engine() -> Engine {
    engine_with(AuthConfig::default()).await
}

async fn engine_with(auth: AuthConfig) -> Engine {
    engine_keeping(auth, crate::events::DEFAULT_HISTORY).await
}

/// An engine keeping the last `history` events (`event_history`; 0 switches them off).
async fn engine_keeping(auth: AuthConfig, history: usize) -> Engine {
    engine_full(auth, history, None).await
}

async fn engine_full(auth: AuthConfig, history: usize, join: Option<std::sync::Arc<crate::join::Joining>>) -> Engine {
    engine_built(auth, history, join, true).await
}

/// An engine as `engine_full` makes it, with metrics recorded or not (`metrics = false`).
async fn engine_built(
    auth: AuthConfig,
    history: usize,
    join: Option<std::sync::Arc<crate::join::Joining>>,
    metrics: bool,
) -> Engine {
    let store = MemStore::new();
    let keys = Keys::new("/fleet-test/");
    let api = Api {
        store: store.clone().into(),
        keys: keys.clone(),
        cluster: Cluster::follow_store_keeping(store.clone(), keys.clone(), history),
        status: Default::default(),
        token_limit: 100,
        agents: reqwest::Client::new(),
        fleetlock: Default::default(),
        written: Default::default(),
        requests: Default::default(),
        metrics: crate::metrics::Metrics::with(metrics),
        join,
    };
    // The unix socket's caller is an admin by default: no token or certificate to make.
    let auth = std::sync::Arc::new(Auth::new(&auth).expect("auth"));
    let app = crate::routes::router(api.clone(), auth);
    // Until its view has its first listing an engine answers 503, as it should.
    assert!(api.cluster.caught_up(1, Duration::from_secs(5)).await, "the view lists the store");
    Engine { store, keys, api, app }
}

impl Engine {
    /// A request from the unix socket (an admin, by default).
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_as(Peer::Unix { uid: None }, None, method, path, body).await
    }

    async fn call_as(
        &self,
        peer: Peer,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let body = body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty);
        let mut req = req.body(body).expect("request");
        req.extensions_mut().insert(peer);
        let resp = self.app.clone().oneshot(req).await.expect("router answers");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24).await.expect("body");
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// The unit record as stored, if any.
    fn stored(&self, name: &str) -> Option<UnitRecord> {
        let name = UnitName::parse(name).expect("unit name");
        self.store.peek(self.keys.unit(&name).as_bytes()).map(|v| decode(&v).expect("stored record"))
    }

    /// How many keys are stored under `what` in fleet's prefix.
    async fn count(&self, what: &str) -> usize {
        let prefix = format!("{}{what}", self.keys.prefix());
        self.store.range(prefix.as_bytes()).await.expect("range").0.len()
    }

    async fn units_listed(&self) -> Vec<String> {
        let (status, page) = self.call(Method::GET, "/fleet/v1/units", None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let units = page["units"].as_array().cloned().unwrap_or_default();
        units.iter().filter_map(|u| u["name"].as_str().map(String::from)).collect()
    }
}

fn unit(desired: &str) -> Value {
    json!({
        "desiredState": desired,
        "options": [{"section": "Service", "name": "ExecStart", "value": "/bin/sleep infinity"}],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_unit_is_stored_once_and_read_back_through_the_view() {
    let e = engine().await;
    let (status, body) = e.call(Method::PUT, "/fleet/v1/units/a.service", Some(unit("launched"))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let rec = e.stored("a.service").expect("the unit is stored");
    assert_eq!(rec.desired_state, DesiredState::Launched);
    assert_eq!(e.count("bodies/").await, 1, "its body stored beside it");
    // Read your own write: the next read through this replica waits for its view.
    let (status, got) = e.call(Method::GET, "/fleet/v1/units/a.service", None).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["desiredState"], "launched");
    assert_eq!(got["options"][0]["value"], "/bin/sleep infinity");
    assert_eq!(e.units_listed().await, ["a.service"]);

    // The same desired state again writes nothing; a new one is one write.
    let before = e.store.revision();
    let (status, _) = e.call(Method::PUT, "/fleet/v1/units/a.service", Some(json!({"desiredState": "launched"}))).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(e.store.revision(), before, "an unchanged desired state is not written");
    let (status, _) = e.call(Method::PUT, "/fleet/v1/units/a.service", Some(json!({"desiredState": "inactive"}))).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(e.store.revision(), before + 1);
    assert_eq!(e.stored("a.service").map(|r| r.desired_state), Some(DesiredState::Inactive));

    // A desired state for a unit that does not exist creates nothing.
    let (status, body) =
        e.call(Method::PUT, "/fleet/v1/units/b.service", Some(json!({"desiredState": "launched"}))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(e.stored("b.service").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_is_a_503_with_the_original_words_and_nothing_is_written() {
    let e = engine().await;
    e.store.set_unavailable(true);
    let (status, body) = e.call(Method::PUT, "/fleet/v1/units/a.service", Some(unit("launched"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["message"], "fleet server unable to communicate with etcd");
    e.store.set_unavailable(false);
    assert!(e.stored("a.service").is_none());
    // Once it is back, the same request goes through.
    let (status, body) = e.call(Method::PUT, "/fleet/v1/units/a.service", Some(unit("launched"))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_transactions_are_sent_again_and_land_once() {
    let e = engine().await;
    // Three of the four attempts fail: the request still succeeds, and wrote one revision.
    e.store.refuse_next_txns(3);
    let before = e.store.revision();
    let (status, body) = e.call(Method::PUT, "/fleet/v1/units/a.service", Some(unit("launched"))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(e.store.revision(), before + 1, "one transaction landed");
    // A batch the same way: every unit or none.
    e.store.refuse_next_txns(2);
    let units: Vec<Value> = (0..3)
        .map(|i| json!({"name": format!("b{i}.service"), "desiredState": "launched", "options": unit("")["options"]}))
        .collect();
    let (status, body) = e.call(Method::POST, "/fleet/v1/units", Some(json!({"units": units}))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(e.units_listed().await, ["a.service", "b0.service", "b1.service", "b2.service"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_one_existing_unit_writes_none_and_names_it() {
    let e = engine().await;
    let (status, _) = e.call(Method::PUT, "/fleet/v1/units/b1.service", Some(unit("inactive"))).await;
    assert_eq!(status, StatusCode::CREATED);
    let before = e.store.revision();
    let units: Vec<Value> = (0..3)
        .map(|i| json!({"name": format!("b{i}.service"), "desiredState": "launched", "options": unit("")["options"]}))
        .collect();
    let (status, body) = e.call(Method::POST, "/fleet/v1/units", Some(json!({"units": units}))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let named: Vec<&str> = body["units"].as_array().into_iter().flatten().filter_map(|u| u["name"].as_str()).collect();
    assert_eq!(named, ["b1.service"], "{body}");
    assert_eq!(e.store.revision(), before, "nothing of the batch was written");
    assert!(e.stored("b0.service").is_none() && e.stored("b2.service").is_none());
    assert_eq!(e.stored("b1.service").map(|r| r.desired_state), Some(DesiredState::Inactive));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_existing_creates_what_is_new_and_answers_what_exists_untouched() {
    let e = engine().await;
    let other = json!([{"section": "Service", "name": "ExecStart", "value": "/bin/true"}]);
    let (status, _) = e
        .call(Method::PUT, "/fleet/v1/units/b1.service", Some(json!({"desiredState": "inactive", "options": other})))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    // 300 units: more than one transaction (etcd takes at most 128 operations in one).
    let units: Vec<Value> = (0..300)
        .map(|i| json!({"name": format!("b{i}.service"), "desiredState": "launched", "options": unit("")["options"]}))
        .collect();
    let body = json!({"units": units, "keepExisting": true});
    let (status, body) = e.call(Method::POST, "/fleet/v1/units", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["created"], 299, "{body}");
    let existing = body["existing"].as_array().cloned().unwrap_or_default();
    assert_eq!(existing.len(), 1, "{body}");
    assert_eq!(existing[0]["name"], "b1.service");
    assert_eq!(existing[0]["desiredState"], "inactive", "answered as stored");
    assert_eq!(existing[0]["options"], other, "with its own unit file");
    assert_eq!(e.stored("b1.service").map(|r| r.desired_state), Some(DesiredState::Inactive), "left alone");
    assert_eq!(e.stored("b299.service").map(|r| r.desired_state), Some(DesiredState::Launched));
    assert_eq!(e.count("units/").await, 300);
    // The same request again creates nothing and answers every unit.
    let (status, body) =
        e.call(Method::POST, "/fleet/v1/units", Some(json!({"units": units, "keepExisting": true}))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["created"], 0, "{body}");
    assert_eq!(body["existing"].as_array().map(Vec::len), Some(300));
}

#[test]
fn new_units_are_packed_into_transactions_etcd_accepts() {
    let ops = |c: &[(usize, &str)]| c.len() + c.iter().map(|u| u.1).collect::<std::collections::HashSet<_>>().len();
    // Instances of one template share a body: 119 units and it in a transaction.
    let same: Vec<(usize, &str)> = (0..1000).map(|i| (i, "h")).collect();
    let chunks = crate::api::txn_chunks(&same, |u| u.1);
    assert_eq!(chunks.iter().map(|c| c.len()).collect::<Vec<_>>(), [119, 119, 119, 119, 119, 119, 119, 119, 48]);
    // Every body different: 60 units and their 60 bodies.
    let hashes: Vec<String> = (0..200).map(|i| format!("h{i}")).collect();
    let distinct: Vec<(usize, &str)> = hashes.iter().enumerate().map(|(i, h)| (i, h.as_str())).collect();
    let chunks = crate::api::txn_chunks(&distinct, |u| u.1);
    assert_eq!(chunks.iter().map(|c| c.len()).collect::<Vec<_>>(), [60, 60, 60, 20]);
    // Mixed: never more than 120 writes, nothing lost or repeated, in order.
    let mixed: Vec<(usize, &str)> =
        (0..5000).map(|i| (i, hashes[(i * 7919) % (1 + i % 150).min(199)].as_str())).collect();
    let chunks = crate::api::txn_chunks(&mixed, |u| u.1);
    assert!(chunks.iter().all(|c| !c.is_empty() && ops(c) <= 120), "a transaction over 120 writes");
    let joined: Vec<usize> = chunks.iter().flat_map(|c| c.iter().map(|u| u.0)).collect();
    assert_eq!(joined, (0..5000).collect::<Vec<_>>());
    assert!(crate::api::txn_chunks(&[] as &[(usize, &str)], |u| u.1).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_delete_reports_what_it_destroyed_and_what_was_missing() {
    let e = engine().await;
    for n in ["d1.service", "d2.service"] {
        let (status, _) = e.call(Method::PUT, &format!("/fleet/v1/units/{n}"), Some(unit("launched"))).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let names = json!({"names": ["d1.service", "gone.service", "d2.service"]});
    let (status, body) = e.call(Method::POST, "/fleet/v1/units:batchDelete", Some(names)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["destroyed"], json!(["d1.service", "d2.service"]));
    assert_eq!(body["missing"], json!(["gone.service"]));
    assert_eq!(e.count("units/").await, 0);
    assert!(e.units_listed().await.is_empty(), "the view shows the deletes at once");
    let (status, _) = e.call(Method::DELETE, "/fleet/v1/units/d1.service", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_change_nothing_never_make_reads_wait() {
    let e = engine().await;
    let (status, _) = e.call(Method::PUT, "/fleet/v1/units/a.service", Some(unit("launched"))).await;
    assert_eq!(status, StatusCode::CREATED);
    // Something outside fleet's prefix moves the store's revision on: this view never sees it.
    let outside = Txn { then: vec![Op::put("/elsewhere/x", "1", 0)], ..Txn::default() };
    e.store.txn(outside).await.expect("write outside the prefix");
    // Deletes of nothing answer that revision; recorded as this replica's write, the next read
    // would wait for a revision its view never reaches.
    let (status, _) = e.call(Method::DELETE, "/fleet/v1/units/a.service/move", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let names = json!({"names": ["nothing.service"]});
    let (status, body) = e.call(Method::POST, "/fleet/v1/units:batchDelete", Some(names)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let written = e.api.written.load(Ordering::Relaxed);
    assert!(written < e.store.revision(), "a delete of nothing recorded revision {written}");
    assert!(e.api.cluster.caught_up(written, Duration::from_secs(1)).await, "the view reaches every recorded write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_resumes_after_a_lost_watch_and_reads_still_see_every_write() {
    let e = engine().await;
    let (status, _) = e.call(Method::PUT, "/fleet/v1/units/a.service", Some(unit("launched"))).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(e.units_listed().await, ["a.service"]);
    e.store.drop_watches();
    for n in ["b.service", "c.service"] {
        let (status, _) = e.call(Method::PUT, &format!("/fleet/v1/units/{n}"), Some(unit("launched"))).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    assert_eq!(e.units_listed().await, ["a.service", "b.service", "c.service"]);
    // History compacted while the watch was away: the view lists again and loses nothing.
    e.store.drop_watches();
    let (status, _) = e.call(Method::DELETE, "/fleet/v1/units/a.service", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    e.store.compact(e.store.revision());
    let (status, _) = e.call(Method::PUT, "/fleet/v1/units/d.service", Some(unit("launched"))).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(e.units_listed().await, ["b.service", "c.service", "d.service"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_is_waited_for_within_the_attempt_limit() {
    let e = engine().await;
    e.store.set_delay(Duration::from_millis(400));
    let (status, body) = e.call(Method::PUT, "/fleet/v1/units/a.service", Some(unit("launched"))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    e.store.set_delay(Duration::ZERO);
    assert_eq!(e.units_listed().await, ["a.service"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_asks_for_the_role_declared_with_it() {
    use crate::auth::{Role, TokenConfig};
    let roles = [Role::Read, Role::Operate, Role::Admin];
    let tokens = roles
        .iter()
        .map(|r| TokenConfig {
            name: r.to_string(),
            role: *r,
            sha256: fleet_store::tls::sha256_hex(format!("token-{r}").as_bytes()),
        })
        .collect();
    let e = engine_with(AuthConfig { tokens, socket_role: None, ..AuthConfig::default() }).await;
    let tcp = || Peer::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], 1)));
    let (get, put, post, delete, patch) = (Method::GET, Method::PUT, Method::POST, Method::DELETE, Method::PATCH);
    let m = "0123456789abcdef0123456789abcdef";
    let table = [
        (get.clone(), "/fleet/v1/units".to_string(), Role::Read),
        (post.clone(), "/fleet/v1/units".into(), Role::Admin),
        (get.clone(), "/fleet/v1/units/a.service".into(), Role::Read),
        (put.clone(), "/fleet/v1/units/a.service".into(), Role::Operate),
        (put.clone(), "/v1-alpha/units/a.service".into(), Role::Operate),
        (delete.clone(), "/fleet/v1/units/a.service".into(), Role::Admin),
        (post.clone(), "/fleet/v1/units:batchGet".into(), Role::Read),
        (post.clone(), "/fleet/v1/units:wait".into(), Role::Read),
        (post.clone(), "/fleet/v1/units:batchUpdate".into(), Role::Operate),
        (post.clone(), "/fleet/v1/units:batchDelete".into(), Role::Admin),
        (get.clone(), "/fleet/v1/units/a.service/status".into(), Role::Read),
        (get.clone(), "/fleet/v1/units/a.service/journal".into(), Role::Read),
        (post.clone(), "/fleet/v1/units/a.service/move".into(), Role::Operate),
        (delete.clone(), "/v1-alpha/units/a.service/move".into(), Role::Operate),
        (get.clone(), "/fleet/v1/state".into(), Role::Read),
        (get.clone(), "/fleet/v1/state/a.service".into(), Role::Read),
        (get.clone(), "/fleet/v1/state:stream".into(), Role::Read),
        (get.clone(), "/fleet/v1/machines".into(), Role::Read),
        (patch.clone(), "/fleet/v1/machines".into(), Role::Admin),
        (post.clone(), format!("/fleet/v1/machines/{m}/drain"), Role::Admin),
        (delete.clone(), format!("/fleet/v1/machines/{m}/drain"), Role::Admin),
        (get.clone(), "/fleet/v1/events".into(), Role::Read),
        (get.clone(), "/fleet/v1/discovery".into(), Role::Read),
        (get.clone(), "/fleet/v1/openapi.json".into(), Role::Read),
        (get.clone(), "/engine/status".into(), Role::Read),
        (get.clone(), "/metrics".into(), Role::Read),
        (post.clone(), "/v1/pre-reboot".into(), Role::Machine),
        (post.clone(), "/v1/steady-state".into(), Role::Machine),
    ];
    for (method, path, needed) in table {
        let refusal = format!("needs role {needed}");
        let below = roles.iter().rev().find(|r| **r < needed);
        let (status, body) = match below {
            Some(r) => e.call_as(tcp(), Some(&format!("token-{r}")), method.clone(), &path, None).await,
            None => e.call_as(tcp(), None, method.clone(), &path, None).await,
        };
        let expected = if below.is_some() { StatusCode::FORBIDDEN } else { StatusCode::UNAUTHORIZED };
        assert_eq!(status, expected, "{method} {path} by {below:?}: {body}");
        if below.is_some() {
            assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains(&refusal)), "{method} {path}: {body}");
        }
        // The role itself (or, for FleetLock, the least role a token can have) gets past the check.
        let holder = roles.iter().find(|r| **r >= needed).copied().unwrap_or(Role::Admin);
        let (status, body) = e.call_as(tcp(), Some(&format!("token-{holder}")), method.clone(), &path, None).await;
        let refused_by_role = body["error"]["message"].as_str().is_some_and(|m| m.contains("needs role"));
        assert!(
            !(status == StatusCode::FORBIDDEN && refused_by_role) && status != StatusCode::UNAUTHORIZED,
            "{method} {path} by {holder}: {status} {body}"
        );
    }
    // A route nobody declared is a 404 for anyone identified, and a 401 for anyone else.
    let (status, _) = e.call_as(tcp(), Some("token-read"), post.clone(), "/fleet/v1/nothing", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = e.call_as(tcp(), None, get.clone(), "/fleet/v1/nothing", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_route_and_etcd_calls_by_outcome_without_unit_names() {
    let e = engine().await;
    let (status, _) = e.call(Method::PUT, "/fleet/v1/units/a.service", Some(unit("launched"))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = e.call(Method::GET, "/fleet/v1/units/a.service", None).await;
    assert_eq!(status, StatusCode::OK);
    e.store.set_unavailable(true);
    let (status, _) = e.call(Method::PUT, "/fleet/v1/units/b.service", Some(unit("launched"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    e.store.set_unavailable(false);

    let mut req = Request::builder().uri("/metrics").body(Body::empty()).expect("request");
    req.extensions_mut().insert(Peer::Unix { uid: None });
    let resp = e.app.clone().oneshot(req).await.expect("router answers");
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24).await.expect("body");
    let text = String::from_utf8_lossy(&bytes);
    for line in [
        r#"fleet_api_requests_total{route="/fleet/v1/units/{name}",method="PUT",code="201"} 1"#,
        r#"fleet_api_requests_total{route="/fleet/v1/units/{name}",method="GET",code="200"} 1"#,
        r#"fleet_api_requests_total{route="/fleet/v1/units/{name}",method="PUT",code="503"} 1"#,
        // The 503 took every attempt, each counted.
        r#"fleet_etcd_requests_total{call="read unit",outcome="unavailable"} 4"#,
        r#"fleet_etcd_requests_total{call="write unit",outcome="ok"} 1"#,
        "fleet_units 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    assert!(!text.contains("a.service") && !text.contains("b.service"), "a unit name became a label:\n{text}");
}

/// The next server-sent event's `data:` from a stream's body, or None if none comes within 5 s.
async fn next_sse(body: &mut axum::body::BodyDataStream, buf: &mut String) -> Option<Value> {
    use futures::StreamExt;
    loop {
        // An event ends with a blank line; keep-alive comments start with ':'.
        if let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data:")) {
                return serde_json::from_str(data.trim()).ok();
            }
            continue;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next()).await.ok()??.ok()?;
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_listed_and_streamed_from_where_a_client_left_off() {
    let e = engine().await;
    let (status, _) = e.call(Method::PUT, "/fleet/v1/units/a.service", Some(unit("launched"))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, page) = e.call(Method::GET, "/fleet/v1/events?unit=a.*", None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let kinds: Vec<&str> = page["events"].as_array().into_iter().flatten().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(kinds, vec!["unit-submitted"]);
    let next = page["next"].as_str().expect("next").to_string();
    assert_eq!(Some(next.as_str()), page["events"][0]["id"].as_str());
    // Bad filters are refused with what is wrong.
    let (status, body) = e.call(Method::GET, "/fleet/v1/events?kind=unit-exploded", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("unit-exploded")), "{body}");
    let (status, _) = e.call(Method::GET, "/fleet/v1/events?since=yesterday", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A stream resuming after `next` (as a reconnecting EventSource does) gets what followed,
    // once: b's submission, then c's as it happens.
    let (status, _) = e.call(Method::PUT, "/fleet/v1/units/b.service", Some(unit("launched"))).await;
    assert_eq!(status, StatusCode::CREATED);
    let mut req = Request::builder().uri("/fleet/v1/events/stream").header("last-event-id", &next);
    req = req.header("accept", "text/event-stream");
    let mut req = req.body(Body::empty()).expect("request");
    req.extensions_mut().insert(Peer::Unix { uid: None });
    let resp = e.app.clone().oneshot(req).await.expect("router answers");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body().into_data_stream();
    let mut buf = String::new();
    let first = next_sse(&mut body, &mut buf).await.expect("an event");
    assert_eq!((first["kind"].as_str(), first["unit"].as_str()), (Some("unit-submitted"), Some("b.service")));
    let (status, _) = e.call(Method::PUT, "/fleet/v1/units/c.service", Some(unit("launched"))).await;
    assert_eq!(status, StatusCode::CREATED);
    let second = next_sse(&mut body, &mut buf).await.expect("a live event");
    assert_eq!(second["unit"].as_str(), Some("c.service"));
    // Closing the log (the engine stopping) ends the stream.
    e.api.cluster.events().close();
    assert!(next_sse(&mut body, &mut buf).await.is_none(), "the stream outlived the engine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_with_events_off_says_so_and_serves_the_rest() {
    let e = engine_keeping(AuthConfig::default(), 0).await;
    let (status, _) = e.call(Method::PUT, "/fleet/v1/units/a.service", Some(unit("launched"))).await;
    assert_eq!(status, StatusCode::CREATED);
    // Not an empty history (which would read as "nothing happened"): a refusal saying why.
    for path in ["/fleet/v1/events", "/fleet/v1/events/stream"] {
        let (status, body) = e.call(Method::GET, path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("event_history = 0"), "{path}: {body}");
    }
    let (status, page) = e.call(Method::GET, "/fleet/v1/units", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["units"][0]["name"].as_str(), Some("a.service"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_with_metrics_off_says_so_and_serves_the_rest() {
    let e = engine_built(AuthConfig::default(), crate::events::DEFAULT_HISTORY, None, false).await;
    let (status, _) = e.call(Method::PUT, "/fleet/v1/units/a.service", Some(unit("launched"))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = e.call(Method::GET, "/metrics", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("metrics = false")), "{body}");
    let (status, page) = e.call(Method::GET, "/fleet/v1/units", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["units"][0]["name"].as_str(), Some("a.service"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_page_is_served_to_anyone_and_its_data_only_to_callers() {
    let e = engine_with(AuthConfig { socket_role: None, ..AuthConfig::default() }).await;
    let anonymous = || Peer::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], 1)));
    for (path, kind) in [("/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")] {
        let mut req = Request::builder().uri(path).body(Body::empty()).expect("request");
        req.extensions_mut().insert(anonymous());
        let resp = e.app.clone().oneshot(req).await.expect("router answers");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let h = resp.headers();
        assert!(h["content-type"].to_str().is_ok_and(|t| t.starts_with(kind)), "{path}: {h:?}");
        assert!(h["content-security-policy"].to_str().is_ok_and(|c| c.contains("script-src 'self'")), "{path}");
    }
    // The data is not: the page's first call is refused, and the page then asks for a token.
    let (status, _) = e.call_as(anonymous(), None, Method::GET, "/fleet/v1/events?tail=100", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = e.call_as(anonymous(), None, Method::POST, "/", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unit_listings_filter_on_the_server_in_pages_of_the_size_asked() {
    let e = engine().await;
    for n in ["web@1.service", "web@2.service", "web@3.service", "db.service"] {
        let desired = if n == "db.service" { "inactive" } else { "launched" };
        let (status, _) = e.call(Method::PUT, &format!("/fleet/v1/units/{n}"), Some(unit(desired))).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let names = |page: &Value| -> Vec<String> {
        page["units"].as_array().into_iter().flatten().filter_map(|u| u["name"].as_str().map(String::from)).collect()
    };
    // Two pages of two, following the token made for that size.
    let (status, first) = e.call(Method::GET, "/fleet/v1/units?unitName=web@*&pageSize=2&view=basic", None).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(names(&first), vec!["web@1.service", "web@2.service"]);
    assert!(first["units"][0].get("options").is_none(), "view=basic carries no options: {first}");
    let token = first["nextPageToken"].as_str().expect("a next page");
    let (_, second) =
        e.call(Method::GET, &format!("/fleet/v1/units?unitName=web@*&pageSize=2&nextPageToken={token}"), None).await;
    assert_eq!(names(&second), vec!["web@3.service"]);
    assert!(second["units"][0]["options"].is_array(), "the full view has the options");
    // No machine in this store: the launched units want one they do not have.
    let (_, unplaced) = e.call(Method::GET, "/fleet/v1/units?state=unplaced", None).await;
    assert_eq!(names(&unplaced), vec!["web@1.service", "web@2.service", "web@3.service"]);
    let (_, inactive) = e.call(Method::GET, "/fleet/v1/units?state=inactive&unitName=db.service,nothing*", None).await;
    assert_eq!(names(&inactive), vec!["db.service"]);
    for bad in ["pageSize=0", "pageSize=10001", "state=running", "view=everything", "unitName=[oops"] {
        let (status, body) = e.call(Method::GET, &format!("/fleet/v1/units?{bad}"), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
}

mod join;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_stream_in_listing_order_across_chunks_with_a_head_that_sizes_them() {
    let e = engine().await;
    // Two machines report 2,101 units: more than two of the stream's chunks.
    let state = |active: &str| {
        fleet_model::schema::encode(&fleet_model::UnitStateRecord {
            hash: "abc".into(),
            load_state: "loaded".into(),
            active_state: active.into(),
            sub_state: "running".into(),
            applied: DesiredState::Launched,
            health: None,
        })
        .expect("state")
    };
    // m1 is a live machine with an address; m2 reports but has no record (gone).
    let m1 = fleet_model::MachineRecord { id: "m1".into(), public_ip: "10.0.0.1".into(), ..Default::default() };
    let mut ops = vec![Op::put(e.keys.machine("m1"), fleet_model::schema::encode(&m1).expect("machine"), 0)];
    for i in 0..2_101 {
        let name = UnitName::parse(&format!("u-{i:05}.service")).expect("name");
        ops.push(Op::put(e.keys.state("m2", &name), state("active"), 0));
        ops.push(Op::put(e.keys.state("m1", &name), state("deactivating"), 0));
    }
    let mut revision = 0;
    for chunk in ops.chunks(128) {
        let t = Txn { when: vec![], then: chunk.to_vec(), otherwise: vec![] };
        revision = e.store.txn(t).await.expect("txn").revision;
    }
    assert!(e.api.cluster.caught_up(revision, Duration::from_secs(10)).await, "the view has the states");

    let lines = |bytes: &[u8]| -> Vec<Value> {
        bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("a JSON line"))
            .collect()
    };
    let (status, body) = e.raw(Method::GET, "/fleet/v1/state:stream").await;
    assert_eq!(status, StatusCode::OK);
    let all = lines(&body);
    assert_eq!(all[0]["rows"], 4_202, "head: {}", all[0]);
    assert_eq!(all[0]["longest"]["systemdActiveState"], "deactivating".len());
    assert_eq!(all[0]["longest"]["name"], "u-00000.service".len());
    // Rows carry their machine's address (what list-units shows), so no listing of machines
    // is needed; a machine without a record has none.
    assert_eq!((&all[0]["machineIPs"], &all[0]["longest"]["machineIP"]), (&Value::Bool(true), &Value::from(8)));
    assert!(all[1..].iter().all(|r| match r["machineID"].as_str() {
        Some("m1") => r["machineIP"] == "10.0.0.1",
        _ => r.get("machineIP").is_none(),
    }));
    let rows: Vec<(String, String)> = all[1..]
        .iter()
        .map(|r| (r["name"].as_str().unwrap_or("").to_string(), r["machineID"].as_str().unwrap_or("").to_string()))
        .collect();
    assert_eq!(rows.len(), 4_202);
    // The order `list-units` prints: unit, then machine; every state once.
    let mut sorted = rows.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(rows, sorted);
    // The same rows as the paged listing.
    let mut paged = Vec::new();
    let mut next = String::new();
    loop {
        let (status, page) = e.call(Method::GET, &format!("/fleet/v1/state?pageSize=1000{next}"), None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for s in page["states"].as_array().into_iter().flatten() {
            assert!(s.get("machineIP").is_none(), "the original's listing, unchanged: {s}");
            paged.push((
                s["name"].as_str().unwrap_or("").to_string(),
                s["machineID"].as_str().unwrap_or("").to_string(),
            ));
        }
        match page["nextPageToken"].as_str() {
            Some(t) => next = format!("&nextPageToken={t}"),
            None => break,
        }
    }
    assert_eq!(rows, paged);

    // One unit's states; one machine's.
    let (_, body) = e.raw(Method::GET, "/fleet/v1/state:stream?unitName=u-00007.service").await;
    let one = lines(&body);
    assert_eq!(one[0]["rows"], 2);
    assert_eq!(one.len(), 3);
    let (_, body) = e.raw(Method::GET, "/fleet/v1/state:stream?machineID=m2").await;
    let m2 = lines(&body);
    assert_eq!(m2[0]["rows"], 2_101);
    assert!(m2[1..].iter().all(|r| r["machineID"] == "m2" && r["systemdActiveState"] == "active"));
    // The head's count follows states that go.
    let gone = UnitName::parse("u-00000.service").expect("name");
    let t = Txn { when: vec![], then: vec![Op::delete(e.keys.state("m1", &gone))], otherwise: vec![] };
    let revision = e.store.txn(t).await.expect("txn").revision;
    assert!(e.api.cluster.caught_up(revision, Duration::from_secs(10)).await);
    let (_, body) = e.raw(Method::GET, "/fleet/v1/state:stream").await;
    let after = lines(&body);
    assert_eq!(after[0]["rows"], 4_201);
    assert_eq!(after.len(), 4_202);
    // Not paged.
    let (status, _) = e.raw(Method::GET, "/fleet/v1/state:stream?pageSize=10").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

impl Engine {
    /// A request from the unix socket, its answer's bytes as they are (streams).
    async fn raw(&self, method: Method, path: &str) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(path).body(Body::empty()).expect("request");
        req.extensions_mut().insert(Peer::Unix { uid: None });
        let resp = self.app.clone().oneshot(req).await.expect("router answers");
        let status = resp.status();
        (status, axum::body::to_bytes(resp.into_body(), 1 << 26).await.expect("body").to_vec())
    }
}
