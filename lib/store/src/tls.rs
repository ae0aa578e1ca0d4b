//! TLS, the same way in every fleet process: servers (the engine's API, the agent's API) with
//! optional or required client certificates signed by the cluster CA, and etcd clients presenting
//! a certificate. rustls with the ring provider everywhere; no OpenSSL.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {what}")]
    Pem { path: String, what: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |what: String| TlsError::Pem { path: path.display().to_string(), what };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(format!("cannot read certificates: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem(format!("invalid certificate: {e}")))?;
    if certs.is_empty() {
        return Err(pem("no certificate found".into()));
    }
    Ok(certs)
}

/// Who may connect to a TLS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuth {
    /// Anyone; identities come from elsewhere (tokens).
    None,
    /// A client certificate signed by the CA is checked if presented; clients without one may
    /// still connect (and authenticate with a token).
    Optional(PathBuf),
    /// A client certificate signed by the CA is required, and its common name must be one of
    /// `allowed` (every name when empty).
    Required { ca: PathBuf, allowed: Vec<String> },
}

fn roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(|e| TlsError::Config(format!("CA {}: {e}", ca.display())))?;
    }
    Ok(Arc::new(roots))
}

/// Server configuration from PEM files.
pub fn server_config(cert: &Path, key: &Path, clients: &ClientAuth) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError::Pem { path: key.display().to_string(), what: format!("invalid private key: {e}") })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match clients {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Optional(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        ClientAuth::Required { ca, allowed } => {
            let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider)
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(Arc::new(NamedClients { inner, allowed: allowed.clone() }))
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The certificate CN (and etcd user) of every engine.
pub const ENGINE_IDENTITY: &str = "fleet-engine";

/// The certificate CN (and etcd user) of the agent on machine `id`.
pub fn machine_identity(id: &str) -> String {
    format!("machine-{id}")
}

/// The machine whose identity `cn` is (`machine-<valid machine id>`), if it is one.
pub fn machine_of_identity(cn: &str) -> Option<&str> {
    cn.strip_prefix("machine-").filter(|m| fleet_model::machine::parse_machine_id(m).is_ok())
}

/// SHA-256 of `data`, hex: how API tokens are stored.
pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A CA's pin as a joining machine checks it (docs/install.md): `sha256:<hex>` of the first
/// PEM certificate's public key (its SubjectPublicKeyInfo, as kubeadm pins), so the pin holds
/// for a CA certificate re-issued with the same key.
pub fn ca_hash(pem: &[u8]) -> Result<String, TlsError> {
    let bad = |what: String| TlsError::Pem { path: "the CA certificate".into(), what };
    let der = CertificateDer::from_pem_slice(pem).map_err(|e| bad(e.to_string()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| bad(e.to_string()))?;
    Ok(format!("sha256:{}", sha256_hex(cert.tbs_certificate.subject_pki.raw)))
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// The CA's verification, then the common name checked against a list: the agent's API admits
/// engines only, although every machine of the cluster has a certificate from the same CA.
#[derive(Debug)]
struct NamedClients {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    allowed: Vec<String>,
}

impl rustls::server::danger::ClientCertVerifier for NamedClients {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed.is_empty() {
            return Ok(verified);
        }
        match common_name(end_entity) {
            Some(cn) if self.allowed.contains(&cn) => Ok(verified),
            cn => Err(rustls::Error::General(format!("client certificate CN {cn:?} is not allowed here"))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A CA to trust and a certificate to present: how fleet processes connect to etcd and to each
/// other.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct ClientTls {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl ClientTls {
    /// `None` when no file is set (plain connections); an error naming the missing one when
    /// only some are.
    pub fn from_files(ca: &str, cert: &str, key: &str) -> Result<Option<ClientTls>, TlsError> {
        match (ca.is_empty(), cert.is_empty(), key.is_empty()) {
            (true, true, true) => Ok(None),
            (false, false, false) => {
                Ok(Some(ClientTls { ca_file: ca.into(), cert_file: cert.into(), key_file: key.into() }))
            }
            _ => {
                Err(TlsError::Config("the CA file, the certificate file and the key file must be set together".into()))
            }
        }
    }

    fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
        std::fs::read(path).map_err(|e| TlsError::Pem { path: path.display().to_string(), what: e.to_string() })
    }

    /// Options for etcd-client (checked here, so a bad file is reported before connecting).
    pub fn etcd_options(&self) -> Result<etcd_client::TlsOptions, TlsError> {
        certs(&self.ca_file)?;
        certs(&self.cert_file)?;
        let (ca, cert, key) = (Self::read(&self.ca_file)?, Self::read(&self.cert_file)?, Self::read(&self.key_file)?);
        PrivateKeyDer::from_pem_slice(&key).map_err(|e| TlsError::Pem {
            path: self.key_file.display().to_string(),
            what: format!("invalid private key: {e}"),
        })?;
        Ok(etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(ca))
            .identity(etcd_client::Identity::from_pem(cert, key)))
    }

    /// The PEM of the CA and of the certificate followed by its key, for HTTP clients.
    pub fn pems(&self) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
        let mut identity = Self::read(&self.cert_file)?;
        identity.push(b'\n');
        identity.extend(Self::read(&self.key_file)?);
        Ok((Self::read(&self.ca_file)?, identity))
    }
}
