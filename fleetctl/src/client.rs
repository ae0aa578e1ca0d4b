//! A small client for fleet's `/fleet/v1` API.

use anyhow::{anyhow, bail, Context, Result};
pub use fleet_api::{AgentStatus, Found, Machine, Unit, UnitState, Until, WaitEvent};
use fleet_api::{
    Changed, Created, Destroyed, ErrorBody, MachinePage, MoveRequest, Names, Page, UnitChange, UnitChanges, UnitPage,
    UnitStatePage, UnitStatuses, WaitRequest,
};
use reqwest::StatusCode;
use std::time::Duration;

/// Client TLS material, as PEM file paths.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    /// API token, sent as `Authorization: Bearer`.
    pub token: Option<String>,
}

/// Units named in one batch request (the engine's limit).
pub const BATCH: usize = 10_000;
/// How long one `units:wait` request waits at most before the client asks again.
const WAIT_WINDOW: Duration = Duration::from_secs(30);

pub struct Client {
    http: reqwest::Client,
    timeout: Duration,
    base: String,
    /// The endpoint as the user gave it, for error messages.
    shown: String,
}

impl Client {
    pub fn new(endpoint: &str, timeout: Duration, tls: &TlsFiles) -> Result<Self> {
        let endpoint = endpoint.trim_end_matches('/');
        let mut builder = reqwest::Client::builder().timeout(timeout).connect_timeout(timeout).use_rustls_tls();
        // Unlike the original, the server is always verified: against --ca-file if given, else
        // the usual public roots.
        if let Some(ca) = &tls.ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read --ca-file {ca}"))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem).with_context(|| format!("--ca-file {ca}"))? {
                builder = builder.add_root_certificate(cert);
            }
        }
        match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => {
                let mut pem = std::fs::read(cert).with_context(|| format!("cannot read --cert-file {cert}"))?;
                pem.push(b'\n');
                pem.extend(std::fs::read(key).with_context(|| format!("cannot read --key-file {key}"))?);
                builder = builder.identity(reqwest::Identity::from_pem(&pem).context("--cert-file/--key-file")?);
            }
            (None, None) => {}
            _ => bail!("--cert-file and --key-file must be given together"),
        }
        if let Some(token) = tls.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .context("--token contains characters not allowed in an HTTP header")?;
            value.set_sensitive(true);
            builder = builder.default_headers([(reqwest::header::AUTHORIZATION, value)].into_iter().collect());
        }
        // unix:///var/run/fleet.sock (or file://), as the original accepted.
        let socket = endpoint.strip_prefix("unix://").or_else(|| endpoint.strip_prefix("file://"));
        let (builder, base) = match socket {
            Some(path) if path.starts_with('/') => (builder.unix_socket(path), "http://domain-sock".to_string()),
            Some(_) => bail!("unix endpoint {endpoint:?}: the socket path must be absolute (unix:///path)"),
            None if endpoint.starts_with("http://") || endpoint.starts_with("https://") => {
                (builder, endpoint.to_string())
            }
            None => bail!("unsupported endpoint {endpoint:?}: expected http://host:port or unix:///path"),
        };
        let http = builder.build().context("cannot build HTTP client")?;
        Ok(Client { http, timeout, base: format!("{base}/fleet/v1"), shown: endpoint.to_string() })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path)
    }

    async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> Result<reqwest::Response> {
        // Idempotent or not, a request that never reached the server can be sent again.
        let mut last = None;
        for attempt in 0..3 {
            let Some(r) = req.try_clone() else { break };
            match r.send().await {
                // The engine could not reach etcd this time (a member may have just died): the
                // request changed nothing, so it can be sent again.
                Ok(resp) if resp.status() == StatusCode::SERVICE_UNAVAILABLE && attempt < 2 => {
                    tokio::time::sleep(Duration::from_millis(300 << attempt)).await;
                }
                Ok(resp) => return Ok(resp),
                Err(e) if e.is_connect() => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                Err(e) => return Err(anyhow!("{what}: {e}")),
            }
        }
        Err(anyhow!(
            "{what}: cannot reach the fleet API at {}: {}",
            self.shown,
            last.map(|e| e.to_string()).unwrap_or_default()
        ))
    }

    async fn error(resp: reqwest::Response) -> anyhow::Error {
        let status = resp.status();
        let msg = resp.json::<ErrorBody>().await.map(|b| b.error.message).unwrap_or_default();
        anyhow!(
            "API error {}: {}",
            status.as_u16(),
            if msg.is_empty() { status.canonical_reason().unwrap_or("") } else { &msg }
        )
    }

    /// Every page of a listing, following `nextPageToken`.
    async fn pages<P: Page>(&self, path: &str, query: &[(&str, &str)]) -> Result<Vec<P::Item>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q: Vec<(&str, &str)> = query.to_vec();
            if let Some(t) = &token {
                q.push(("nextPageToken", t));
            }
            let resp = self.send(self.http.get(self.url(path)).query(&q), &format!("GET {path}")).await?;
            if !resp.status().is_success() {
                return Err(Self::error(resp).await);
            }
            let page: P = resp.json().await.with_context(|| format!("GET {path}: unreadable response"))?;
            let (items, next) = page.into_parts();
            out.extend(items);
            match next {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok(out),
            }
        }
    }

    pub async fn units(&self) -> Result<Vec<Unit>> {
        self.pages::<UnitPage>("units", &[]).await
    }

    pub async fn machines(&self) -> Result<Vec<Machine>> {
        self.pages::<MachinePage>("machines", &[]).await
    }

    pub async fn states(&self, unit: Option<&str>) -> Result<Vec<UnitState>> {
        match unit {
            Some(u) => self.pages::<UnitStatePage>("state", &[("unitName", u)]).await,
            None => self.pages::<UnitStatePage>("state", &[]).await,
        }
    }

    pub async fn unit(&self, name: &str) -> Result<Option<Unit>> {
        let resp =
            self.send(self.http.get(self.url(&format!("units/{}", encode(name)))), &format!("GET unit {name}")).await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                Ok(Some(resp.json().await.with_context(|| format!("unit {name}: unreadable response"))?))
            }
            _ => Err(Self::error(resp).await),
        }
    }

    /// Asks the engine to move a unit (to `machine`, a full id or unique prefix, if given).
    pub async fn request_move(&self, name: &str, machine: Option<&str>) -> Result<()> {
        let body = MoveRequest { machine_id: machine.unwrap_or("").to_string() };
        let url = self.url(&format!("units/{}/move", encode(name)));
        let resp = self.send(self.http.post(url).json(&body), &format!("move unit {name}")).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(Self::error(resp).await)
        }
    }

    /// Drains (or with `undo`, undrains) a machine; returns its full id.
    pub async fn drain(&self, machine: &str, undo: bool) -> Result<String> {
        let url = self.url(&format!("machines/{}/drain", encode(machine)));
        let req = if undo { self.http.delete(url) } else { self.http.post(url) };
        let resp = self.send(req, &format!("drain {machine}")).await?;
        if !resp.status().is_success() {
            return Err(Self::error(resp).await);
        }
        if undo {
            return Ok(machine.to_string());
        }
        let v: serde_json::Value = resp.json().await.context("drain: unreadable response")?;
        Ok(v["id"].as_str().unwrap_or(machine).to_string())
    }

    pub async fn forget_move(&self, name: &str) -> Result<()> {
        let url = self.url(&format!("units/{}/move", encode(name)));
        let resp = self.send(self.http.delete(url), &format!("forget move of {name}")).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(Self::error(resp).await)
        }
    }

    /// `systemctl status` of a unit from the agents of its machines.
    pub async fn unit_status(&self, name: &str) -> Result<Vec<AgentStatus>> {
        let url = self.url(&format!("units/{}/status", encode(name)));
        let resp = self.send(self.http.get(url), &format!("status of {name}")).await?;
        if !resp.status().is_success() {
            return Err(Self::error(resp).await);
        }
        Ok(resp
            .json::<UnitStatuses>()
            .await
            .with_context(|| format!("status of {name}: unreadable response"))?
            .statuses)
    }

    /// Copies a unit's journal to `out` as it arrives (forever with `follow`).
    pub async fn journal(
        &self,
        name: &str,
        lines: u32,
        follow: bool,
        output: &str,
        machine: Option<&str>,
        out: &mut impl std::io::Write,
    ) -> Result<()> {
        let url = self.url(&format!("units/{}/journal", encode(name)));
        let mut q = vec![("lines", lines.to_string()), ("follow", follow.to_string()), ("output", output.to_string())];
        if let Some(m) = machine {
            q.push(("machineID", m.to_string()));
        }
        let mut req = self.http.get(url).query(&q);
        if follow {
            // Following has no end; only the connection set-up is bounded.
            req = req.timeout(Duration::from_secs(365 * 24 * 3600));
        }
        let mut resp = self.send(req, &format!("journal of {name}")).await?;
        if !resp.status().is_success() {
            return Err(Self::error(resp).await);
        }
        while let Some(chunk) = resp.chunk().await.with_context(|| format!("journal of {name}"))? {
            out.write_all(&chunk)?;
            out.flush()?;
        }
        Ok(())
    }

    /// POSTs `body` to a batch method (`units:batchGet`, ...) and decodes its answer.
    async fn batch<T: serde::de::DeserializeOwned>(&self, method: &str, body: &impl serde::Serialize) -> Result<T> {
        let resp = self.send(self.http.post(self.url(method)).json(body), &format!("POST {method}")).await?;
        if !resp.status().is_success() {
            return Err(Self::batch_error(resp).await);
        }
        resp.json().await.with_context(|| format!("POST {method}: unreadable response"))
    }

    /// A batch refusal, with each refused unit on a line of its own.
    async fn batch_error(resp: reqwest::Response) -> anyhow::Error {
        let status = resp.status();
        match resp.json::<ErrorBody>().await {
            Ok(b) if !b.units.is_empty() => {
                let lines: Vec<String> = b.units.iter().map(|u| format!("  {}: {}", u.name, u.error)).collect();
                let what = b.error.message.split(':').next().unwrap_or("refused").to_string();
                anyhow!("API error {}: {what}:\n{}", status.as_u16(), lines.join("\n"))
            }
            Ok(b) => anyhow!("API error {}: {}", status.as_u16(), b.error.message),
            Err(_) => anyhow!("API error {}: {}", status.as_u16(), status.canonical_reason().unwrap_or("")),
        }
    }

    /// The named units, what their machines report, and which do not exist: one request per
    /// [`BATCH`] names.
    pub async fn batch_get(&self, names: &[String]) -> Result<Found> {
        let mut all = Found::default();
        if names.is_empty() {
            return Ok(all);
        }
        for chunk in names.chunks(BATCH) {
            let f: Found = self.batch("units:batchGet", &Names { names: chunk.to_vec() }).await?;
            all.units.extend(f.units);
            all.states.extend(f.states);
            all.missing.extend(f.missing);
        }
        Ok(all)
    }

    /// Creates new units (refused if one exists with other contents); returns the etcd
    /// revision of the last write (0 if there was nothing to create).
    pub async fn create(&self, units: &[Unit]) -> Result<i64> {
        let mut revision = 0;
        for chunk in units.chunks(BATCH) {
            let c: Created = self.batch("units", &fleet_api::CreateUnits { units: chunk.to_vec() }).await?;
            revision = revision.max(c.revision);
        }
        Ok(revision)
    }

    /// Sets the desired state (and, where given, new options) of existing units; returns the
    /// etcd revision of the last write (0 if nothing changed).
    pub async fn update(&self, changes: &[Unit]) -> Result<i64> {
        if changes.is_empty() {
            return Ok(0);
        }
        let mut revision = 0;
        for chunk in changes.chunks(BATCH) {
            let units = chunk
                .iter()
                .map(|u| UnitChange {
                    name: u.name.clone(),
                    desired_state: u.desired_state.clone(),
                    options: u.options.clone(),
                })
                .collect();
            let c: Changed = self.batch("units:batchUpdate", &UnitChanges { units }).await?;
            revision = revision.max(c.revision);
        }
        Ok(revision)
    }

    /// Destroys units; returns those that existed and the revision of the last write.
    pub async fn destroy_many(&self, names: &[String]) -> Result<(Vec<String>, i64)> {
        if names.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let (mut gone, mut revision) = (Vec::new(), 0);
        for chunk in names.chunks(BATCH) {
            let d: Destroyed = self.batch("units:batchDelete", &Names { names: chunk.to_vec() }).await?;
            gone.extend(d.destroyed);
            revision = revision.max(d.revision);
        }
        Ok((gone, revision))
    }

    /// Waits (one streaming request per [`WAIT_WINDOW`], whatever the number of units) until
    /// each unit gets to `until`, handing every event to `seen`; stops early when `seen` says
    /// so. Returns the units still pending when `deadline` passed.
    pub async fn wait(
        &self,
        names: &[String],
        until: Until,
        revision: i64,
        deadline: Option<std::time::Instant>,
        mut seen: impl FnMut(&WaitEvent) -> std::ops::ControlFlow<()>,
    ) -> Result<Vec<String>> {
        let mut pending: Vec<String> = names.to_vec();
        while !pending.is_empty() {
            let window = match deadline {
                Some(d) => d.saturating_duration_since(std::time::Instant::now()).min(WAIT_WINDOW),
                None => WAIT_WINDOW,
            };
            let mut left = std::collections::HashSet::new();
            for chunk in pending.chunks(BATCH) {
                left.extend(self.wait_once(chunk, until, revision, window, &mut seen).await?);
            }
            pending.retain(|n| left.contains(n));
            if left.is_empty() || deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                break;
            }
        }
        Ok(pending)
    }

    /// One `units:wait` request; returns the names not yet done with (all of them if `seen`
    /// stopped the wait).
    async fn wait_once(
        &self,
        names: &[String],
        until: Until,
        revision: i64,
        window: Duration,
        seen: &mut impl FnMut(&WaitEvent) -> std::ops::ControlFlow<()>,
    ) -> Result<std::collections::HashSet<String>> {
        let body = WaitRequest { names: names.to_vec(), until, revision, timeout_ms: Some(window.as_millis() as u64) };
        // The answer takes up to the window; the usual request timeout bounds the rest, and the
        // server's heartbeats show it is alive meanwhile.
        let req = self.http.post(self.url("units:wait")).json(&body).timeout(window + self.timeout);
        let mut resp = self.send(req, "POST units:wait").await?;
        if !resp.status().is_success() {
            return Err(Self::batch_error(resp).await);
        }
        let mut left: std::collections::HashSet<String> = names.iter().cloned().collect();
        let mut buf = Vec::new();
        while let Some(chunk) = resp.chunk().await.context("waiting for units")? {
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let event: WaitEvent = serde_json::from_slice(&line).context("waiting for units: unreadable event")?;
                if event.done {
                    return Ok(left);
                }
                if event.name.is_empty() {
                    continue;
                }
                left.remove(&event.name);
                if seen(&event).is_break() {
                    return Ok(names.iter().cloned().collect());
                }
            }
        }
        bail!("waiting for units: the engine ended the answer early")
    }
}

/// Percent-encodes a unit name for a path segment (`@` becomes `%40`, as fleetctl sends it).
fn encode(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
