//! fleetctl's TLS flags against engines serving the API over TLS: the server is always verified
//! (the original skipped verification without a client certificate), and an engine with a client
//! CA refuses clients without a certificate it signed.

use fleet_integration::testkit::{self, text, wait_for};
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

/// An engine serving the API over TLS with the test's own server certificate; with `mutual`,
/// client certificates from the test CA identify callers (`client` has role read). A token
/// (returned) has role read too.
fn start(lab: &fleet_integration::LabState, name: &str, port: u16, dir: &Path, mutual: bool) -> (Engine, String) {
    let token = fleet_engine::pki::new_token().expect("token");
    let engine = fleet_integration::pki::identity("engine");
    let config = format!(
        "etcd_ca_file = {:?}\netcd_cert_file = {:?}\netcd_key_file = {:?}\n\n[auth]\ncertificates = {{ client = \"read\" }}\n\n[[auth.tokens]]\nname = \"t\"\nrole = \"read\"\nsha256 = {:?}\n",
        engine.ca_file.display().to_string(),
        engine.cert_file.display().to_string(),
        engine.key_file.display().to_string(),
        fleet_engine::pki::token_hash(&token),
    );
    let config_file = dir.join(format!("{name}.toml"));
    std::fs::write(&config_file, config).expect("write config");
    let mut cmd = Command::new(lab.bin_dir.join("fleet-engine"));
    cmd.arg("--config")
        .arg(&config_file)
        .args([
            "--etcd-endpoints",
            &lab.etcd_endpoints().join(","),
            "--etcd-prefix",
            &testkit::unique_prefix(name),
            "--engine-id",
            name,
        ])
        .args(["--listen", &lab_dir().join(format!("{name}.sock")).display().to_string()])
        .args(["--listen-tls", &format!("127.0.0.1:{port}")])
        .arg(format!("--tls-cert-file={}", dir.join("server.pem").display()))
        .arg(format!("--tls-key-file={}", dir.join("server.key").display()));
    if mutual {
        cmd.arg(format!("--tls-client-ca-file={}", dir.join("ca.pem").display()));
    }
    (Engine(process::spawn_logged(cmd, &lab_dir().join(format!("{name}.log"))).expect("engine starts")), token)
}

/// fleetctl with only the TLS settings given here (not the lab's).
fn ctl(lab: &fleet_integration::LabState, endpoint: &str, args: &[&str]) -> std::process::Output {
    Command::new(lab.bin_dir.join("fleetctl"))
        .args(args)
        .env("FLEETCTL_ENDPOINT", endpoint)
        .env_remove("FLEETCTL_CA_FILE")
        .env_remove("FLEETCTL_CERT_FILE")
        .env_remove("FLEETCTL_KEY_FILE")
        .env_remove("FLEETCTL_TOKEN")
        .output()
        .expect("fleetctl runs")
}

#[tokio::test]
async fn tls_and_mutual_tls() {
    let Some(lab) = testkit::lab() else { return };
    let dir = testkit::scratch("tls").expect("dir");
    make_pki(&dir);
    let p = |f: &str| dir.join(f).display().to_string();
    let (ca, cert, key) = (p("ca.pem"), p("client.pem"), p("client.key"));
    let (_plain, token) = start(&lab, "t-tls", 12586, &dir, false);
    let (_mutual, _) = start(&lab, "t-mtls", 12587, &dir, true);
    let tls = "https://127.0.0.1:12586";
    let mtls = "https://127.0.0.1:12587";
    wait_for("TLS API", Duration::from_secs(30), || async {
        Some(ctl(&lab, tls, &["--ca-file", &ca, "--token", &token, "list-machines"])).filter(|o| o.status.success())
    })
    .await
    .expect("TLS engine serves");

    // Server verified against the given CA; without it the connection is refused.
    let out = ctl(&lab, tls, &["--ca-file", &ca, "--token", &token, "list-units"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let out = ctl(&lab, tls, &["--token", &token, "list-units"]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "an unverified server must be refused");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // A verified server still wants to know who calls.
    let out = ctl(&lab, tls, &["--ca-file", &ca, "list-units"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(text(&out).1.contains("authentication required"), "{:?}", text(&out));

    // Client certificates: none (and no token) or one from another CA is refused; ours is
    // accepted and mapped to its role.
    let out = ctl(&lab, mtls, &["--ca-file", &ca, "list-units"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    let out = ctl(
        &lab,
        mtls,
        &["--ca-file", &ca, "--cert-file", &p("rogue.pem"), "--key-file", &p("rogue.key"), "list-units"],
    );
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    let ok = wait_for("mutual TLS API", Duration::from_secs(30), || async {
        Some(ctl(&lab, mtls, &["--ca-file", &ca, "--cert-file", &cert, "--key-file", &key, "list-machines"]))
            .filter(|o| o.status.success())
    })
    .await;
    assert!(ok.is_ok());
    let out = ctl(&lab, mtls, &["--cert-file", &cert, "list-units"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("--cert-file and --key-file must be given together"), "{:?}", text(&out));
}
