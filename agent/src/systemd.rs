//! The local systemd, driven over D-Bus.
//!
//! Only what fleet needs: link unit files at runtime, one `Reload` per batch, start/stop, and
//! signal-driven state. Calls are bounded below the bus's limit of 128 pending calls per
//! connection and each carries a timeout.

use futures::StreamExt;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use zbus::zvariant::OwnedObjectPath;

/// Far below the system bus's 128 pending calls per connection.
pub const MAX_IN_FLIGHT: usize = 64;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("cannot connect to the systemd bus {address}: {source}")]
    Connect { address: String, source: zbus::Error },
    #[error("systemd {call} failed: {source}")]
    Call { call: String, source: zbus::Error },
    #[error("systemd {call} timed out after {CALL_TIMEOUT:?}")]
    Timeout { call: String },
    /// From the in-memory driver of the benchmarks.
    #[error("simulated systemd: {0}")]
    Simulated(String),
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub trait Manager {
    fn subscribe(&self) -> zbus::Result<()>;
    fn reload(&self) -> zbus::Result<()>;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    fn link_unit_files(
        &self,
        files: &[&str],
        runtime: bool,
        force: bool,
    ) -> zbus::Result<Vec<(String, String, String)>>;
    fn enable_unit_files(
        &self,
        files: &[&str],
        runtime: bool,
        force: bool,
    ) -> zbus::Result<(bool, Vec<(String, String, String)>)>;
    fn disable_unit_files(&self, files: &[&str], runtime: bool) -> zbus::Result<Vec<(String, String, String)>>;
    #[allow(clippy::type_complexity)]
    fn list_units_by_names(
        &self,
        names: &[&str],
    ) -> zbus::Result<
        Vec<(String, String, String, String, String, String, OwnedObjectPath, u32, String, OwnedObjectPath)>,
    >;
    #[zbus(property)]
    fn system_state(&self) -> zbus::Result<String>;
}

/// systemd's three state words for one unit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedUnit {
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
}

impl ObservedUnit {
    /// Running or on its way: starting it again would be a no-op.
    pub fn is_up(&self) -> bool {
        matches!(self.active_state.as_str(), "active" | "activating" | "reloading")
    }
}

#[derive(Clone)]
pub struct Systemd {
    conn: zbus::Connection,
    manager: ManagerProxy<'static>,
}

async fn timed<T>(call: &str, fut: impl std::future::Future<Output = zbus::Result<T>>) -> Result<T, SystemdError> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(SystemdError::Call { call: call.to_string(), source }),
        Err(_) => Err(SystemdError::Timeout { call: call.to_string() }),
    }
}

impl Systemd {
    /// Connects to the system bus, or to `address` (a D-Bus address such as
    /// `unix:path=/run/dbus/system_bus_socket`) when given.
    pub async fn connect(address: Option<&str>) -> Result<Self, SystemdError> {
        let shown = address.unwrap_or("(system bus)").to_string();
        let connect = async {
            let conn = match address {
                Some(a) => zbus::connection::Builder::address(a)?.build().await?,
                None => zbus::Connection::system().await?,
            };
            let manager = ManagerProxy::new(&conn).await?;
            Ok::<_, zbus::Error>((conn, manager))
        };
        let (conn, manager) = match tokio::time::timeout(CALL_TIMEOUT, connect).await {
            Ok(Ok(v)) => v,
            Ok(Err(source)) => return Err(SystemdError::Connect { address: shown, source }),
            Err(_) => return Err(SystemdError::Timeout { call: format!("connect to {shown}") }),
        };
        Ok(Systemd { conn, manager })
    }

    pub async fn system_state(&self) -> Result<String, SystemdError> {
        timed("SystemState", self.manager.system_state()).await
    }

    pub async fn reload(&self) -> Result<(), SystemdError> {
        timed("Reload", self.manager.reload()).await
    }

    pub async fn link(&self, paths: &[String]) -> Result<(), SystemdError> {
        if paths.is_empty() {
            return Ok(());
        }
        let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        timed("LinkUnitFiles", self.manager.link_unit_files(&refs, true, true)).await.map(|_| ())
    }

    /// Enables (at runtime) units that have an `[Install]` section, as the original fleet did, so
    /// their `WantedBy=` dependencies take effect.
    pub async fn enable(&self, paths: &[String]) -> Result<(), SystemdError> {
        if paths.is_empty() {
            return Ok(());
        }
        let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        timed("EnableUnitFiles", self.manager.enable_unit_files(&refs, true, true)).await.map(|_| ())
    }

