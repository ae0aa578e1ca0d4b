//! The listener on loopback with throwaway certificates: requests are served with what `peer`
//! made of the connection, a replaced configuration is used by the next handshake, and `stop`
//! ends it.

use super::*;
use axum::routing::get;
use axum::Extension;

fn certified() -> (rustls::ServerConfig, Vec<u8>) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let der = c.cert.der().to_vec();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(c.key_pair.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![c.cert.der().clone()], key)
        .expect("server config");
    (config, der)
}

fn trusting(der: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_der(der).expect("der"))
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

#[tokio::test]
async fn serves_with_the_peer_then_the_replaced_configuration_then_stops() {
    let (first, first_der) = certified();
    let (second, second_der) = certified();
    let tls = tls_config(first);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let app = Router::new().route("/", get(|Extension(who): Extension<String>| async move { who }));
    let (stop_tx, stop) = watch::channel(false);
    let served = serve_tls(listener, app, tls.clone(), stop, |addr, cert| {
        format!("{} {}", addr.ip(), if cert.is_some() { "with a certificate" } else { "anonymous" })
    });
    let url = format!("https://localhost:{port}/");

    let answer = trusting(&first_der).get(&url).send().await.expect("served").text().await.expect("text");
    assert_eq!(answer, "127.0.0.1 anonymous");

    *tls.write().expect("lock") = Arc::new(second);
    assert!(trusting(&first_der).get(&url).send().await.is_err(), "the old certificate is still served");
    let answer = trusting(&second_der).get(&url).send().await.expect("served").text().await.expect("text");
    assert_eq!(answer, "127.0.0.1 anonymous");

    stop_tx.send_replace(true);
    served.await.expect("task").expect("stopped cleanly");
    assert!(trusting(&second_der).get(&url).send().await.is_err(), "still listening after stop");
}

/// A socket bound to a port without listening (what an outgoing connection or one in
/// TIME_WAIT is): a listener without SO_REUSEADDR on the other side cannot have it.
fn hold_port() -> (tokio::net::TcpSocket, String) {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind("127.0.0.1:0".parse().expect("address")).expect("bind");
    let addr = s.local_addr().expect("address").to_string();
    (s, addr)
}

#[tokio::test]
async fn bind_waits_for_a_port_that_a_connection_still_holds() {
    let (held, addr) = hold_port();
    assert!(tokio::net::TcpListener::bind(&addr).await.is_err(), "the port is not held: the test shows nothing");
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
    });
    let l = bind(&addr, Duration::from_secs(10), Duration::from_millis(50)).await.expect("bound once released");
    assert_eq!(l.local_addr().expect("address").to_string(), addr);
    release.await.expect("released");
}

#[tokio::test]
async fn bind_gives_up_after_its_patience_naming_the_address() {
    let (_held, addr) = hold_port();
    let started = std::time::Instant::now();
    let e = bind(&addr, Duration::from_millis(300), Duration::from_millis(50)).await.expect_err("still held");
    assert!(started.elapsed() >= Duration::from_millis(250), "gave up after {:?}", started.elapsed());
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    assert!(e.to_string().contains(&addr), "{e}");
}

#[tokio::test]
async fn bind_reports_other_failures_at_once() {
    let started = std::time::Instant::now();
    let e = bind("192.0.2.1:1", Duration::from_secs(10), Duration::from_millis(50)).await.expect_err("not ours");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert!(e.to_string().contains("192.0.2.1:1"), "{e}");
}
