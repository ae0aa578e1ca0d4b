//! The client against small fake engines (axum on loopback): fail-over, paging, refusals,
//! names in paths, and settings refused before anything is sent.

use super::*;
use axum::extract::{Query, State};
use axum::http::StatusCode as Code;
use axum::routing::{get, post};
use axum::{Json, Router};
use fleet_api::Until;
use serde_json::json;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

/// Serves `app` on a loopback port; returns its `http://` URL.
async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A port nothing listens on (bound, then closed).
async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

fn client(endpoints: &str) -> Client {
    Client::new(endpoints, Duration::from_secs(5), &Credentials::default()).expect("client")
}

/// An engine answering `GET /units` with one unit named `name`, counting requests.
async fn engine(name: &'static str, status: Code) -> (String, Arc<AtomicU32>) {
    let hits = Arc::new(AtomicU32::new(0));
    let app = Router::new()
        .route(
            "/fleet/v1/units",
            get(|State((hits, name, status)): State<(Arc<AtomicU32>, &'static str, Code)>| async move {
                hits.fetch_add(1, Ordering::Relaxed);
                let body = if status.is_success() {
                    json!({"units": [{"name": name, "desiredState": "launched", "options": []}]})
                } else {
                    json!({"error": {"code": status.as_u16(), "message": "fleet server unable to communicate with etcd"}})
                };
                (status, Json(body))
            }),
        )
        .with_state((hits.clone(), name, status));
    (serve(app).await, hits)
}

#[tokio::test]
async fn a_request_goes_to_the_next_endpoint_and_stays_with_the_one_that_answered() {
    let dead = closed_port().await;
    let (cut_off, cut_hits) = engine("a.service", Code::SERVICE_UNAVAILABLE).await;
    let (good, good_hits) = engine("b.service", Code::OK).await;
    let c = client(&format!("{dead}, {cut_off} ,{good}"));
    let units = c.units().await.expect("units through the third endpoint");
    assert_eq!(units.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(), ["b.service"]);
    assert_eq!((cut_hits.load(Ordering::Relaxed), good_hits.load(Ordering::Relaxed)), (1, 1));
    c.units().await.expect("again");
    assert_eq!(
        (cut_hits.load(Ordering::Relaxed), good_hits.load(Ordering::Relaxed)),
        (1, 2),
        "the second request went straight to the endpoint that answered"
    );
}

#[tokio::test]
async fn no_endpoint_reachable_names_every_endpoint() {
    let (a, b) = (closed_port().await, closed_port().await);
    let err = client(&format!("{a},{b}")).units().await.expect_err("unreachable");
    let text = err.to_string();
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    assert!(
        text.starts_with("GET units: cannot reach the fleet API at ") && text.contains(&a) && text.contains(&b),
        "{text}"
    );
}

#[tokio::test]
async fn a_lone_engine_cut_off_from_etcd_is_asked_again_and_its_refusal_shown() {
    let (cut_off, hits) = engine("a.service", Code::SERVICE_UNAVAILABLE).await;
    let err = client(&cut_off).units().await.expect_err("refused");
    assert_eq!(err.to_string(), "API error 503: fleet server unable to communicate with etcd");
    assert_eq!(hits.load(Ordering::Relaxed), ROUNDS, "one try per round");
}

#[tokio::test]
async fn listings_follow_every_page() {
    let app = Router::new().route(
        "/fleet/v1/machines",
        get(|Query(q): Query<HashMap<String, String>>| async move {
            let (id, next) = match q.get("nextPageToken").map(String::as_str) {
                None => ("m1", Some("p2")),
                Some("p2") => ("m2", Some("p3")),
                _ => ("m3", None),
            };
            let mut page = json!({"machines": [{"id": id, "primaryIP": "10.0.0.1"}]});
            if let Some(n) = next {
                page["nextPageToken"] = json!(n);
            }
            Json(page)
        }),
    );
    let machines = client(&serve(app).await).machines().await.expect("machines");
    assert_eq!(machines.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["m1", "m2", "m3"]);
}

#[tokio::test]
async fn a_refused_batch_lists_each_refused_unit() {
    let app = Router::new().route(
        "/fleet/v1/units:batchUpdate",
        post(|| async {
            (
                Code::NOT_FOUND,
                Json(json!({"error": {"code": 404, "message": "units do not exist: 2"},
                    "units": [{"name": "x.service", "error": "unit does not exist"},
                              {"name": "y.service", "error": "unit does not exist"}]})),
            )
        }),
    );
    let change = Unit { name: "x.service".into(), ..Default::default() };
    let err = client(&serve(app).await).update(&[change]).await.expect_err("refused");
    assert_eq!(err.status(), Some(404));
    assert_eq!(
        err.to_string(),
        "API error 404: units do not exist:\n  x.service: unit does not exist\n  y.service: unit does not exist"
    );
    assert!(matches!(&err, Error::Api { units, .. } if units.len() == 2));
}

#[tokio::test]
async fn names_are_one_encoded_path_segment() {
    let app = Router::new().route(
        "/fleet/v1/units/{name}",
        get(|uri: axum::http::Uri| async move {
            let raw = uri.path().trim_start_matches("/fleet/v1/units/").to_string();
            if raw == "web%401.service" {
                (Code::OK, Json(json!({"name": "web@1.service", "desiredState": "launched", "options": []})))
            } else {
                (Code::NOT_FOUND, Json(json!({"error": {"code": 404, "message": format!("raw segment {raw}")}})))
            }
        }),
    );
    let c = client(&serve(app).await);
    let unit = c.unit("web@1.service").await.expect("get").expect("found through %40");
    assert_eq!(unit.name, "web@1.service");
    assert!(c.unit("a/b.service").await.expect("get").is_none(), "a slash stays inside the segment");
    assert_eq!(segment("a b/c@d.service"), "a%20b%2Fc%40d.service");
}

