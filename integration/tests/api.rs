//! Contract tests of the `/fleet/v1` REST API: every endpoint, status code, error body, paging,
//! and the shapes fleet's clients send and expect. Runs its own engine (page size 2) on its own
//! key prefix of the lab's etcd; machines and unit states are written straight into etcd.

use etcd_client::PutOptions;
use fleet_integration::testkit::{self, wait_for};
use fleet_integration::{lab_dir, process};
use fleet_model::schema::encode;
use fleet_model::{DesiredState, Keys, MachineRecord, UnitName, UnitStateRecord};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

struct Engine(u32);
impl Drop for Engine {
    fn drop(&mut self) {
        process::stop(self.0, "fleet-engine", Duration::from_secs(5));
    }
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Option<String>, Value) {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method.parse().expect("method"), url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
        let text = resp.text().await.unwrap_or_default();
        (status, ctype, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

/// An engine of the test's own (no machines) on its own key prefix of the lab's etcd, serving
/// TLS on `port`; returns it with a client and the prefix.
async fn own_engine(lab: &fleet_integration::LabState, id: &str, port: u16, extra: &[&str]) -> (Engine, Api, String) {
    let prefix = testkit::unique_prefix(id);
    let mut cmd = std::process::Command::new(lab.bin_dir.join("fleet-engine"));
    cmd.args(lab.engine_base_args())
        .args(["--etcd-prefix", &prefix, "--engine-id", id])
        .args(["--listen", &lab_dir().join(format!("{id}.sock")).display().to_string()])
        .args(["--listen-tls", &format!("127.0.0.1:{port}")])
        .args(extra);
    let engine = Engine(process::spawn_logged(cmd, &lab_dir().join(format!("{id}.log"))).expect("engine starts"));
    let api = Api { base: format!("https://127.0.0.1:{port}"), http: testkit::http() };
    wait_for("API", T, || async {
        api.http.get(format!("{}/fleet/v1/units", api.base)).send().await.ok().filter(|r| r.status().is_success())
    })
    .await
    .expect("API up");
    (engine, api, prefix)
}

#[tokio::test]
async fn the_fleet_v1_contract() {
    let Some(lab) = testkit::lab() else { return };
    let (_engine, api, prefix) = own_engine(&lab, "t-api", 12585, &["--token-limit", "2"]).await;
    let keys = Keys::new(&prefix);
    let mut etcd = testkit::etcd(&lab).await.expect("etcd");

    // Empty collections are `{}`, JSON, with fleet's Server header.
    let resp = api.http.get(format!("{}/fleet/v1/units", api.base)).send().await.expect("GET");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["server"].to_str().unwrap_or("").starts_with("fleetd/"));
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.json::<Value>().await.ok(), Some(json!({})));

    // PUT: content type, body, names, existence, states.
    let opts = json!([{"section": "Service", "name": "ExecStart", "value": "/bin/sleep 1000"}]);
    let raw = api.http.put(format!("{}/fleet/v1/units/a.service", api.base)).body("{}").send().await.expect("PUT");
    assert_eq!(raw.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let raw = api
        .http
        .put(format!("{}/fleet/v1/units/a.service", api.base))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("PUT");
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    let (s, _, b) =
        api.call("PUT", "/fleet/v1/units/a.service", Some(json!({"name": "b.service", "options": opts}))).await;
    assert_eq!(
        (s, message(&b)),
        (StatusCode::BAD_REQUEST, "name in URL \"a.service\" differs from unit name in request body \"b.service\"")
    );
    let (s, _, b) = api.call("PUT", "/fleet/v1/units/bad%20name.service", Some(json!({"options": opts}))).await;
    assert_eq!((s, message(&b)), (StatusCode::BAD_REQUEST, "invalid character ' ' in unit name"));
    let (s, _, b) = api.call("PUT", "/fleet/v1/units/a.service", Some(json!({"desiredState": "launched"}))).await;
    assert_eq!((s, message(&b)), (StatusCode::CONFLICT, "unit does not exist and options field empty"));
    let (s, _, b) =
        api.call("PUT", "/fleet/v1/units/a.service", Some(json!({"options": opts, "desiredState": "running"}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, _, b) =
        api.call("PUT", "/fleet/v1/units/t@.service", Some(json!({"options": opts, "desiredState": "launched"}))).await;
    assert_eq!((s, message(&b)), (StatusCode::BAD_REQUEST, "cannot activate template \"t@.service\""));
    let bad_rules = json!([{"section": "X-Fleet", "name": "Bogus", "value": "1"}, {"section": "Service", "name": "ExecStart", "value": "/bin/true"}]);
    let (s, _, b) = api.call("PUT", "/fleet/v1/units/a.service", Some(json!({"options": bad_rules}))).await;
    assert_eq!((s, message(&b)), (StatusCode::BAD_REQUEST, "unrecognized requirement in [X-Fleet] section: \"Bogus\""));
    let (s, _, _) = api.call("PUT", "/fleet/v1/units/a.service", Some(json!({"options": opts}))).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _, b) = api.call("PUT", "/fleet/v1/units/a.service", Some(json!({"options": opts}))).await;
    assert_eq!((s, message(&b)), (StatusCode::CONFLICT, "must provide DesiredState to update existing unit"));
    let (s, _, _) = api.call("PUT", "/fleet/v1/units/a.service", Some(json!({"desiredState": "loaded"}))).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // GET one: fleet's field names; `@` percent-encoded like fleetctl sends it.
    let (s, _, _) = api.call("PUT", "/fleet/v1/units/web%401.service", Some(json!({"options": opts}))).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _, b) = api.call("GET", "/fleet/v1/units/web%401.service?alt=json", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        b,
        json!({"name": "web@1.service", "options": opts, "desiredState": "inactive", "currentState": "inactive"})
    );
    let (s, _, b) = api.call("GET", "/fleet/v1/units/nope.service", None).await;
    assert_eq!((s, b), (StatusCode::NOT_FOUND, json!({"error": {"code": 404, "message": "unit does not exist"}})));
    // Replacing contents resets the desired state unless one is given.
    let opts2 = json!([{"section": "Service", "name": "ExecStart", "value": "/bin/sleep 2000"}]);
    let (s, _, _) = api.call("PUT", "/fleet/v1/units/a.service", Some(json!({"options": opts2}))).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(api.call("GET", "/fleet/v1/units/a.service", None).await.2["desiredState"], "inactive");

    // Paging with a page size of 2: tokens like the original's, and its errors.
    for n in ["c.service", "d.service", "e.service"] {
        assert_eq!(
            api.call("PUT", &format!("/fleet/v1/units/{n}"), Some(json!({"options": opts}))).await.0,
            StatusCode::CREATED
        );
    }
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &token {
            Some(t) => format!("/fleet/v1/units?nextPageToken={t}"),
            None => "/fleet/v1/units".into(),
        };
        let (s, _, b) = api.call("GET", &path, None).await;
        assert_eq!(s, StatusCode::OK);
        pages += 1;
        names.extend(b["units"].as_array().into_iter().flatten().map(|u| u["name"].as_str().unwrap_or("").to_string()));
        match b["nextPageToken"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    assert_eq!(names, vec!["a.service", "c.service", "d.service", "e.service", "web@1.service"]);
    assert_eq!(pages, 3);
    assert_eq!(
        api.call("GET", "/fleet/v1/units?nextPageToken=AgACAA==", None).await.2["units"].as_array().map(Vec::len),
        Some(2)
    );
    let (s, ctype, b) = api.call("GET", "/fleet/v1/machines?nextPageToken=EwBMLg==", None).await;
    assert_eq!((s, message(&b)), (StatusCode::BAD_REQUEST, "token limit must be 2"));
    assert_eq!(ctype.as_deref(), Some("application/json"));
    assert_eq!(api.call("GET", "/fleet/v1/units?nextPageToken=AgAAAA==", None).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(api.call("GET", "/fleet/v1/state?nextPageToken=%%%", None).await.0, StatusCode::BAD_REQUEST);

    // Machines and states, as agents would publish them.
    let m1 = "aaaa0000000000000000000000000001";
    let m2 = "aaaa0000000000000000000000000002";
    let lease = etcd.lease_grant(60, None).await.expect("lease").id();
    for (m, ip) in [(m1, "192.0.2.1"), (m2, "192.0.2.2")] {
        let rec = MachineRecord {
            id: m.into(),
            public_ip: ip.into(),
            metadata: [("hostname".to_string(), m[28..].to_string())].into(),
            ..Default::default()
        };
        etcd.put(keys.machine(m), encode(&rec).expect("encode"), Some(PutOptions::new().with_lease(lease)))
            .await
            .expect("put");
    }
    let st = UnitStateRecord {
        hash: "h".into(),
        load_state: "loaded".into(),
        active_state: "active".into(),
        sub_state: "running".into(),
        applied: DesiredState::Launched,
        health: None,
    };
    let c = UnitName::parse("c.service").expect("name");
    etcd.put(keys.state(m2, &c), encode(&st).expect("encode"), None).await.expect("put");
    let b = wait_for("machines listed", T, || async {
        Some(api.call("GET", "/fleet/v1/machines", None).await.2)
            .filter(|b| b["machines"].as_array().map(Vec::len) == Some(2))
    })
    .await
    .expect("machines");
    assert_eq!(b["machines"][0], json!({"id": m1, "primaryIP": "192.0.2.1", "metadata": {"hostname": "0001"}}));
    // The state was written straight to etcd: wait until the engine's view has it.
    let b = wait_for("the state in the view", T, || async {
        let (s, _, b) = api.call("GET", &format!("/fleet/v1/state?unitName=c.service&machineID={m2}"), None).await;
        (s == StatusCode::OK && !b["states"].is_null()).then_some(b)
    })
    .await
    .expect("state listed");
    assert_eq!(
        b["states"][0],
        json!({"name": "c.service", "hash": "h", "machineID": m2, "systemdLoadState": "loaded", "systemdActiveState": "active", "systemdSubState": "running"})
    );
    assert_eq!(api.call("GET", &format!("/fleet/v1/state?machineID={m1}"), None).await.2, json!({}));
    assert_eq!(api.call("GET", "/fleet/v1/state/c.service", None).await.2["machineID"], m2);
    let (s, _, b) = api.call("GET", "/fleet/v1/state/d.service", None).await;
    assert_eq!((s, message(&b)), (StatusCode::NOT_FOUND, "unit state does not exist"));

    // A page boundary inside one unit's states, and a state removed between two pages: the
    // token carries where the listing was, so nothing after it is skipped (a page number would
    // now skip e.service on m3).
    let e = UnitName::parse("e.service").expect("name");
    let (m3, m4) = ("aaaa0000000000000000000000000003", "aaaa0000000000000000000000000004");
    for m in [m2, m3, m4] {
        etcd.put(keys.state(m, &e), encode(&st).expect("encode"), None).await.expect("put");
    }
    // Pages hold two states here: ask per machine. The view applies etcd's events in order.
    let state_on = |m: &'static str| {
        let api = &api;
        async move {
            let b = api.call("GET", &format!("/fleet/v1/state?unitName=e.service&machineID={m}"), None).await.2;
            b.get("states").is_some()
        }
    };
    wait_for("e.service's states in the view", T, || async { state_on(m4).await.then_some(()) })
        .await
        .expect("three states");
    let page = |b: &serde_json::Value| -> Vec<(String, String)> {
        b["states"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| (s["name"].as_str().unwrap_or("").into(), s["machineID"].as_str().unwrap_or("").into()))
            .collect()
    };
    let first = api.call("GET", "/fleet/v1/state", None).await.2;
    assert_eq!(page(&first), vec![("c.service".into(), m2.into()), ("e.service".into(), m2.into())]);
    etcd.delete(keys.state(m2, &e), None).await.expect("delete");
    wait_for("e.service on m2 gone from the view", T, || async { (!state_on(m2).await).then_some(()) })
        .await
        .expect("two states");
    let t = first["nextPageToken"].as_str().expect("a next page");
    let second = api.call("GET", &format!("/fleet/v1/state?nextPageToken={t}"), None).await.2;
    assert_eq!(page(&second), vec![("e.service".into(), m3.into()), ("e.service".into(), m4.into())]);
    for m in [m3, m4] {
        etcd.delete(keys.state(m, &e), None).await.expect("delete");
    }
    wait_for("e.service's states gone", T, || async {
        let b = api.call("GET", "/fleet/v1/state?unitName=e.service", None).await.2;
        b.get("states").is_none().then_some(())
    })
    .await
    .expect("no states");

    // Metadata PATCH: the original's value shape, validation first, removal hides config keys.
    let patch = json!([
        {"op": "add", "path": format!("/{m1}/metadata/foo"), "Value": {"value": "bar"}},
        {"op": "replace", "path": format!("/{m2}/metadata/ping"), "value": "splat"},
        {"op": "remove", "path": format!("/{m2}/metadata/hostname")}
    ]);
    let (s, ctype, _) = api.call("PATCH", "/fleet/v1/machines", Some(patch)).await;
    assert_eq!((s, ctype.as_deref()), (StatusCode::NO_CONTENT, Some("application/json")));
    let b = api.call("GET", "/fleet/v1/machines", None).await.2;
    assert_eq!(b["machines"][0]["metadata"], json!({"foo": "bar", "hostname": "0001"}));
    assert_eq!(b["machines"][1]["metadata"], json!({"ping": "splat"}));
    for (bad, msg) in [
        (
            json!([{"op": "noop", "path": format!("/{m1}/metadata/foo"), "value": "x"}]),
            "invalid op: expect add, remove, or replace",
        ),
        (json!([{"op": "add", "path": format!("/{m1}/foo"), "value": "x"}]), "machine metadata path invalid"),
        (
            json!([{"op": "add", "path": format!("/{m1}/metadata/foo"), "value": {"value": ""}}]),
            "invalid value: add and replace require a value",
        ),
    ] {
        let (s, ctype, b) = api.call("PATCH", "/fleet/v1/machines", Some(bad)).await;
        assert_eq!((s, message(&b), ctype.as_deref()), (StatusCode::BAD_REQUEST, msg, Some("application/json")));
    }

    // Discovery, methods, unknown paths, the legacy prefix.
    let (s, _, b) = api.call("GET", "/fleet/v1/discovery", None).await;
    assert_eq!(
        (s, b["kind"].as_str(), b["id"].as_str()),
        (StatusCode::OK, Some("discovery#restDescription"), Some("fleet:v1"))
    );
    assert_eq!(b["resources"]["Units"]["methods"]["Set"]["httpMethod"], "PUT");
    let (s, _, b) = api.call("POST", "/fleet/v1/discovery", None).await;
    assert_eq!((s, message(&b)), (StatusCode::BAD_REQUEST, "only HTTP GET supported against this resource"));
    let (s, _, b) = api.call("DELETE", "/fleet/v1/units", None).await;
    assert_eq!((s, message(&b)), (StatusCode::METHOD_NOT_ALLOWED, "only GET and POST supported against this resource"));

    // POST /units creates many units; all are checked before anything is written.
    let batch = |names: &[&str]| json!({"units": names.iter().map(|n| json!({"name": n, "options": opts, "desiredState": "loaded"})).collect::<Vec<_>>()});
    let (s, _, b) = api.call("POST", "/fleet/v1/units", Some(batch(&["b1.service", "b2.service", "bad name"]))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(message(&b).starts_with("units[2] (bad name)"), "{b}");
    assert_eq!(api.call("GET", "/fleet/v1/units/b1.service", None).await.0, StatusCode::NOT_FOUND);
    let (s, _, b) = api.call("POST", "/fleet/v1/units", Some(batch(&["b1.service", "b2.service"]))).await;
    assert_eq!((s, b["created"].as_u64()), (StatusCode::CREATED, Some(2)));
    assert_eq!(api.call("GET", "/fleet/v1/units/b2.service", None).await.2["desiredState"], "loaded");
    // The same request again (a client retrying) succeeds; other contents for an existing unit do not.
    let (s, _, b) = api.call("POST", "/fleet/v1/units", Some(batch(&["b2.service"]))).await;
    assert_eq!((s, b["created"].as_u64()), (StatusCode::CREATED, Some(1)));
    let other = json!({"units": [{"name": "b2.service", "options": opts2, "desiredState": "loaded"}]});
    let (s, _, b) = api.call("POST", "/fleet/v1/units", Some(other)).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(message(&b).contains("b2.service"), "{b}");
    for n in ["b1.service", "b2.service"] {
        assert_eq!(api.call("DELETE", &format!("/fleet/v1/units/{n}"), None).await.0, StatusCode::NO_CONTENT);
    }
    let (s, _, b) = api.call("POST", "/fleet/v1/units/a.service", None).await;
    assert_eq!(
        (s, message(&b)),
        (StatusCode::METHOD_NOT_ALLOWED, "only GET, PUT and DELETE supported against this resource")
    );
    assert_eq!(api.call("DELETE", "/fleet/v1/machines", None).await.0, StatusCode::METHOD_NOT_ALLOWED);
    // `/` is the dashboard's page now (the original answered 405); other methods still 405.
    assert_eq!(api.call("POST", "/", None).await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(api.call("GET", "/fleet/v1", None).await.0, StatusCode::METHOD_NOT_ALLOWED);
    let (s, _, b) = api.call("GET", "/fleet/v1/nothing", None).await;
    assert_eq!((s, b["error"]["code"].as_u64()), (StatusCode::NOT_FOUND, Some(404)));
    assert_eq!(api.call("GET", "/v1-alpha/units/a.service", None).await.2["name"], "a.service");

    // DELETE.
    assert_eq!(api.call("DELETE", "/fleet/v1/units/a.service", None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(api.call("DELETE", "/fleet/v1/units/a.service", None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(api.call("GET", "/fleet/v1/units/a.service", None).await.0, StatusCode::NOT_FOUND);

    // The served OpenAPI document describes what the server does: every operation it lists
    // answers a plain request with one of its documented statuses.
    assert_eq!(
        api.call("PUT", "/fleet/v1/units/oa.service", Some(json!({"options": opts}))).await.0,
        StatusCode::CREATED
    );
    let (s, _, doc) = api.call("GET", "/fleet/v1/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    let paths = doc["paths"].as_object().expect("paths");
    let operations: usize = paths.values().map(|ops| ops.as_object().map(|o| o.len()).unwrap_or(0)).sum();
    assert!(operations >= 15, "only {operations} operations documented");
    for (path, ops) in paths {
        for (method, op) in ops.as_object().expect("operations") {
            let url = path.replace("{name}", "oa.service").replace("{id}", m1);
            let body = match method.as_str() {
                "put" => Some(json!({"desiredState": "loaded"})),
                "patch" => Some(json!([])),
                "post" => Some(json!({})),
                _ => None,
            };
            let (status, _, _) = api.call(&method.to_uppercase(), &url, body).await;
            let documented: Vec<&String> = op["responses"].as_object().expect("responses").keys().collect();
            assert!(
                documented.iter().any(|c| *c == status.as_str()),
                "{} {url} answered {status}, documented {documented:?}",
                method.to_uppercase()
            );
        }
    }

    etcd.lease_revoke(lease).await.ok();
    etcd.delete(prefix.as_str(), Some(etcd_client::DeleteOptions::new().with_prefix())).await.ok();
}

/// The batch methods (fleet-rs additions): validated as a whole before anything is written, each
/// refused unit named in the error body; `units:wait` streams one line per unit.
#[tokio::test]
async fn batch_methods_refuse_whole_batches_and_wait_streams_each_unit() {
    let Some(lab) = testkit::lab() else { return };
    let (_engine, api, prefix) = own_engine(&lab, "t-api-batch", 12589, &[]).await;
    let keys = Keys::new(&prefix);
    let mut etcd = testkit::etcd(&lab).await.expect("etcd");
    let opts = json!([{"section": "Service", "name": "ExecStart", "value": "/bin/sleep 1000"}]);
    let units: Vec<Value> =
        (1..=3).map(|i| json!({"name": format!("b{i}.service"), "options": opts, "desiredState": "loaded"})).collect();
    let (s, _, b) = api.call("POST", "/fleet/v1/units", Some(json!({ "units": units }))).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert!(b["revision"].as_i64().is_some_and(|r| r > 0), "a create answers with its revision: {b}");

    // batchGet: found, with their options, and the missing named.
    let (s, _, b) =
        api.call("POST", "/fleet/v1/units:batchGet", Some(json!({"names": ["b1.service", "zz.service"]}))).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["units"][0]["name"], "b1.service");
    assert_eq!(b["units"][0]["options"], opts);
    assert_eq!(b["missing"], json!(["zz.service"]));

    // A batch naming one missing unit changes none of the others.
    let (s, _, b) = api
        .call(
            "POST",
            "/fleet/v1/units:batchUpdate",
            Some(json!({"units": [{"name": "b1.service", "desiredState": "launched"},
                {"name": "nope.service", "desiredState": "launched"}]})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(b["units"], json!([{"name": "nope.service", "error": "unit does not exist"}]));
    let stored = etcd.get(keys.unit(&UnitName::parse("b1.service").expect("name")), None).await.expect("get");
    let rec: fleet_model::UnitRecord =
        fleet_model::schema::decode(stored.kvs()[0].value()).expect("a stored unit record");
    assert_eq!(rec.desired_state, DesiredState::Loaded, "nothing of a refused batch is written");
    // Invalid entries are each named.
    let (s, _, b) = api
        .call(
            "POST",
            "/fleet/v1/units:batchUpdate",
            Some(json!({"units": [{"name": "b1.service", "desiredState": "running"}, {"name": "b2.service"}]})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let named: Vec<&str> = b["units"].as_array().into_iter().flatten().filter_map(|u| u["name"].as_str()).collect();
    assert_eq!(named, ["b1.service", "b2.service"], "{b}");
    // An operator may change desired states but not unit files.
    let operate = fleet_integration::pki::token("operate").expect("token");
    let as_operator = |body: Value| {
        api.http.post(format!("{}/fleet/v1/units:batchUpdate", api.base)).bearer_auth(&operate).json(&body).send()
    };
    let resp = as_operator(json!({"units": [{"name": "b1.service", "options": opts, "desiredState": "launched"}]}))
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = as_operator(json!({"units": [{"name": "b1.service", "desiredState": "inactive"},
        {"name": "b2.service", "desiredState": "inactive"}]}))
    .await
    .expect("POST");
    assert_eq!(resp.status(), StatusCode::OK);
    let changed: Value = resp.json().await.expect("JSON");
    assert_eq!(changed["changed"], json!(["b1.service", "b2.service"]));

    // No machines here: inactive units are reached at once, a missing one is reported
    // destroyed, and the stream ends with a `done` line.
    let resp = api
        .http
        .post(format!("{}/fleet/v1/units:wait", api.base))
        .json(&json!({"names": ["b1.service", "b2.service", "gone.service"], "until": "inactive",
            "revision": changed["revision"], "timeoutMs": 5000}))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let text = resp.text().await.expect("body");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(lines[0], json!({"name": "b1.service"}));
    assert_eq!(lines[1], json!({"name": "b2.service"}));
    assert_eq!(lines[2], json!({"name": "gone.service", "error": "destroyed"}));
    assert_eq!(lines[3], json!({"pending": 0, "done": true}));
    // No machine to place a unit on: the wait ends with the leader's reason, once its time is up.
    let started = std::time::Instant::now();
    let text = api
        .http
        .post(format!("{}/fleet/v1/units:wait", api.base))
        .json(&json!({"names": ["b3.service"], "until": "active", "timeoutMs": 1500}))
        .send()
        .await
        .expect("POST")
        .text()
        .await
        .expect("body");
    assert!(started.elapsed() >= Duration::from_millis(1500), "the wait lasts its time: {text}");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(
        (lines[0]["name"].as_str(), lines[0]["error"].as_str()),
        (Some("b3.service"), Some("unplaceable")),
        "{text}"
    );
    assert!(lines[0]["reason"].as_str().is_some_and(|r| !r.is_empty()), "{text}");
    let (s, _, _) = api
        .call(
            "POST",
            "/fleet/v1/units:wait",
            Some(json!({"names": ["b3.service"], "until": "active", "timeoutMs": 600000})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a wait longer than the limit is refused");

    // A template may pin each instance to the machine its instance names; an instance whose
    // value is no machine id is refused when it is made, with the reason.
    let pin = json!([{"section": "Service", "name": "ExecStart", "value": "/bin/sleep 1000"},
        {"section": "X-Fleet", "name": "MachineID", "value": "%i"}]);
    let (s, _, b) = api.call("PUT", "/fleet/v1/units/pin%40.service", Some(json!({"options": pin}))).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, _, b) = api
        .call("POST", "/fleet/v1/units", Some(json!({"units": [{"name": "pin@web.service", "options": pin}]})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(message(&b).contains("pin@web.service") && message(&b).contains("expected a machine id"), "{b}");
    let (s, _, b) = api
        .call("POST", "/fleet/v1/units", Some(json!({"units": [{"name": "pin@0f1ee701.service", "options": pin}]})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");

    // batchDelete: the destroyed and the missing, then `gone` once no machine reports them.
    let (s, _, b) = api
        .call("POST", "/fleet/v1/units:batchDelete", Some(json!({"names": ["b1.service", "b2.service", "x.service"]})))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        (b["destroyed"].clone(), b["missing"].clone()),
        (json!(["b1.service", "b2.service"]), json!(["x.service"]))
    );
    let (s, _, b) = api.call("POST", "/fleet/v1/units:batchGet", Some(json!({"names": ["b1.service"]}))).await;
    assert_eq!((s, b["missing"].clone()), (StatusCode::OK, json!(["b1.service"])), "a read sees its own write");
    let _ = etcd.delete(prefix.as_str(), Some(etcd_client::DeleteOptions::new().with_prefix())).await;
}

/// Reads that must first catch up with etcd (a unit this replica does not know may have been
/// created through another) wait only for what etcd has under fleet's prefix: writes elsewhere in
/// the same etcd (another program, another fleet prefix) never hold them up. They used to: the
/// engine waited for etcd's current revision, which its watch of fleet's prefix never reaches,
/// so `fleetctl start` of a new unit took 6 s after anything else had written to etcd.
#[tokio::test]
async fn writes_outside_fleets_prefix_do_not_hold_up_reads() {
    let Some(lab) = testkit::lab() else { return };
    let (_engine, api, prefix) = own_engine(&lab, "t-api-outside", 12590, &[]).await;
    let mut etcd = testkit::etcd(&lab).await.expect("etcd");
    let elsewhere = format!("{}-elsewhere/key", prefix.trim_end_matches('/'));
    let opts = json!([{"section": "Service", "name": "ExecStart", "value": "/bin/sleep 1000"}]);
    let (s, _, _) = api.call("PUT", "/fleet/v1/units/here.service", Some(json!({"options": opts}))).await;
    assert_eq!(s, StatusCode::CREATED);
    // Slower than this is the wait for a revision the view never sees (1 s, a rewatch, 5 s).
    let bound = Duration::from_secs(3);
    let timed = |what: &'static str, method: &'static str, path: &'static str, body: Option<Value>| {
        let api = &api;
        async move {
            let start = std::time::Instant::now();
            let (s, _, b) = api.call(method, path, body).await;
            let took = start.elapsed();
            assert!(took < bound, "{what} took {took:?} after a write outside fleet's prefix");
            (s, b)
        }
    };

    etcd.put(elsewhere.as_str(), "1", None).await.expect("write elsewhere");
    let (s, b) = timed(
        "batchGet of a unit that does not exist",
        "POST",
        "/fleet/v1/units:batchGet",
        Some(json!({"names": ["here.service", "nope.service"]})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["missing"], json!(["nope.service"]), "{b}");

    etcd.put(elsewhere.as_str(), "2", None).await.expect("write elsewhere");
    let (s, b) = timed(
        "batchUpdate of a unit that does not exist",
        "POST",
        "/fleet/v1/units:batchUpdate",
        Some(json!({"units": [{"name": "nope.service", "desiredState": "launched"}]})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");

    // A delete of nothing answers etcd's current revision: it must not become a revision the
    // next read waits for.
    etcd.put(elsewhere.as_str(), "3", None).await.expect("write elsewhere");
    let (s, b) = timed(
        "batchDelete of nothing",
        "POST",
        "/fleet/v1/units:batchDelete",
        Some(json!({"names": ["nope.service"]})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = timed("a read after a delete of nothing", "GET", "/fleet/v1/units", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["units"][0]["name"], "here.service", "{b}");

    // A unit created behind this replica's back (straight into etcd, as another replica would)
    // is still found at once.
    let keys = Keys::new(&prefix);
    let (s, _, b) = api.call("GET", "/fleet/v1/units/here.service", None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let mut resp = etcd.get(keys.unit(&UnitName::parse("here.service").expect("name")), None).await.expect("get");
    let kv = resp.take_kvs().into_iter().next().expect("stored");
    let mut record: fleet_model::UnitRecord = fleet_model::schema::decode(kv.value()).expect("record");
    record.name = UnitName::parse("there.service").expect("name");
    etcd.put(keys.unit(&record.name), encode(&record).expect("encode"), None).await.expect("put");
    let (s, _, b) = api.call("POST", "/fleet/v1/units:batchGet", Some(json!({"names": ["there.service"]}))).await;
    assert_eq!(s, StatusCode::OK);
    assert!(b["missing"].as_array().is_none_or(|m| m.is_empty()), "a unit created elsewhere is missing: {b}");
    etcd.delete(elsewhere.as_str(), None).await.expect("clean up");
}

#[tokio::test]
async fn the_lab_engine_serves_its_metrics_to_the_read_role() {
    let Some(lab) = testkit::lab() else { return };
    let Some(url) = lab.api_url() else { panic!("the lab has an engine") };
    let http = testkit::http();
    // The admin's certificate (the lab's client): the text format, the lab's machines counted.
    let resp = http.get(format!("{url}/metrics")).send().await.expect("GET /metrics");
    assert_eq!(resp.status(), StatusCode::OK);
    let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let text = resp.text().await.expect("body");
    let machines = format!("fleet_machines {}", lab.machines.len());
    assert!(text.lines().any(|l| l == machines), "no {machines:?} in:\n{text}");
    assert!(text.lines().any(|l| l == "fleet_engine_leader 1"), "the lab's one engine leads:\n{text}");
    assert!(text.contains("fleet_api_requests_total{route=\"/fleet/v1/machines\""), "{text}");
    assert!(text.lines().any(|l| l.starts_with("fleet_view_lag_seconds ")), "{text}");
    // Without credentials: refused before anything is read.
    let anonymous = fleet_integration::pki::http_anonymous().expect("an anonymous client");
    let resp = anonymous.get(format!("{url}/metrics")).send().await.expect("GET /metrics");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

/// Each machine's agent serves its own metrics on its API (engines' certificates only): a unit
/// started there shows in its systemd calls and its units by state; its lease renewals and
/// etcd's last answer are there too.
#[tokio::test]
async fn the_lab_agents_serve_their_metrics_to_engines() {
    let Some(lab) = testkit::lab() else { return };
    let Some(api_url) = lab.api_url().map(str::to_string) else { panic!("the lab has an engine") };
    let m = lab.machines[0].clone();
    let dir = testkit::scratch("agent-metrics").expect("scratch");
    let file = dir.join("agent-metrics.service");
    std::fs::write(&file, format!("[Service]\nExecStart=/bin/sleep infinity\n[X-Fleet]\nMachineID={}\n", m.machine_id))
        .expect("unit file");
    let out = testkit::fleetctl(&lab, &api_url, &["start", &file.display().to_string()]).expect("fleetctl");
    assert!(out.status.success(), "{:?}", testkit::text(&out));
    let engine = fleet_integration::pki::http_as("engine").expect("engine client");
    let text = engine
        .get(format!("https://{}:12490/metrics", m.ip))
        .send()
        .await
        .expect("GET the agent's /metrics")
        .text()
        .await
        .expect("body");
    assert!(text.contains("fleet_agent_systemd_calls_total{call=\"start\",outcome=\"ok\"}"), "{text}");
    assert!(text.contains("fleet_agent_systemd_call_duration_seconds_bucket{"), "{text}");
    let value = |series: &str| -> f64 {
        text.lines().find_map(|l| l.strip_prefix(&format!("{series} "))).and_then(|v| v.parse().ok()).unwrap_or(0.0)
    };
    let active = value("fleet_agent_units{state=\"active\"}");
    assert!(active >= 1.0, "the unit started there is not counted active:\n{text}");
    assert!(text.contains("fleet_agent_reconcile_passes_total "), "{text}");
    assert!(text.contains("fleet_agent_lease_renewals_total{outcome=\"ok\"}"), "{text}");
    let contact = value("fleet_agent_last_etcd_contact_timestamp_seconds");
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    assert!(now - contact < 30.0, "etcd last answered {}s ago", now - contact);
    assert!(!text.contains("agent-metrics.service"), "a unit's name in a label:\n{text}");
    let out = testkit::fleetctl(&lab, &api_url, &["destroy", "agent-metrics.service"]).expect("fleetctl");
    assert!(out.status.success(), "{:?}", testkit::text(&out));
}

/// Under systemd the agent logs to the journal with native fields (its `auto` format): a lab
/// machine's journal, read from the host, has the agent's start with `_TRANSPORT=journal`, the
/// source location and its own fields (`F_MACHINE`), which its message shows as well.
#[test]
fn the_agent_logs_journald_fields_under_systemd() {
    let Some(lab) = testkit::lab() else { return };
    let m = &lab.machines[0];
    // The machine's systemd is the one child of its nspawn process; its journal is on its disk.
    let init = std::fs::read_to_string(format!("/proc/{}/task/{}/children", m.pid, m.pid)).unwrap_or_default();
    let init = init.split_whitespace().next().expect("the machine's init").to_string();
    let dir = format!("/proc/{init}/root/var/log/journal/{}", m.machine_id);
    let out = std::process::Command::new("journalctl")
        .args(["-D", &dir, "-u", "fleet-agent", "-o", "json", "--no-pager"])
        .output()
        .expect("journalctl runs");
    let entries: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let start = entries
        .iter()
        .rev()
        .find(|e| e["MESSAGE"].as_str().is_some_and(|m| m.starts_with("fleet-agent starting")))
        .unwrap_or_else(|| {
            panic!("no start in {} entries of {dir}: {}", entries.len(), String::from_utf8_lossy(&out.stderr))
        });
    assert_eq!(start["_TRANSPORT"], "journal", "{start}");
    assert_eq!(start["F_MACHINE"], m.machine_id.as_str(), "{start}");
    assert_eq!(start["TARGET"], "fleet_agent", "{start}");
    // The message reads as the text format does: plain `journalctl` shows the fields too.
    let machine = format!("machine={}", m.machine_id);
    assert!(start["MESSAGE"].as_str().is_some_and(|s| s.contains(&machine)), "{start}");
    assert!(start["CODE_FILE"].as_str().is_some_and(|f| f.ends_with("main.rs")), "{start}");
}

/// `--log-format json`: one JSON object per line, the event's fields at the top level.
#[test]
fn the_engine_logs_json_lines_when_asked() {
    let Some(lab) = testkit::lab() else { return };
    // An engine whose etcd does not answer logs its attempts to connect: enough to see the format.
    let mut child = std::process::Command::new(lab.bin_dir.join("fleet-engine"))
        .args(["--log-format", "json", "--etcd-endpoints", "http://127.0.0.1:1", "--listen", "127.0.0.1:1"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("fleet-engine runs");
    std::thread::sleep(Duration::from_secs(3));
    let _ = child.kill();
    let out = child.wait_with_output().expect("its output");
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON line in:\n{err}"));
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert!(v["timestamp"].is_string() && v["level"].is_string() && v["target"].is_string(), "{v}");
}
