//! fleet-client: a typed client of fleet's `/fleet/v1` API, used by fleetctl, the lab's tests,
//! fleet-sim and the bench. It speaks https (verifying the server against a CA of the caller's
//! choosing, with an optional client certificate and API token), plain http, or a unix socket,
//! and takes several endpoints: a request that cannot reach one engine (or that an engine cut off
//! from etcd refuses with 503) goes to the next, and the client keeps using the one that answered.
//!
//! It also speaks FleetLock, the reboot-slot protocol every engine serves.
//!
//! It must not depend on etcd, tonic or the engine: a REST client compiles no gRPC. Wire types
//! come from `fleet-api`, defined once.

mod events;
mod fleetlock;
mod rollouts;
mod states;
mod units;

pub use events::EventQuery;
pub use fleet_api::StateStreamHead;
pub use fleet_api::{Event, EventPage};
pub use fleet_api::{JoinTokenCreated, JoinTokenInfo, JoinTokenRequest};
pub use fleetlock::FleetLockOp;
pub use states::{head_of, StateLine, StateStream};
pub use units::NewUnit;

pub use fleet_api::{AgentStatus, Created, Found, Machine, Unit, UnitError, UnitState, Until, WaitEvent};
use fleet_api::{ErrorBody, MachinePage, Page, UnitPage, UnitStatePage};
use reqwest::StatusCode;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Items asked for per page of a listing (the engine allows 1 to 10,000).
const PAGE_SIZE: &str = "5000";

/// Units named in one batch request (the engine's limit).
pub const BATCH: usize = fleet_api::MAX_UNITS_PER_REQUEST;

/// Batch requests of one command in flight at once: the engine validates one while etcd writes
/// the other (a million units are 100 requests).
pub const BATCHES_IN_FLIGHT: usize = 2;

