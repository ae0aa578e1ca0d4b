//! The lab is secured as a default install is: these tests knock on every door from the wrong
//! side. The API refuses callers without credentials, with foreign certificates or with too
//! small a role, and audits every change; etcd refuses plain and anonymous clients and confines a
//! machine's certificate to that machine's keys; every class of bad input is refused with a clear
//! error and leaves nothing behind; a unit cannot take the place of one of the machine's own.

use fleet_engine::pki::{Ca, Usage};
use fleet_integration::testkit::{self, fleetctl, text, wait_for, MachineBus};
use fleet_integration::{engine_audit_log, engine_socket, pki, LabState};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn unit(cmd: &str) -> Value {
    json!({"desiredState": "inactive", "options": [{"section": "Service", "name": "ExecStart", "value": cmd}]})
}

async fn call(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, String) {
    let mut req = http.request(method.parse().expect("method"), url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    match req.send().await {
        Ok(r) => {
            let status = r.status();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (status, v["error"]["message"].as_str().unwrap_or("").to_string())
        }
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

fn engine_of(lab: &LabState) -> (String, String) {
    let e = lab.engines.first().expect("lab has an engine");
    (e.name.clone(), e.api_url.clone())
}

#[tokio::test]
async fn api_refuses_the_unauthenticated_and_the_under_privileged_and_audits_changes() {
    let Some(lab) = testkit::lab() else { return };
    let (engine, api) = engine_of(&lab);
    let anon = pki::http_anonymous().expect("client");
    let units = format!("{api}/fleet/v1/units");
    let name = format!("sec-roles-{}.service", std::process::id());
    let one = format!("{units}/{name}");

    // No credentials, a wrong token, a malformed header: 401 with a message naming what is missing.
    let (s, m) = call(&anon, "GET", &units, None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{m}");
    assert!(m.contains("client certificate or a bearer token"), "{m}");
    assert_eq!(call(&anon, "GET", &units, Some("not-a-token"), None).await.0, StatusCode::UNAUTHORIZED);
    let resp = anon.get(&units).header("authorization", "Basic YWRtaW46YWRtaW4=").send().await.expect("GET");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // Plain HTTP to the TLS port gets no answer; a certificate from another CA, even with the
    // admin's name, fails the handshake.
    let plain = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
    let plain_url = units.replace("https://", "http://");
    // No HTTP answer at all, whatever its status: a port that also spoke plain HTTP (even only
    // to say 401) would fail here.
    match plain.get(&plain_url).send().await {
        Ok(r) => panic!("plain HTTP was answered on the TLS port: {}", r.status()),
        Err(e) => assert!(!e.is_status() && !e.is_timeout(), "plain HTTP: {e:?}"),
    }
    let rogue_ca = Ca::create("rogue CA").expect("rogue CA");
    let rogue = rogue_ca.issue("admin", &[], &[], Usage::Client).expect("rogue cert");
    let (ca_pem, _) = pki::identity("admin").pems().expect("pems");
    let rogue_client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem).expect("ca"))
        .identity(reqwest::Identity::from_pem(format!("{}\n{}", rogue.cert_pem, rogue.key_pem).as_bytes()).expect("id"))
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    assert!(rogue_client.get(&units).send().await.is_err(), "a foreign CA's certificate must be refused");

    // A machine's certificate is the cluster's, but all it may do on the API is take its own
    // reboot slot (FleetLock, see fleetlock.rs).
    let m1 = &lab.machines[0];
    let machine = pki::http_as(&format!("machine-{}", m1.name)).expect("machine client");
    let (s, m) = call(&machine, "GET", &units, None, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{m}");
    assert!(m.contains("has role machine") && m.contains("needs role read"), "{m}");

    // Roles: read lists; operate changes desired states but submits nothing; admin does all.
    let (read, operate, admin) = (
        pki::token("read").expect("token"),
        pki::token("operate").expect("token"),
        pki::token("admin").expect("token"),
    );
    assert_eq!(call(&anon, "GET", &units, Some(&read), None).await.0, StatusCode::OK);
    let (s, m) = call(&anon, "PUT", &one, Some(&read), Some(unit("/bin/sleep 1"))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{m}");
    assert!(m.contains("token:lab-read has role read") && m.contains("needs role operate"), "{m}");
    let (s, m) = call(&anon, "PUT", &one, Some(&operate), Some(unit("/bin/sleep 1"))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{m}");
    assert!(m.contains("needs role admin"), "{m}");
    assert_eq!(call(&anon, "GET", &one, Some(&read), None).await.0, StatusCode::NOT_FOUND, "nothing was stored");
    assert_eq!(call(&anon, "PUT", &one, Some(&admin), Some(unit("/bin/sleep 1"))).await.0, StatusCode::CREATED);
    let (s, m) = call(&anon, "PUT", &one, Some(&operate), Some(json!({"desiredState": "loaded"}))).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{m}");
    // Replacing the contents is a submission again.
    let (s, _) = call(&anon, "PUT", &one, Some(&operate), Some(unit("/bin/sleep 2"))).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(call(&anon, "DELETE", &one, Some(&operate), None).await.0, StatusCode::FORBIDDEN);
    let patch = json!([{"op": "add", "path": format!("/{}/metadata/sec", m1.machine_id), "value": "x"}]);
    let (s, _) = call(&anon, "PATCH", &format!("{api}/fleet/v1/machines"), Some(&operate), Some(patch)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(call(&anon, "DELETE", &one, Some(&admin), None).await.0, StatusCode::NO_CONTENT);

    // The audit log names who did what, when, and how it ended, refusals included.
    let log = engine_audit_log(&engine);
    let records: Vec<Value> = wait_for("audit records", T, || async {
        let text = std::fs::read_to_string(&log).ok()?;
        let recs: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        recs.iter()
            .any(|r| {
                r["method"] == "DELETE"
                    && r["status"] == 204
                    && r["path"].as_str() == Some(&format!("/fleet/v1/units/{name}"))
            })
            .then_some(recs)
    })
    .await
    .expect("audit log");
    let of = |who: &str, method: &str, status: u16| {
        records.iter().any(|r| {
            r["who"] == who
                && r["method"] == method
                && r["status"] == status
                && r["path"].as_str().is_some_and(|p| p.ends_with(&name))
                && r["time"].as_str().is_some_and(|t| t.ends_with('Z'))
        })
    };
    assert!(of("token:lab-admin", "PUT", 201), "creation audited");
    assert!(of("token:lab-operate", "PUT", 204), "desired state change audited");
    assert!(of("token:lab-operate", "DELETE", 403), "refusal audited");
    assert!(of("token:lab-read", "PUT", 403), "refusal audited");

    // The unix socket: mode 0660, and whoever can open it is the socket's role (admin here).
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(engine_socket(&engine)).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let out =
        fleetctl(&lab, &format!("unix://{}", engine_socket(&engine).display()), &["list-machines", "--no-legend"])
            .expect("fleetctl");
    assert!(out.status.success(), "{:?}", text(&out));
}

#[tokio::test]
async fn etcd_refuses_strangers_and_confines_each_machine_to_its_own_keys() {
    let Some(lab) = testkit::lab() else { return };
    let endpoints = lab.etcd_endpoints();
    let prefix = fleet_integration::ETCD_PREFIX;

    // Plain and certificate-less clients get nowhere.
    let plain: Vec<String> = endpoints.iter().map(|e| e.replace("https://", "http://")).collect();
    let attempt = async {
        let mut c = etcd_client::Client::connect(plain, None).await?;
        c.get("/", None).await
    };
    assert!(!matches!(tokio::time::timeout(Duration::from_secs(5), attempt).await, Ok(Ok(_))), "plain etcd answered");
    let (ca, _) = pki::identity("root").pems().expect("pems");
    let anonymous = async {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_tls(etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca)));
        let mut c = etcd_client::Client::connect(endpoints.clone(), Some(opts)).await?;
        c.get("/", None).await
    };
    // Refused in the TLS handshake (etcd requires a client certificate), not by etcd's auth
    // once connected: an etcd that let certificate-less clients in and then said "permission
    // denied" or "user name is empty" would fail here.
    match tokio::time::timeout(Duration::from_secs(5), anonymous).await {
        Ok(Ok(_)) => panic!("anonymous etcd answered"),
        Ok(Err(e)) => {
            let shown = format!("{e:?}").to_lowercase();
            assert!(
                !shown.contains("permission denied") && !shown.contains("user name") && !shown.contains("auth"),
                "refused by etcd's auth, not in the handshake: {e:?}"
            );
            assert!(
                matches!(e, etcd_client::Error::TransportError(_))
                    || shown.contains("transport")
                    || shown.contains("tls")
                    || shown.contains("handshake")
                    || shown.contains("certificate")
                    || shown.contains("connection"),
                "not a TLS/transport failure: {e:?}"
            );
        }
        Err(_) => {}
    }

    // Machine 1's certificate: its own schedule and bodies readable, its own presence and states
    // writable, nothing else.
    let (m1, m2) = (&lab.machines[0], &lab.machines[1]);
    let mut c = pki::etcd_as(&endpoints, &format!("machine-{}", m1.name)).await.expect("machine client");
    let denied = |r: Result<(), etcd_client::Error>, what: &str| match r {
        Err(e) if e.to_string().contains("permission denied") => {}
        other => panic!("{what}: expected permission denied, got {other:?}"),
    };
    let put = |c: &mut etcd_client::Client, k: String| {
        let mut c = c.clone();
        async move { c.put(k, "x", None).await.map(|_| ()) }
    };
    let get = |c: &mut etcd_client::Client, k: String| {
        let mut c = c.clone();
        async move { c.get(k, Some(etcd_client::GetOptions::new().with_prefix())).await.map(|_| ()) }
    };
    denied(put(&mut c, format!("{prefix}machines/{}", m2.machine_id)).await, "write another machine's presence");
    denied(put(&mut c, format!("{prefix}states/{}/x.service", m2.machine_id)).await, "write another machine's state");
    denied(put(&mut c, format!("{prefix}schedule/{}/x.service", m1.machine_id)).await, "write its own schedule");
    denied(put(&mut c, format!("{prefix}units/x.service")).await, "write a unit");
    denied(put(&mut c, format!("{prefix}leader")).await, "write the leader key");
    denied(get(&mut c, format!("{prefix}units/")).await, "read the units");
    denied(get(&mut c, format!("{prefix}schedule/{}/", m2.machine_id)).await, "read another machine's schedule");
    get(&mut c, format!("{prefix}schedule/{}/", m1.machine_id)).await.expect("own schedule readable");
    get(&mut c, format!("{prefix}bodies/")).await.expect("bodies readable");
    let own = format!("{prefix}states/{}/sec-probe.service", m1.machine_id);
    put(&mut c, own.clone()).await.expect("own state writable");
    c.delete(own, None).await.expect("own state deletable");

    // The engines' certificate covers fleet's keys only.
    let mut e = pki::etcd_as(&endpoints, "engine").await.expect("engine client");
    denied(e.put("/not-fleet", "x", None).await.map(|_| ()), "engine writes outside /fleet");
}

#[tokio::test]
async fn bad_input_is_refused_with_a_clear_error_and_nothing_stored() {
    let Some(lab) = testkit::lab() else { return };
    let (_, api) = engine_of(&lab);
    let http = testkit::http();
    let base = format!("{api}/fleet/v1");
    let long_value = "x".repeat(2000);
    let big: Vec<Value> = (0..40)
        .map(|i| json!({"section": "Service", "name": format!("Environment"), "value": format!("V{i}={long_value}")}))
        .collect();
    let many: Vec<Value> =
        (0..1001).map(|i| json!({"section": "Service", "name": "Environment", "value": format!("V{i}=1")})).collect();
    let m1 = &lab.machines[0].machine_id;
    let cases: Vec<(&str, String, Value, StatusCode, &str)> = vec![
        (
            "PUT",
            format!("{base}/units/bad-big.service"),
            json!({"desiredState": "inactive", "options": big}),
            StatusCode::BAD_REQUEST,
            "at most 65536",
        ),
        (
            "PUT",
            format!("{base}/units/bad-many.service"),
            json!({"desiredState": "inactive", "options": many}),
            StatusCode::BAD_REQUEST,
            "options; at most 1000",
        ),
        (
            "PUT",
            format!("{base}/units/bad-line.service"),
            unit(&"y".repeat(5000)),
            StatusCode::BAD_REQUEST,
            "line too long",
        ),
        (
            "PUT",
            format!("{base}/units/{}.service", "n".repeat(300)),
            unit("/bin/true"),
            StatusCode::BAD_REQUEST,
            "maximum length",
        ),
        (
            "PUT",
            format!("{base}/units/..%2F..%2Fetc%2Fbad.service"),
            unit("/bin/true"),
            StatusCode::BAD_REQUEST,
            "invalid character '/'",
        ),
        (
            "PUT",
            format!("{base}/units/bad@..%2F..%2Fx.service"),
            unit("/bin/true"),
            StatusCode::BAD_REQUEST,
            "invalid character '/'",
        ),
        (
            "PUT",
            format!("{base}/units/bad%00nul.service"),
            unit("/bin/true"),
            StatusCode::BAD_REQUEST,
            "invalid character",
        ),
        (
            "PUT",
            format!("{base}/units/bad-caf%C3%A9.service"),
            unit("/bin/true"),
            StatusCode::BAD_REQUEST,
            "invalid character 'é'",
        ),
        (
            "PUT",
            format!("{base}/units/bad-rtl%E2%80%AE.service"),
            unit("/bin/true"),
            StatusCode::BAD_REQUEST,
            "invalid character",
        ),
        ("PUT", format!("{base}/units/bad.exe"), unit("/bin/true"), StatusCode::BAD_REQUEST, "invalid unit type"),
        (
            "PUT",
            format!("{base}/units/bad-sec.service"),
            json!({"desiredState": "inactive", "options": [{"section": "Service]\n[Unit", "name": "X", "value": "1"}]}),
            StatusCode::BAD_REQUEST,
            "invalid unit option",
        ),
        (
            "POST",
            format!("{base}/units"),
            json!({"units": (0..10_001).map(|i| json!({"name": format!("bad-n{i}.service"), "options": []})).collect::<Vec<_>>()}),
            StatusCode::BAD_REQUEST,
            "at most 10000",
        ),
        (
            "PATCH",
            format!("{base}/machines"),
            json!([{"op": "add", "path": format!("/{m1}/metadata/k"), "value": "v".repeat(600)}]),
            StatusCode::BAD_REQUEST,
            "at most 512",
        ),
        (
            "PATCH",
            format!("{base}/machines"),
            json!([{"op": "add", "path": format!("/{m1}/metadata/{}", "k".repeat(80)), "value": "v"}]),
            StatusCode::BAD_REQUEST,
            "1 to 64",
        ),
        (
            "PATCH",
            format!("{base}/machines"),
            json!([{"op": "add", "path": format!("/{m1}/metadata/k"), "value": "a\u{7}b"}]),
            StatusCode::BAD_REQUEST,
            "control character",
        ),
        (
            "PATCH",
            format!("{base}/machines"),
            json!([{"op": "add", "path": "/../../metadata/k", "value": "v"}]),
            StatusCode::BAD_REQUEST,
            "path invalid",
        ),
    ];
    for (method, url, body, status, needle) in cases {
        let shown: String = url.chars().take(90).collect();
        let (s, m) = call(&http, method, &url, None, Some(body)).await;
        assert_eq!(s, status, "{method} {shown}: {m}");
        assert!(m.contains(needle), "{method} {shown}: message {m:?} should contain {needle:?}");
    }
    // A body over the limit is refused before any handler parses it, in fleet's error shape, and the
    // client gets to read that answer (the engine reads the rest of a moderately oversized body).
    let huge = "x".repeat(2 << 20);
    let resp = http
        .put(format!("{base}/units/bad-huge.service"))
        .header("content-type", "application/json")
        .body(format!("{{\"desiredState\":\"inactive\",\"options\":[],\"pad\":\"{huge}\"}}"))
        .send()
        .await
        .expect("PUT");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: Value = resp.json().await.expect("JSON error body");
    assert_eq!(v["error"]["code"], 413);
    let m = v["error"]["message"].as_str().unwrap_or_default();
    assert!(m.contains("at most 1048576"), "413 message should name the limit: {m:?}");

    // Nothing of it was stored.
    let mut etcd = testkit::etcd(&lab).await.expect("etcd");
    let keys = testkit::keys_under(&mut etcd, fleet_integration::ETCD_PREFIX).await.expect("keys");
    let stray: Vec<&String> = keys.iter().filter(|k| k.contains("/bad") || k.ends_with("metadata/k")).collect();
    assert!(stray.is_empty(), "stored despite refusal: {stray:?}");
}

#[tokio::test]
async fn a_unit_cannot_take_the_place_of_a_machine_unit() {
    let Some(lab) = testkit::lab() else { return };
    let (_, api) = engine_of(&lab);
    let dir = testkit::scratch("sec-shadow").expect("dir");
    // getty@.service is the machine's own template; systemd-* names are the machine's by rule.
    let names = ["getty@tty9.service", "systemd-fleet-probe.service"];
    for n in names {
        std::fs::write(dir.join(n), "[Service]\nExecStart=/bin/sleep 1000\n").expect("write");
    }
    let before: Vec<(String, String)> = {
        let bus = MachineBus::connect(&lab.machines[0]).await.expect("bus");
        vec![("getty@tty9.service".into(), bus.fragment_path("getty@tty9.service").await.expect("fragment"))]
    };
    let paths: Vec<String> = names.iter().map(|n| dir.join(n).display().to_string()).collect();
    let mut args = vec!["start", "--no-block"];
    args.extend(paths.iter().map(String::as_str));
    let out = fleetctl(&lab, &api, &args).expect("fleetctl");
    assert!(out.status.success(), "{:?}", text(&out));

    let http = testkit::http();
    for n in names {
        let state: Value = wait_for(&format!("{n} reported refused"), T, || async {
            let v: Value = http.get(format!("{api}/fleet/v1/state/{n}")).send().await.ok()?.json().await.ok()?;
            (v["systemdLoadState"] == "refused").then_some(v)
        })
        .await
        .expect("refused");
        assert_eq!(state["systemdActiveState"], "failed", "{state}");
        assert_eq!(state["systemdSubState"], "shadows-system-unit", "{state}");
    }
    // The machine's own unit is untouched, wherever the fleet unit was placed.
    for m in &lab.machines {
        let bus = MachineBus::connect(m).await.expect("bus");
        for (n, fragment) in &before {
            assert_eq!(&bus.fragment_path(n).await.expect("fragment"), fragment, "{} on {}", n, m.name);
        }
    }
    let out = fleetctl(&lab, &api, &["destroy", names[0], names[1]]).expect("fleetctl");
    assert!(out.status.success(), "{:?}", text(&out));
    for n in names {
        wait_for(&format!("{n} state gone"), T, || async {
            let r = http.get(format!("{api}/fleet/v1/state/{n}")).send().await.ok()?;
            (r.status() == StatusCode::NOT_FOUND).then_some(())
        })
        .await
        .expect("state removed");
    }
}

/// Every refusal reaches the client as an HTTP answer, over HTTP/1.1 and HTTP/2 (what curl and
/// most clients pick over TLS), whatever the size of the body the refused request carried: the
/// engine reads a refused request's body before answering, or an HTTP/2 client sees the stream
/// reset (curl: "Stream error in the HTTP/2 framing layer") instead of the 401/403.
#[tokio::test]
async fn refusals_of_requests_with_bodies_are_answers_over_http1_and_http2() {
    let Some(lab) = testkit::lab() else { return };
    let (_, api) = engine_of(&lab);
    let read = pki::token("read").expect("token");
    let (ca, _) = pki::identity("admin").pems().expect("the lab CA");
    let client = |h2: bool| {
        let b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA"))
            .timeout(T);
        let b = if h2 { b.http2_prior_knowledge() } else { b.http1_only() };
        b.build().expect("client")
    };
    let url = format!("{api}/fleet/v1/units/sec-h2-{}.service", std::process::id());
    for (h2, version) in [(false, reqwest::Version::HTTP_11), (true, reqwest::Version::HTTP_2)] {
        let http = client(h2);
        for size in [10usize, 100_000, 900_000] {
            let body = serde_json::to_vec(&json!({"options": [{"section": "Service", "name": "ExecStart",
                "value": "x".repeat(size)}]}))
            .expect("JSON");
            for i in 0..10 {
                for (token, want) in [(None, StatusCode::UNAUTHORIZED), (Some(&read), StatusCode::FORBIDDEN)] {
                    let mut req = http.put(&url).header("content-type", "application/json").body(body.clone());
                    if let Some(t) = token {
                        req = req.bearer_auth(t);
                    }
                    let resp = match req.send().await {
                        Ok(r) => r,
                        Err(e) => panic!("{version:?}, body {size} B, try {i}: no answer but {e:?}"),
                    };
                    assert_eq!(resp.version(), version);
                    assert_eq!(resp.status(), want, "{version:?}, body {size} B, try {i}");
                    let v: Value = resp.json().await.expect("a JSON error body");
                    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
                }
            }
        }
    }
}

/// The agent's API (unit status and journals, reached by the engines' proxy) admits engine
/// certificates only: a machine's certificate, the admin's, a token and no credentials are all
/// refused in the TLS handshake; the engine's certificate gets an HTTP answer.
#[tokio::test]
async fn the_agent_api_admits_engine_certificates_only() {
    let Some(lab) = testkit::lab() else { return };
    let m = &lab.machines[0];
    let url = format!("https://{}:12490/units/sec-none.service/status", m.ip);
    let engine = pki::http_as("engine").expect("engine client");
    let resp = engine.get(&url).send().await.expect("the engine's certificate is admitted");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "a unit the agent does not run");
    let token = pki::token("admin").expect("token");
    let refused = [
        ("a machine's certificate", pki::http_as(&format!("machine-{}", m.name)).expect("client"), None),
        ("the admin's certificate", pki::http_as("admin").expect("client"), None),
        ("an admin token", pki::http_anonymous().expect("client"), Some(token)),
        ("no credentials", pki::http_anonymous().expect("client"), None),
    ];
    for (who, client, token) in refused {
        let mut req = client.get(&url);
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        match req.send().await {
            Ok(r) => panic!("{who}: the agent answered {}", r.status()),
            Err(e) => assert!(!e.is_status() && !e.is_timeout(), "{who}: {e:?}"),
        }
    }
}
