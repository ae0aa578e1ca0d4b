//! fleetctl's TLS flags against engines serving the API over TLS: the server is always verified
//! (the original skipped verification without a client certificate), and an engine with a client
//! CA refuses clients without a certificate it signed.

use fleet_integration::testkit::{self, fleetctl, text, wait_for};
use fleet_integration::{lab_dir, process};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

struct Engine(u32);
impl Drop for Engine {
    fn drop(&mut self) {
        process::stop(self.0, "fleet-engine", Duration::from_secs(5));
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
fn make_pki(dir: &Path) {
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        .expect("write");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("write");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=fleet test CA",
        ],
    );
    // Extensions make these X.509 v3 certificates, which rustls requires.
    for name in ["server", "client"] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        let (csr, pem, ext) = (format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
    // A second CA nobody trusts, to sign a client certificate the engine must refuse.
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "rogue.key",
            "-out",
            "rogue.pem",
            "-days",
            "2",
            "-subj",
            "/CN=rogue",
        ],
    );
}

fn start(lab: &fleet_integration::LabState, name: &str, port: u16, dir: &Path, mutual: bool) -> Engine {
    let mut cmd = Command::new(lab.bin_dir.join("fleet-engine"));
    cmd.args([
        "--etcd-endpoints",
        &lab.etcd_endpoints().join(","),
        "--etcd-prefix",
        &testkit::unique_prefix(name),
        "--engine-id",
        name,
    ])
    .args(["--listen", &format!("127.0.0.1:{}", port + 100), "--listen-tls", &format!("127.0.0.1:{port}")])
    .arg(format!("--tls-cert-file={}", dir.join("server.pem").display()))
    .arg(format!("--tls-key-file={}", dir.join("server.key").display()));
    if mutual {
        cmd.arg(format!("--tls-client-ca-file={}", dir.join("ca.pem").display()));
    }
    Engine(process::spawn_logged(cmd, &lab_dir().join(format!("{name}.log"))).expect("engine starts"))
}

#[tokio::test]
async fn tls_and_mutual_tls() {
    let Some(lab) = testkit::lab() else { return };
    let dir = testkit::scratch("tls").expect("dir");
    make_pki(&dir);
    let p = |f: &str| dir.join(f).display().to_string();
    let (ca, cert, key) = (p("ca.pem"), p("client.pem"), p("client.key"));
    let _plain = start(&lab, "t-tls", 12586, &dir, false);
    let _mutual = start(&lab, "t-mtls", 12587, &dir, true);
    let tls = "https://127.0.0.1:12586";
    let mtls = "https://127.0.0.1:12587";
    wait_for("TLS API", Duration::from_secs(30), || async {
        fleetctl(&lab, tls, &["--ca-file", &ca, "list-machines"]).ok().filter(|o| o.status.success())
    })
    .await
    .expect("TLS engine serves");

    // Server verified against the given CA; without it the connection is refused.
    let out = fleetctl(&lab, tls, &["--ca-file", &ca, "list-units"]).expect("run");
    assert!(out.status.success(), "{:?}", text(&out));
    let out = fleetctl(&lab, tls, &["list-units"]).expect("run");
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "an unverified server must be refused");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Mutual TLS: no certificate, or one from another CA, is refused; ours is accepted.
    let out = fleetctl(&lab, mtls, &["--ca-file", &ca, "list-units"]).expect("run");
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    let out = fleetctl(
        &lab,
        mtls,
        &["--ca-file", &ca, "--cert-file", &p("rogue.pem"), "--key-file", &p("rogue.key"), "list-units"],
    )
    .expect("run");
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    let ok = wait_for("mutual TLS API", Duration::from_secs(30), || async {
        fleetctl(&lab, mtls, &["--ca-file", &ca, "--cert-file", &cert, "--key-file", &key, "list-machines"])
            .ok()
            .filter(|o| o.status.success())
    })
    .await;
    assert!(ok.is_ok());

    let out = fleetctl(&lab, mtls, &["--cert-file", &cert, "list-units"]).expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("--cert-file and --key-file must be given together"), "{:?}", text(&out));
}