/// How to authenticate, and whom to trust. PEM file paths.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// CA certificates to verify an https endpoint with; without it, the usual public roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and its key, for endpoints that require one (both or neither).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// API token, sent as `Authorization: Bearer`.
    pub token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client's settings are wrong (an endpoint, a file, a token); nothing was sent.
    #[error("{0}")]
    Config(String),
    /// No endpoint could be reached (or every one was cut off from etcd).
    #[error("{what}: cannot reach the fleet API at {endpoints}: {reason}")]
    Unreachable { what: String, endpoints: String, reason: String },
    /// The request failed on the way (a timeout, a connection cut mid-answer).
    #[error("{what}: {source}")]
    Http {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    /// The engine refused: its status, its message, and the units it refused (batch methods).
    #[error("API error {status}: {message}")]
    Api { status: u16, message: String, units: Vec<UnitError> },
    /// The engine answered something this client cannot read.
    #[error("{what}: unreadable response: {reason}")]
    Decode { what: String, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The HTTP status of an API refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One engine: its own HTTP client (a unix socket is a property of the connection).
struct Endpoint {
    http: reqwest::Client,
    /// `http(s)://host:port/fleet/v1`, or `http://domain-sock/fleet/v1` for a socket.
    base: String,
    /// As the user gave it, for error messages.
    shown: String,
}

pub struct Client {
    endpoints: Vec<Endpoint>,
    /// The endpoint that answered last: requests go there first.
    current: AtomicUsize,
    timeout: Duration,
}

/// Rounds over every endpoint before giving up on a request that reached none.
const ROUNDS: u32 = 3;

impl Client {
    /// A client of `endpoints`: a comma-separated list (as fleetctl's `--endpoint` takes) of
    /// `https://host:port`, `http://host:port` or `unix:///path/to.sock` (`file://` too, as the
    /// original accepted). `timeout` bounds each request and each connection attempt.
    pub fn new(endpoints: &str, timeout: Duration, creds: &Credentials) -> Result<Self> {
        let list: Vec<&str> = endpoints.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
        if list.is_empty() {
            return Err(Error::Config("no endpoint given".into()));
        }
        let endpoints = list.iter().map(|e| Endpoint::new(e, timeout, creds)).collect::<Result<Vec<_>>>()?;
        Ok(Client { endpoints, current: AtomicUsize::new(0), timeout })
    }

    /// Sends the request `build` makes for an endpoint, trying the endpoints in turn from the
    /// one that answered last. A request that never reached an engine, or that an engine
    /// refused with 503 (it could not reach etcd, so it changed nothing), is sent again to the
    /// next endpoint; after a round over all of them, with backoff.
    async fn send(
        &self,
        what: &str,
        build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        let n = self.endpoints.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut reason = String::new();
        for round in 0..ROUNDS {
            for k in 0..n {
                let i = (first + k) % n;
                let ep = &self.endpoints[i];
                match build(&ep.http, &ep.base).send().await {
                    Ok(resp)
                        if resp.status() == StatusCode::SERVICE_UNAVAILABLE && !(round + 1 == ROUNDS && k + 1 == n) =>
                    {
                        reason = format!("{} answered 503: it cannot reach etcd", ep.shown);
                    }
                    Ok(resp) => {
                        self.current.store(i, Ordering::Relaxed);
                        return Ok(resp);
                    }
                    Err(e) if e.is_connect() && n == 1 => reason = e.to_string(),
                    Err(e) if e.is_connect() => reason = format!("{}: {e}", ep.shown),
                    Err(source) => return Err(Error::Http { what: what.to_string(), source }),
                }
            }
            if round + 1 < ROUNDS {
                tokio::time::sleep(Duration::from_millis(150 << round)).await;
            }
        }
        let endpoints = self.endpoints.iter().map(|e| e.shown.as_str()).collect::<Vec<_>>().join(", ");
        Err(Error::Unreachable { what: what.to_string(), endpoints, reason })
    }

    /// An answer that is not a success, as an error (with the units a batch method refused).
    async fn refusal(resp: reqwest::Response) -> Error {
        let status = resp.status();
        let code = status.as_u16();
        match resp.json::<ErrorBody>().await {
            Ok(b) if !b.units.is_empty() => {
                let lines: Vec<String> = b.units.iter().map(|u| format!("  {}: {}", u.name, u.error)).collect();
                let what = b.error.message.split(':').next().unwrap_or("refused").to_string();
                Error::Api { status: code, message: format!("{what}:\n{}", lines.join("\n")), units: b.units }
            }
            Ok(b) if !b.error.message.is_empty() => {
                Error::Api { status: code, message: b.error.message, units: vec![] }
            }
            _ => {
                Error::Api { status: code, message: status.canonical_reason().unwrap_or("").to_string(), units: vec![] }
            }
        }
    }

    /// Decodes a successful answer, or returns the refusal.
    async fn answer<T: serde::de::DeserializeOwned>(what: &str, resp: reqwest::Response) -> Result<T> {
        if !resp.status().is_success() {
            return Err(Self::refusal(resp).await);
        }
        let body = resp.bytes().await.map_err(|source| Error::Http { what: what.to_string(), source })?;
        serde_json::from_slice(&body).map_err(|e| Error::Decode { what: what.to_string(), reason: e.to_string() })
    }

    /// Succeeds on any 2xx, ignoring the body.
    async fn done(resp: reqwest::Response) -> Result<()> {
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(Self::refusal(resp).await)
        }
    }

    /// Every page of a listing, following `nextPageToken`.
    async fn pages<P: Page + serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Vec<P::Item>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let what = format!("GET {path}");
        loop {
            let mut q: Vec<(&str, &str)> = query.to_vec();
            // Large pages: a listing of 10,000 machines is two requests, not a hundred. fleet's
            // own server ignores the parameter and pages as it always did.
            q.push(("pageSize", PAGE_SIZE));
            if let Some(t) = &token {
                q.push(("nextPageToken", t));
            }
            let resp = self.send(&what, |http, base| http.get(format!("{base}/{path}")).query(&q)).await?;
            let page: P = Self::answer(&what, resp).await?;
            let (items, next) = page.into_parts();
            out.extend(items);
            match next {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok(out),
            }
        }
    }

    /// Every unit (`GET /units`, all pages).
    pub async fn units(&self) -> Result<Vec<Unit>> {
        self.pages::<UnitPage>("units", &[]).await
    }

    /// Every machine (`GET /machines`, all pages).
    pub async fn machines(&self) -> Result<Vec<Machine>> {
        self.pages::<MachinePage>("machines", &[]).await
    }

    /// What machines report for `unit`, or for every unit.
    pub async fn states(&self, unit: Option<&str>) -> Result<Vec<UnitState>> {
        match unit {
            Some(u) => self.pages::<UnitStatePage>("state", &[("unitName", u)]).await,
            None => self.pages::<UnitStatePage>("state", &[]).await,
        }
    }

    /// Drains (or with `undo`, undrains) a machine, named by its id or a unique prefix of it;
    /// returns its full id.
    pub async fn drain(&self, machine: &str, undo: bool) -> Result<String> {
        let path = format!("machines/{}/drain", segment(machine));
        let what = format!("drain {machine}");
        let resp = self
            .send(&what, |http, base| {
                let url = format!("{base}/{path}");
                if undo {
                    http.delete(url)
                } else {
                    http.post(url)
                }
            })
            .await?;
        if undo {
            Self::done(resp).await?;
            return Ok(machine.to_string());
        }
        let v: serde_json::Value = Self::answer(&what, resp).await?;
        Ok(v["id"].as_str().unwrap_or(machine).to_string())
    }
}

