//! `fleetctl join-token`: tokens that let a new machine join (docs/install.md).

use crate::cli::JoinTokenAction;
use crate::*;

impl Ctl {
    /// `endpoint` is what this fleetctl talks to: a joining machine is told the same.
    pub(crate) async fn join_token(&self, action: JoinTokenAction, endpoint: &str) -> Result<ExitCode> {
        match action {
            JoinTokenAction::Create { ttl, uses, metadata, description, machine_ids } => {
                let req = fleet_client::JoinTokenRequest {
                    ttl_secs: Some(ttl.as_secs().max(1)),
                    uses: Some(uses),
                    metadata: metadata.unwrap_or_default(),
                    description,
                    machines: machine_ids,
                };
                let made = self.api.create_join_token(&req).await.context("cannot create a join token")?;
                if self.json {
                    println!("{}", serde_json::to_string_pretty(&made)?);
                    return Ok(ExitCode::SUCCESS);
                }
                println!("{}", made.token);
                // The machine needs an https:// address of an engine; a unix socket or plain
                // loopback address this fleetctl uses is no use to it.
                let https: Vec<&str> =
                    endpoint.split(',').map(str::trim).filter(|e| e.starts_with("https://")).collect();
                let endpoint = if https.is_empty() { "https://ENGINE:PORT".to_string() } else { https.join(",") };
                eprintln!(
                    "Join token {} admits {} machine(s) until {}. On a new machine (with the fleet-agent package):\n\n  fleet-agent join --engine {} --token {} --ca-hash {}\n",
                    made.info.id, made.info.uses_left, made.info.expires, endpoint, made.token, made.ca_hash
                );
            }
            JoinTokenAction::List => {
                let tokens = self.api.join_tokens().await?;
                if self.json {
                    println!("{}", serde_json::to_string_pretty(&tokens)?);
                    return Ok(ExitCode::SUCCESS);
                }
                let header: Vec<String> =
                    ["ID", "EXPIRES", "USES LEFT", "JOINED", "METADATA", "DESCRIPTION"].map(String::from).to_vec();
                let mut rows = Vec::new();
                for t in tokens {
                    let expires = if t.expired { format!("{} (expired)", t.expires) } else { t.expires };
                    let metadata: Vec<String> = t.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    rows.push(vec![
                        t.id,
                        expires,
                        t.uses_left.to_string(),
                        t.joined.len().to_string(),
                        if metadata.is_empty() { "-".into() } else { metadata.join(",") },
                        if t.description.is_empty() { "-".into() } else { t.description },
                    ]);
                }
                print!("{}", crate::table::render(Some(&header), &rows));
            }
            JoinTokenAction::Revoke { id } => {
                self.api.revoke_join_token(&id).await.with_context(|| format!("cannot revoke join token {id}"))?;
                println!("Join token {id} revoked");
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
