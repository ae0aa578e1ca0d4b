//! What only a unit's machine knows (`systemctl status`, its journal), fetched from the agents'
//! own API over TLS with the engine's identity.

use super::*;

#[derive(Debug, Deserialize)]
pub(crate) struct ProxyQuery {
    #[serde(rename = "machineID")]
    machine_id: Option<String>,
    lines: Option<u32>,
    follow: Option<bool>,
    output: Option<String>,
}

/// The agents (machine id, agent URL) that report `unit`, limited to `machine` if given.
pub(crate) fn agents_of(api: &Api, unit: &UnitName, machine: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    api.cluster.read(|v| {
        if !v.units.contains_key(unit) {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "unit does not exist"));
        }
        let placed: Vec<&str> =
            v.schedule.get(unit).map(|e| e.keys().map(|m| m.as_str()).collect()).unwrap_or_default();
        let chosen: Vec<&str> = placed.into_iter().filter(|m| machine.is_none_or(|want| m.starts_with(want))).collect();
        if chosen.is_empty() {
            return Err(ApiError::new(StatusCode::CONFLICT, format!("{unit} does not appear to be loaded")));
        }
        Ok(chosen
            .into_iter()
            .map(|m| (m.to_string(), v.machines.get(m).map(|r| r.agent_url.clone()).unwrap_or_default()))
            .collect())
    })
}

/// The client the engine reaches agents with: with the cluster's TLS files it trusts only the
/// cluster CA and presents the engine's certificate, which agents require.
pub fn agent_client(tls: Option<&fleet_store::tls::ClientTls>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(3)).use_rustls_tls();
    if let Some(tls) = tls {
        let (ca, identity) = tls.pems()?;
        builder = builder
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
            .identity(reqwest::Identity::from_pem(&identity)?);
    }
    Ok(builder.build()?)
}

/// Not in the original API: `systemctl status` of a unit on its machine(s), fetched from the
/// agents: `{"statuses":[{"machineID","exitCode","output"}]}`.
pub(crate) async fn unit_status(
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(q): Query<ProxyQuery>,
) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let name = parse_name(&name)?;
    let client = api.agents.clone();
    let mut statuses = Vec::new();
    for (machine, url) in agents_of(&api, &name, q.machine_id.as_deref())? {
        if url.is_empty() {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("the agent of machine {machine} serves no status"),
            ));
        }
        let resp = client
            .get(format!("{url}/units/{}/status", percent(name.as_str())))
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("agent of machine {machine}: {e}")))?;
        let mut status: wire::AgentStatus = resp
            .json()
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("agent of machine {machine}: {e}")))?;
        status.machine_id = machine;
        statuses.push(status);
    }
    Ok(Json(wire::UnitStatuses { statuses }).into_response())
}

/// Not in the original API: a unit's journal from its machine's agent, streamed as text; with
/// `follow=true` it stays open. A global unit needs `machineID`.
pub(crate) async fn unit_journal(
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(q): Query<ProxyQuery>,
) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let name = parse_name(&name)?;
    let agents = agents_of(&api, &name, q.machine_id.as_deref())?;
    let [(machine, url)] = agents.as_slice() else {
        return Err(ApiError::bad_request(format!(
            "Unable to retrieve journal of global unit {name}: name a machine with machineID"
        )));
    };
    if url.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("the agent of machine {machine} serves no journal"),
        ));
    }
    let mut req = api.agents.get(format!("{url}/units/{}/journal", percent(name.as_str()))).query(&[
        ("lines", q.lines.unwrap_or(10).to_string()),
        ("follow", q.follow.unwrap_or(false).to_string()),
        ("output", q.output.clone().unwrap_or_else(|| "short".into())),
    ]);
    if !q.follow.unwrap_or(false) {
        req = req.timeout(Duration::from_secs(30));
    }
    let resp = req
        .send()
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("agent of machine {machine}: {e}")))?;
    if !resp.status().is_success() {
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let text = resp.text().await.unwrap_or_default();
        return Err(ApiError::new(status, format!("agent of machine {machine}: {text}")));
    }
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(axum::body::Body::from_stream(resp.bytes_stream()))
        .unwrap_or_else(|e| ApiError::internal(e.to_string()).into_response()))
}

pub(crate) fn percent(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
