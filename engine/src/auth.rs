//! Who is calling the API, and may they: a caller is identified by a bearer token, by the common
//! name of a client certificate the cluster CA signed, or as whoever could open the engine's unix
//! socket (mode 0660, group `fleet`); each identity maps to a role in the engine's configuration.
//! Every request that changes something is written to the audit log: who, from where, what, when,
//! and how it ended.
//!
//! Roles are ordered: `read` (lists, states, status, journals) < `operate` (start, stop, restart,
//! move existing units) < `admin` (submit and destroy units, machine metadata, drain).

use crate::http::ApiError;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A machine's own certificate: nothing but its own FleetLock calls.
    Machine,
    Read,
    Operate,
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Machine => "machine",
            Role::Read => "read",
            Role::Operate => "operate",
            Role::Admin => "admin",
        })
    }
}

/// The `[auth]` section of the engine's configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Client certificate common name -> role (certificates must be signed by `tls_client_ca_file`).
    pub certificates: BTreeMap<String, Role>,
    /// Bearer tokens, stored as SHA-256 (`fleet-pki token` prints a new one with its entry).
    pub tokens: Vec<TokenConfig>,
    /// Role of anyone who can open the engine's unix socket; who can is decided by the socket's
    /// mode (0660) and group (`socket_group`). `none` refuses every socket client.
    pub socket_role: Option<Role>,
    /// Group owning the unix socket, if it exists on this machine.
    pub socket_group: String,
    /// Where changes are recorded, one JSON object per line; empty: the engine's own log only.
    pub audit_log: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            certificates: BTreeMap::new(),
            tokens: Vec::new(),
            socket_role: Some(Role::Admin),
            socket_group: "fleet".into(),
            audit_log: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds the token (shown in the audit log).
    pub name: String,
    pub role: Role,
    /// SHA-256 of the token, hex.
    pub sha256: String,
}

/// How a connection reached the engine; set by the listeners on every request.
#[derive(Debug, Clone)]
pub enum Peer {
    Tcp(SocketAddr),
    Tls { addr: SocketAddr, common_name: Option<String> },
    Unix { uid: Option<u32> },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) | Peer::Tls { addr: a, .. } => write!(f, "{a}"),
            Peer::Unix { uid: Some(uid) } => write!(f, "unix socket, uid {uid}"),
            Peer::Unix { uid: None } => write!(f, "unix socket"),
        }
    }
}

/// The unix socket's client, for axum's connect info.
#[derive(Debug, Clone)]
pub struct UnixPeer(pub Option<u32>);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::UnixListener>> for UnixPeer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        UnixPeer(stream.io().peer_cred().ok().map(|c| c.uid()))
    }
}

/// An authenticated caller, available to handlers as an extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `token:<name>`, `cert:<common name>` or `socket:uid=<uid>`.
    pub who: String,
    pub role: Role,
    /// The machine whose certificate this is (`machine-<id>`), if it is one.
    pub machine: Option<String>,
}

impl Caller {
    /// Refuses the request unless the caller has `needed`.
    pub fn require(&self, needed: Role, what: &str) -> Result<(), ApiError> {
        if self.role >= needed {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{} has role {}; {what} needs role {needed}", self.who, self.role),
        ))
    }
}

/// Detail a handler adds to its change's audit record (what exactly it did).
#[derive(Debug, Clone)]
pub struct AuditDetail(pub String);

pub struct Auth {
    tokens: HashMap<String, (String, Role)>,
    certificates: BTreeMap<String, Role>,
    socket_role: Option<Role>,
    audit: Option<Mutex<std::fs::File>>,
    audit_path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth.tokens: token {0:?}: sha256 must be 64 hex digits")]
    TokenHash(String),
    #[error("cannot open the audit log {path}: {source}")]
    AuditLog { path: PathBuf, source: std::io::Error },
}