#[test]
fn bad_settings_are_refused_before_anything_is_sent() {
    let none = Credentials::default();
    let t = Duration::from_secs(1);
    let err = |e: &str, c: &Credentials| Client::new(e, t, c).err().map(|e| e.to_string()).unwrap_or_default();
    assert_eq!(err("", &none), "no endpoint given");
    assert!(err("ftp://x", &none).starts_with("unsupported endpoint \"ftp://x\""), "{}", err("ftp://x", &none));
    assert!(err("unix://relative.sock", &none).contains("the socket path must be absolute"));
    let half = Credentials { cert_file: Some("/nonexistent.pem".into()), ..Default::default() };
    assert_eq!(err("https://x:1", &half), "--cert-file and --key-file must be given together");
    let missing_ca = Credentials { ca_file: Some("/nonexistent/ca.pem".into()), ..Default::default() };
    assert!(err("https://x:1", &missing_ca).starts_with("cannot read the CA file /nonexistent/ca.pem"));
    let bad_token = Credentials { token: Some("a\nb".into()), ..Default::default() };
    assert!(err("https://x:1", &bad_token).contains("token contains characters not allowed"));
    assert!(Client::new("unix:///run/fleet.sock,https://a:1", t, &none).is_ok());
}

#[tokio::test]
async fn one_unit_writes_tell_created_from_changed_and_gone_from_absent() {
    let app = Router::new().route(
        "/fleet/v1/units/{name}",
        axum::routing::put(|axum::extract::Path(name): axum::extract::Path<String>, Json(u): Json<Unit>| async move {
            match (name == u.name, u.options.is_empty()) {
                (false, _) => Code::BAD_REQUEST,
                (true, false) => Code::CREATED,
                (true, true) => Code::NO_CONTENT,
            }
        })
        .delete(|axum::extract::Path(name): axum::extract::Path<String>| async move {
            if name == "a.service" {
                Code::NO_CONTENT
            } else {
                Code::NOT_FOUND
            }
        }),
    );
    let c = client(&serve(app).await);
    let opt =
        fleet_model::UnitOption { section: "Service".into(), name: "ExecStart".into(), value: "/bin/true".into() };
    let new = Unit { name: "a.service".into(), options: vec![opt], ..Default::default() };
    assert!(c.put_unit(&new).await.expect("created"));
    let change = Unit { name: "a.service".into(), desired_state: "launched".into(), ..Default::default() };
    assert!(!c.put_unit(&change).await.expect("changed"));
    assert!(c.delete_unit("a.service").await.expect("deleted"));
    assert!(!c.delete_unit("b.service").await.expect("absent is not an error"));
}

/// A wait the caller stops (fleetctl does on a unit that failed) ends: it is not asked again.
/// (It was: `fleetctl start` of a failing unit printed its failure every few seconds, forever.)
#[tokio::test]
async fn a_wait_stopped_by_the_caller_is_not_asked_again() {
    let asked = Arc::new(AtomicU32::new(0));
    let app = Router::new()
        .route(
            "/fleet/v1/units:wait",
            post(|State(asked): State<Arc<AtomicU32>>| async move {
                asked.fetch_add(1, Ordering::Relaxed);
                "{\"name\":\"a.service\",\"error\":\"failed\"}\n{\"done\":true}\n"
            }),
        )
        .with_state(asked.clone());
    let c = client(&serve(app).await);
    let mut seen = 0;
    let names = ["a.service".to_string()];
    let wait = c.wait(&names, Until::Active, 0, None, |_| {
        seen += 1;
        ControlFlow::Break(())
    });
    let left = tokio::time::timeout(Duration::from_secs(10), wait).await.expect("the wait ends").expect("wait");
    assert_eq!((left, seen, asked.load(Ordering::Relaxed)), (vec!["a.service".to_string()], 1, 1));
}

/// The borrowed bodies decode on the engine's side as the owned ones they stand for: a field
/// renamed or skipped differently in one would be lost on the wire.
#[test]
fn borrowed_bodies_are_the_api_types_on_the_wire() {
    let options = vec![fleet_model::UnitOption {
        section: "Service".into(),
        name: "ExecStart".into(),
        value: "/bin/true".into(),
    }];
    let owned = fleet_api::Unit {
        name: "a@1.service".into(),
        options: options.clone(),
        desired_state: "launched".into(),
        ..Default::default()
    };
    let bare = fleet_api::Unit { name: "b.service".into(), ..Default::default() };
    let new = [
        units::NewUnit { name: "a@1.service", options: &options, desired_state: "launched" },
        units::NewUnit::from(&bare),
    ];
    for keep_existing in [false, true] {
        let sent = serde_json::to_value(units::CreateUnitsOf { units: &new, keep_existing }).expect("encodes");
        let got: fleet_api::CreateUnits = serde_json::from_value(sent.clone()).expect("decodes");
        assert_eq!(got, fleet_api::CreateUnits { units: vec![owned.clone(), bare.clone()], keep_existing });
        let owned_sent =
            serde_json::to_value(fleet_api::CreateUnits { units: vec![owned.clone(), bare.clone()], keep_existing })
                .expect("encodes");
        assert_eq!(sent, owned_sent);
    }
    let names = vec!["a.service".to_string(), "b.service".to_string()];
    let sent = serde_json::to_value(units::NamesOf { names: &names }).expect("encodes");
    assert_eq!(sent, serde_json::to_value(fleet_api::Names { names }).expect("encodes"));
}