impl Client {
    /// Makes a join token (admin role; docs/install.md).
    pub async fn create_join_token(&self, req: &JoinTokenRequest) -> Result<JoinTokenCreated> {
        let resp =
            self.send("create join token", |http, base| http.post(format!("{base}/join-tokens")).json(req)).await?;
        Self::answer("create join token", resp).await
    }

    /// Every join token (never their secrets).
    pub async fn join_tokens(&self) -> Result<Vec<JoinTokenInfo>> {
        let resp = self.send("list join tokens", |http, base| http.get(format!("{base}/join-tokens"))).await?;
        let page: fleet_api::JoinTokenPage = Self::answer("list join tokens", resp).await?;
        Ok(page.tokens)
    }

    pub async fn revoke_join_token(&self, id: &str) -> Result<()> {
        let path = format!("join-tokens/{}", segment(id));
        let resp = self.send("revoke join token", |http, base| http.delete(format!("{base}/{path}"))).await?;
        Self::done(resp).await
    }
}

impl Endpoint {
    fn new(endpoint: &str, timeout: Duration, creds: &Credentials) -> Result<Self> {
        let endpoint = endpoint.trim_end_matches('/');
        let mut builder = reqwest::Client::builder().timeout(timeout).connect_timeout(timeout).use_rustls_tls();
        // Unlike the original, the server is always verified: against the CA file if given,
        // else the usual public roots.
        let read = |what: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| Error::Config(format!("cannot read the {what} {}: {e}", p.display())))
        };
        if let Some(ca) = &creds.ca_file {
            let certs = reqwest::Certificate::from_pem_bundle(&read("CA file", ca)?)
                .map_err(|e| Error::Config(format!("CA file {}: {e}", ca.display())))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        match (&creds.cert_file, &creds.key_file) {
            (Some(cert), Some(key)) => {
                let mut pem = read("certificate file", cert)?;
                pem.push(b'\n');
                pem.extend(read("key file", key)?);
                let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    Error::Config(format!("certificate {} and key {}: {e}", cert.display(), key.display()))
                })?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => return Err(Error::Config("--cert-file and --key-file must be given together".into())),
        }
        if let Some(token) = creds.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| Error::Config("the token contains characters not allowed in an HTTP header".into()))?;
            value.set_sensitive(true);
            builder = builder.default_headers([(reqwest::header::AUTHORIZATION, value)].into_iter().collect());
        }
        // unix:///var/run/fleet.sock (or file://), as the original accepted.
        let socket = endpoint.strip_prefix("unix://").or_else(|| endpoint.strip_prefix("file://"));
        let (builder, base) = match socket {
            Some(path) if path.starts_with('/') => (builder.unix_socket(path), "http://domain-sock".to_string()),
            Some(_) => {
                return Err(Error::Config(format!(
                    "unix endpoint {endpoint:?}: the socket path must be absolute (unix:///path)"
                )))
            }
            None if endpoint.starts_with("http://") || endpoint.starts_with("https://") => {
                (builder, endpoint.to_string())
            }
            None => {
                return Err(Error::Config(format!(
                    "unsupported endpoint {endpoint:?}: expected http://host:port or unix:///path"
                )))
            }
        };
        let http = builder.build().map_err(|e| Error::Config(format!("cannot build an HTTP client: {e}")))?;
        Ok(Endpoint { http, base: format!("{base}/fleet/v1"), shown: endpoint.to_string() })
    }
}

/// Percent-encodes a unit name or machine id for one path segment (`@` becomes `%40`, as the
/// original fleetctl sends it).
fn segment(name: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'.').remove(b'-').remove(b'_').remove(b':');
    percent_encoding::utf8_percent_encode(name, SEGMENT).to_string()
}

#[cfg(test)]
mod tests;