impl Auth {
    pub fn new(cfg: &AuthConfig) -> Result<Auth, AuthError> {
        let mut tokens = HashMap::new();
        for t in &cfg.tokens {
            let hash = t.sha256.trim().to_ascii_lowercase();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(AuthError::TokenHash(t.name.clone()));
            }
            tokens.insert(hash, (t.name.clone(), t.role));
        }
        let audit_path = PathBuf::from(&cfg.audit_log);
        let audit = if cfg.audit_log.is_empty() {
            None
        } else {
            if let Some(dir) = audit_path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let file = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&audit_path)
                .map_err(|source| AuthError::AuditLog { path: audit_path.clone(), source })?;
            Some(Mutex::new(file))
        };
        Ok(Auth { tokens, certificates: cfg.certificates.clone(), socket_role: cfg.socket_role, audit, audit_path })
    }

    /// Who is calling: a token wins (it is explicit), then a client certificate, then the socket.
    pub fn identify(&self, peer: &Peer, authorization: Option<&str>) -> Result<Caller, ApiError> {
        let unauthorized = |m: String| ApiError::new(StatusCode::UNAUTHORIZED, m);
        if let Some(value) = authorization {
            let token = value
                .strip_prefix("Bearer ")
                .ok_or_else(|| unauthorized("Authorization header must be \"Bearer <token>\"".into()))?;
            let hash = fleet_store::tls::sha256_hex(token.trim().as_bytes());
            return match self.tokens.get(&hash) {
                Some((name, role)) => Ok(Caller { who: format!("token:{name}"), role: *role, machine: None }),
                None => Err(unauthorized("unknown token".into())),
            };
        }
        match peer {
            Peer::Tls { common_name: Some(cn), .. } => match self.certificates.get(cn) {
                Some(role) => Ok(Caller { who: format!("cert:{cn}"), role: *role, machine: None }),
                // Every machine's certificate is the cluster's: it may take its own reboot slot.
                None => match fleet_store::tls::machine_of_identity(cn) {
                    Some(m) => Ok(Caller { who: format!("cert:{cn}"), role: Role::Machine, machine: Some(m.into()) }),
                    None => Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        format!("client certificate {cn:?} has no role in this engine's auth.certificates"),
                    )),
                },
            },
            Peer::Unix { uid } => match self.socket_role {
                Some(role) => {
                    let who = uid.map(|u| format!("socket:uid={u}")).unwrap_or_else(|| "socket".into());
                    Ok(Caller { who, role, machine: None })
                }
                None => Err(unauthorized("the unix socket grants no role (auth.socket_role)".into())),
            },
            _ => Err(unauthorized("authentication required: a client certificate or a bearer token".into())),
        }
    }

    pub(crate) fn audit(&self, record: &serde_json::Value) {
        tracing::info!(target: "fleet_audit", "{record}");
        if let Some(file) = &self.audit {
            let line = format!("{record}\n");
            let written = file.lock().map_err(|_| std::io::Error::other("poisoned")).and_then(|mut f| {
                f.write_all(line.as_bytes())?;
                f.flush()
            });
            if let Err(e) = written {
                tracing::error!(path = %self.audit_path.display(), error = %e, "cannot write the audit log");
            }
        }
    }
}

/// Answers 403 unless the caller [`authorize`] identified has `role`. Each route declares the
/// role it needs beside its handler (routes.rs), so the route table is the one place that says
/// who may do what. `PUT /units/{name}` and `units:batchUpdate` need `operate`; their handlers
/// ask for `admin` when a request submits or replaces a unit file.
pub async fn needs(State(role): State<Role>, req: Request, next: Next) -> Response {
    let what = format!("{} {}", req.method(), req.uri().path());
    let allowed = match req.extensions().get::<Caller>() {
        Some(caller) => caller.require(role, &what),
        None => Err(ApiError::new(StatusCode::UNAUTHORIZED, "authentication required")),
    };
    match allowed {
        Ok(()) => next.run(req).await,
        Err(e) => {
            crate::http::drain(req).await;
            e.into_response()
        }
    }
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| now.unix_timestamp().to_string())
}

