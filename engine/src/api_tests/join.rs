//! Joining by token through the real router, on the in-memory store with in-memory etcd
//! accounts (`MemAccounts`): every refusal, and what a refusal leaves behind (nothing). The lab
//! joins a real machine against real etcd (integration/tests/join.rs).

use super::*;
use crate::join::{Joining, MemAccounts};
use fleet_model::join::JoinTokenRecord;
use rustls::pki_types::pem::PemObject;
use std::sync::Arc;

const MACHINE: &str = "0123456789abcdef0123456789abcdef";
const OTHER: &str = "fedcba9876543210fedcba9876543210";

struct Joinable {
    e: Engine,
    accounts: Arc<MemAccounts>,
    audit: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Drop for Joinable {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn joinable(name: &str) -> Joinable {
    let dir = std::env::temp_dir().join(format!("fleet-join-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    crate::pki::Ca::load_or_create(&dir).expect("ca");
    let accounts = Arc::new(MemAccounts::default());
    let joining = Joining::new(&dir, "", vec!["https://10.0.0.1:2379".into()], "/fleet-test/", accounts.clone())
        .expect("joining");
    let audit = dir.join("audit.log");
    let auth = AuthConfig { audit_log: audit.display().to_string(), ..AuthConfig::default() };
    let e = engine_full(auth, crate::events::DEFAULT_HISTORY, Some(Arc::new(joining))).await;
    Joinable { e, accounts, audit, dir }
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    rcgen::CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

impl Joinable {
    async fn token(&self, body: Value) -> (String, String) {
        let (status, made) = self.e.call(Method::POST, "/fleet/v1/join-tokens", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{made}");
        (made["token"].as_str().expect("token").to_string(), made["caHash"].as_str().expect("caHash").to_string())
    }

    /// A join from an anonymous TCP peer: the token is its only credential.
    async fn join(&self, token: &str, machine: &str) -> (StatusCode, Value) {
        let anonymous = Peer::Tcp(std::net::SocketAddr::from(([10, 0, 0, 9], 4242)));
        let body = json!({"token": token, "machineID": machine, "csr": csr(), "ips": ["10.0.0.9"]});
        self.e.call_as(anonymous, None, Method::POST, "/fleet/v1/join", Some(body)).await
    }

    async fn record(&self, token: &str) -> JoinTokenRecord {
        let id = token.split('.').next().expect("id");
        decode(&self.e.store.peek(self.e.keys.join_token(id).as_bytes()).expect("stored")).expect("record")
    }

    fn audited(&self) -> String {
        std::fs::read_to_string(&self.audit).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_joins_once_with_a_token_and_gets_a_certificate_of_its_own() {
    let j = joinable("once").await;
    let (token, ca_hash) = j.token(json!({"metadata": {"role": "web"}, "description": "rack 4"})).await;
    assert!(fleet_model::join::JoinToken::parse(&token).is_ok(), "{token}");
    // The public CA is the one the pin names.
    let mut req = Request::builder().uri("/fleet/v1/join/ca").body(Body::empty()).expect("request");
    req.extensions_mut().insert(Peer::Tcp(std::net::SocketAddr::from(([10, 0, 0, 9], 1))));
    let resp = j.e.app.clone().oneshot(req).await.expect("answer");
    assert_eq!(resp.status(), StatusCode::OK);
    let ca = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
    assert_eq!(fleet_store::tls::ca_hash(&ca).expect("hash"), ca_hash);

    let (status, joined) = j.join(&token, MACHINE).await;
    assert_eq!(status, StatusCode::OK, "{joined}");
    let pem = joined["certificate"].as_str().expect("certificate");
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
    assert_eq!(fleet_store::tls::common_name(&der), Some(format!("machine-{MACHINE}")));
    assert_eq!(joined["metadata"]["role"], "web");
    assert_eq!(joined["etcdEndpoints"][0], "https://10.0.0.1:2379");
    assert!(j.accounts.machines.lock().expect("accounts").contains(MACHINE), "its etcd user made");
    let r = j.record(&token).await;
    assert_eq!((r.uses_left, r.joined.clone()), (0, vec![MACHINE.to_string()]));
    // The list tells it, never with the secret.
    let (status, list) = j.e.call(Method::GET, "/fleet/v1/join-tokens", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["tokens"][0]["joined"][0], MACHINE);
    let secret = token.split('.').nth(1).expect("secret");
    assert!(!list.to_string().contains(secret), "{list}");
    assert!(j.audited().contains(&format!("machine {MACHINE} joined")), "{}", j.audited());

    // Used up: another machine is refused, and so is the same machine again.
    let (status, body) = j.join(&token, OTHER).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("used up")), "{body}");
    let (status, _) = j.join(&token, MACHINE).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(j.accounts.machines.lock().expect("accounts").len(), 1, "no account for a refused machine");
    assert!(j.audited().contains("refused"), "refusals are audited too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_revoked_tokens_are_refused_and_leave_nothing_behind() {
    let j = joinable("refused").await;
    let (token, _) = j.token(json!({"uses": 5})).await;
    let id = token.split('.').next().expect("id").to_string();
    let refused = |status: StatusCode, body: &Value, words: &str| {
        assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains(words)), "{status}: {body}");
    };
    // A wrong secret reads as no such token.
    let (status, body) = j.join(&format!("{id}.aaaaaaaaaaaaaaaa"), MACHINE).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    refused(status, &body, "no such token, or a wrong secret");
    let (status, _) = j.join("zzzzzz.aaaaaaaaaaaaaaaa", MACHINE).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = j.join("not-a-token", MACHINE).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    refused(status, &body, "ID.SECRET");
    let (status, body) = j.join(&token, "not-a-machine-id").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    refused(status, &body, "machineID");
    // A CSR that is not one: refused before anything is taken.
    let anonymous = Peer::Tcp(std::net::SocketAddr::from(([10, 0, 0, 9], 1)));
    let body = json!({"token": token, "machineID": MACHINE, "csr": "garbage"});
    let (status, body) = j.e.call_as(anonymous, None, Method::POST, "/fleet/v1/join", Some(body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    refused(status, &body, "csr");
    assert_eq!(j.record(&token).await.uses_left, 5, "no use taken by a refusal");

    // etcd failing to make the account: refused, the use given back, no account.
    j.accounts.fail_next_add.store(true, Ordering::SeqCst);
    let (status, _) = j.join(&token, MACHINE).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let r = j.record(&token).await;
    assert_eq!((r.uses_left, r.joined.len()), (5, 0), "the use given back");
    assert!(j.accounts.machines.lock().expect("accounts").is_empty());

    // Expired.
    let mut old = r.clone();
    old.expires = 1;
    j.e.store
        .txn(Txn {
            then: vec![Op::put(j.e.keys.join_token(&id), fleet_model::schema::encode(&old).expect("encode"), 0)],
            ..Txn::default()
        })
        .await
        .expect("txn");
    let (status, body) = j.join(&token, MACHINE).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    refused(status, &body, "expired");

    // A token for another machine.
    let (bound, _) = j.token(json!({"machines": [OTHER]})).await;
    let (status, body) = j.join(&bound, MACHINE).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    refused(status, &body, "not for machine");
    let (status, body) = j.e.call(Method::POST, "/fleet/v1/join-tokens", Some(json!({"machines": ["nope"]}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Revoked.
    let (status, _) = j.e.call(Method::DELETE, &format!("/fleet/v1/join-tokens/{id}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = j.join(&token, MACHINE).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = j.e.call(Method::DELETE, &format!("/fleet/v1/join-tokens/{id}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(j.accounts.machines.lock().expect("accounts").is_empty(), "no machine got in");
    assert!(j.audited().contains(&format!("join token {id} revoked")), "{}", j.audited());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_need_an_admin_and_an_engine_that_admits() {
    let j = joinable("admin").await;
    let (status, body) = j.e.call(Method::POST, "/fleet/v1/join-tokens", Some(json!({"ttlSecs": 0}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = j.e.call(Method::POST, "/fleet/v1/join-tokens", Some(json!({"uses": 0}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let anonymous = Peer::Tcp(std::net::SocketAddr::from(([10, 0, 0, 9], 1)));
    let (status, _) = j.e.call_as(anonymous, None, Method::POST, "/fleet/v1/join-tokens", Some(json!({}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // An engine without [join] says so.
    let plain = engine().await;
    let (status, body) = plain.call(Method::POST, "/fleet/v1/join-tokens", Some(json!({}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("[join]")), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_join_gives_its_use_back_though_another_machine_joined_meanwhile() {
    // A cluster's first boot: every machine joins with one token at once. A join that fails
    // after taking its use must give it back even though another machine took one since (the
    // give-back once compared the record with the failed join's own write, found it changed,
    // and left the machine listed as joined: it could never join again).
    let j = joinable("give-back").await;
    let (token, _) = j.token(json!({"uses": 3})).await;
    let (status, _) = j.join(&token, OTHER).await;
    assert_eq!(status, StatusCode::OK);
    let id = token.split('.').next().expect("id").to_string();
    // As the failed join left it: MACHINE took a use, then OTHER joined (above, any order).
    let mut r = j.record(&token).await;
    r.joined.insert(0, MACHINE.to_string());
    r.uses_left -= 1;
    let key = j.e.keys.join_token(&id);
    j.e.store
        .txn(Txn {
            then: vec![Op::put(key.clone(), fleet_model::schema::encode(&r).expect("encode"), 0)],
            ..Txn::default()
        })
        .await
        .expect("txn");
    crate::api::join::give_back(&j.e.api, &key, MACHINE).await;
    let after = j.record(&token).await;
    assert_eq!(after.joined, [OTHER.to_string()], "MACHINE no longer listed, OTHER still is");
    assert_eq!(after.uses_left, 2, "its use is back");
    // And the machine joins now.
    let (status, body) = j.join(&token, MACHINE).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