    pub async fn disable(&self, names: &[String]) -> Result<(), SystemdError> {
        if names.is_empty() {
            return Ok(());
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        timed("DisableUnitFiles", self.manager.disable_unit_files(&refs, true)).await.map(|_| ())
    }

    pub async fn start(&self, name: &str) -> Result<(), SystemdError> {
        timed(&format!("StartUnit {name}"), self.manager.start_unit(name, "replace")).await.map(|_| ())
    }

    pub async fn stop(&self, name: &str) -> Result<(), SystemdError> {
        match timed(&format!("StopUnit {name}"), self.manager.stop_unit(name, "replace")).await {
            // Stopping a unit systemd no longer knows is already done.
            Err(SystemdError::Call { source: zbus::Error::MethodError(n, _, _), .. })
                if n.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
            {
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    pub async fn reset_failed(&self, name: &str) -> Result<(), SystemdError> {
        timed(&format!("ResetFailedUnit {name}"), self.manager.reset_failed_unit(name)).await
    }

    /// Current states of `names`, in batches.
    pub async fn observe(&self, names: &[String]) -> Result<HashMap<String, ObservedUnit>, SystemdError> {
        let mut out = HashMap::new();
        for chunk in names.chunks(500) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            for u in timed("ListUnitsByNames", self.manager.list_units_by_names(&refs)).await? {
                out.insert(u.0, ObservedUnit { load_state: u.2, active_state: u.3, sub_state: u.4 });
            }
        }
        Ok(out)
    }

    /// Subscribes to systemd's signals and sends the object path of every unit whose properties
    /// change, and the name of every unit whose job finishes. Ends when `tx` closes or the bus
    /// connection is lost (the sender then drops, which the caller sees as a closed channel).
    pub async fn watch_changes(&self, tx: mpsc::UnboundedSender<UnitChange>) -> Result<(), SystemdError> {
        timed("Subscribe", self.manager.subscribe()).await?;
        let props = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .interface("org.freedesktop.DBus.Properties")
            .and_then(|b| b.member("PropertiesChanged"))
            .and_then(|b| b.path_namespace("/org/freedesktop/systemd1/unit"))
            // Only the Unit interface carries the states the agent reports; systemd sends as
            // many again for the Service interface (MainPID, ...), each one bus traffic.
            .and_then(|b| b.arg(0, "org.freedesktop.systemd1.Unit"))
            .map_err(|source| SystemdError::Call { call: "match rule".into(), source })?
            .build();
        let jobs = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .interface("org.freedesktop.systemd1.Manager")
            .and_then(|b| b.member("JobRemoved"))
            .map_err(|source| SystemdError::Call { call: "match rule".into(), source })?
            .build();
        let mut props = timed("AddMatch", zbus::MessageStream::for_match_rule(props, &self.conn, Some(1024))).await?;
        let mut jobs = timed("AddMatch", zbus::MessageStream::for_match_rule(jobs, &self.conn, Some(1024))).await?;
        tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    m = props.next() => match m {
                        Some(Ok(msg)) => msg.header().path().map(|p| UnitChange::Path(p.to_string())),
                        _ => break,
                    },
                    m = jobs.next() => match m {
                        Some(Ok(msg)) => msg
                            .body()
                            .deserialize::<(u32, OwnedObjectPath, String, String)>()
                            .ok()
                            .map(|(_, _, unit, _)| UnitChange::Name(unit)),
                        _ => break,
                    },
                };
                if let Some(c) = change {
                    if tx.send(c).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(())
    }
}

/// A hint that a unit's state may have changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitChange {
    Path(String),
    Name(String),
}

/// systemd's object path for a unit: every byte that is not `[A-Za-z0-9]` (and a leading digit)
/// becomes `_xx`.
pub fn unit_path(name: &str) -> String {
    let mut out = String::from("/org/freedesktop/systemd1/unit/");
    if name.is_empty() {
        out.push('_');
        return out;
    }
    for (i, b) in name.bytes().enumerate() {
        if b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()) {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

impl crate::driver::UnitDriver for Systemd {
    async fn reload(&self) -> Result<(), SystemdError> {
        Systemd::reload(self).await
    }
    async fn link(&self, paths: &[String]) -> Result<(), SystemdError> {
        Systemd::link(self, paths).await
    }
    async fn enable(&self, paths: &[String]) -> Result<(), SystemdError> {
        Systemd::enable(self, paths).await
    }
    async fn disable(&self, names: &[String]) -> Result<(), SystemdError> {
        Systemd::disable(self, names).await
    }
    async fn start(&self, name: &str) -> Result<(), SystemdError> {
        Systemd::start(self, name).await
    }
    async fn stop(&self, name: &str) -> Result<(), SystemdError> {
        Systemd::stop(self, name).await
    }
    async fn reset_failed(&self, name: &str) -> Result<(), SystemdError> {
        Systemd::reset_failed(self, name).await
    }
    async fn observe(&self, names: &[String]) -> Result<HashMap<String, ObservedUnit>, SystemdError> {
        Systemd::observe(self, names).await
    }
    async fn watch_changes(&self, tx: mpsc::UnboundedSender<UnitChange>) -> Result<(), SystemdError> {
        Systemd::watch_changes(self, tx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_paths_escape_like_systemd() {
        assert_eq!(unit_path("hello.service"), "/org/freedesktop/systemd1/unit/hello_2eservice");
        assert_eq!(unit_path("web@1.service"), "/org/freedesktop/systemd1/unit/web_401_2eservice");
        assert_eq!(unit_path("1a-b.service"), "/org/freedesktop/systemd1/unit/_31a_2db_2eservice");
    }
}