/// Identifies the caller of every request (401 if it cannot be) for the handlers and for the
/// route's role check ([`needs`]), and writes each change to the audit log once answered.
pub async fn authorize(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let peer = if let Some(p) = req.extensions().get::<Peer>() {
        p.clone()
    } else if let Some(ConnectInfo(u)) = req.extensions().get::<ConnectInfo<UnixPeer>>() {
        Peer::Unix { uid: u.0 }
    } else if let Some(ConnectInfo(a)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
        Peer::Tcp(*a)
    } else {
        Peer::Tcp(SocketAddr::from(([0, 0, 0, 0], 0)))
    };
    let authorization = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let caller = match auth.identify(&peer, authorization.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            crate::http::drain(req).await;
            if !matches!(method, Method::GET | Method::HEAD) {
                auth.audit(&serde_json::json!({
                    "time": now_rfc3339(), "who": null, "from": peer.to_string(), "method": method.as_str(),
                    "path": path, "status": e.status().as_u16(), "error": e.message(),
                }));
            }
            return e.into_response();
        }
    };
    req.extensions_mut().insert(caller.clone());
    let mut resp = next.run(req).await;
    if !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS) {
        let detail = resp.extensions_mut().remove::<AuditDetail>().map(|d| d.0);
        auth.audit(&serde_json::json!({
            "time": now_rfc3339(), "who": caller.who, "role": caller.role, "from": peer.to_string(),
            "method": method.as_str(), "path": path, "status": resp.status().as_u16(), "detail": detail,
        }));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        let cfg = AuthConfig {
            certificates: [("admin".to_string(), Role::Admin)].into(),
            tokens: vec![TokenConfig {
                name: "viewer".into(),
                role: Role::Read,
                sha256: fleet_store::tls::sha256_hex(b"secret"),
            }],
            socket_role: None,
            ..AuthConfig::default()
        };
        Auth::new(&cfg).expect("auth")
    }

    #[test]
    fn callers_are_identified_by_token_certificate_or_socket() {
        let a = auth();
        let tcp = Peer::Tcp(SocketAddr::from(([127, 0, 0, 1], 1)));
        assert_eq!(a.identify(&tcp, None).map_err(|e| e.status()), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(a.identify(&tcp, Some("Bearer wrong")).map_err(|e| e.status()), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(a.identify(&tcp, Some("Basic eA==")).map_err(|e| e.status()), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(
            a.identify(&tcp, Some("Bearer secret")).ok(),
            Some(Caller { who: "token:viewer".into(), role: Role::Read, machine: None })
        );
        let tls = |cn: &str| Peer::Tls { addr: SocketAddr::from(([127, 0, 0, 1], 1)), common_name: Some(cn.into()) };
        assert_eq!(a.identify(&tls("admin"), None).map(|c| c.role).ok(), Some(Role::Admin));
        assert_eq!(a.identify(&tls("machine-x"), None).map_err(|e| e.status()), Err(StatusCode::FORBIDDEN));
        let m = a.identify(&tls("machine-0123456789abcdef0123456789abcdef"), None).expect("a machine");
        assert_eq!((m.role, m.machine.as_deref()), (Role::Machine, Some("0123456789abcdef0123456789abcdef")));
        assert!(m.require(Role::Read, "GET /fleet/v1/units").is_err(), "a machine reads nothing");
        assert_eq!(
            a.identify(&Peer::Unix { uid: Some(0) }, None).map_err(|e| e.status()),
            Err(StatusCode::UNAUTHORIZED)
        );
    }

    #[test]
    fn audit_times_are_rfc3339() {
        let t = now_rfc3339();
        let parsed = time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339);
        let age = parsed.map(|p| time::OffsetDateTime::now_utc() - p).expect(&t);
        assert!(age >= time::Duration::ZERO && age < time::Duration::seconds(5), "{t}");
        assert!(t.ends_with('Z') && &t[10..11] == "T", "{t}");
    }
}
