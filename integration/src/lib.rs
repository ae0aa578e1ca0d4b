//! The lab: a real fleet cluster on one host.
//!
//! etcd and the engines run as host processes; every machine is a systemd-nspawn container
//! booting real systemd, with its own network namespace and address on a private bridge, running
//! `fleet-agent` as a systemd service. Everything the lab creates is named `fl*` and lives on
//! 10.231.90.0/24 with etcd on port 12379, so it never collides with anything else on the host.
//! Like a default install, the lab is TLS-only with auth on: [`pki`] makes a cluster CA and
//! every identity at `up`, etcd requires client certificates and confines each machine to its
//! own keys, and the engines serve the API over TLS only (plus a unix socket).
//! Processes are tracked and stopped by PID; leftovers of an earlier run (namespaces, links, the
//! bridge, stale sockets) are removed before a new one starts.
//!
//! Besides the lab: [`faults`] (what `./lab kill|start|cut|heal` do), [`sim`] (`fleet-sim`:
//! thousands of simulated machines running the real agent code in one process) and [`bench`]
//! (`./lab bench`, which writes docs/performance.md). Nothing depends on this crate; it may
//! depend on everything, and runs the daemons as the programs users run.

pub mod bench;
pub mod browser;
pub mod cgroup;
pub mod debian;
pub mod faults;
pub mod image;
pub mod net;
pub mod phases;
pub mod pki;
pub mod process;
pub mod provision;
pub mod runbook;
pub mod sim;
pub mod testkit;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const BRIDGE: &str = "fl-br0";
pub const HOST_IP: &str = "10.231.90.1";
pub const PREFIX_LEN: u8 = 24;
pub const ETCD_CLIENT_PORT: u16 = 12379;
pub const ETCD_PEER_PORT: u16 = 12380;
pub const ENGINE_PORT: u16 = 12480;
pub const ETCD_PREFIX: &str = "/fleet/";
pub const LEASE_TTL_SECS: i64 = 5;

/// Where the lab keeps its state; `FLEET_LAB_DIR` overrides.
pub fn lab_dir() -> PathBuf {
    std::env::var_os("FLEET_LAB_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/run/fleet-lab"))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EtcdProc {
    pub name: String,
    pub pid: u32,
    pub client_url: String,
    /// The member's ports and the cluster it belongs to, to restart it in place.
    #[serde(default)]
    pub client_port: u16,
    #[serde(default)]
    pub peer_port: u16,
    #[serde(default)]
    pub cluster: String,
    #[serde(default)]
    pub on_bridge: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineProc {
    pub name: String,
    pub pid: u32,
    pub api_url: String,
    /// Its command line, to start it again.
    #[serde(default)]
    pub args: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineProc {
    pub name: String,
    pub pid: u32,
    pub ip: String,
    pub machine_id: String,
    pub dir: PathBuf,
    /// How it was booted, to boot it again.
    #[serde(default)]
    pub spec: Option<MachineSpec>,
}

impl MachineProc {
    /// D-Bus address of the machine's system bus, reachable from the host.
    pub fn bus_address(&self) -> String {
        format!("unix:path={}", self.dir.join("bus/system_bus_socket").display())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LabState {
    pub etcd: Vec<EtcdProc>,
    pub engines: Vec<EngineProc>,
    pub machines: Vec<MachineProc>,
    /// Directory holding the binaries the lab runs (a copy, so rebuilding does not disturb it).
    pub bin_dir: PathBuf,
    /// Engines running inside provisioned machines (`./lab up --provision`), by API URL.
    #[serde(default)]
    pub machine_engines: Vec<String>,
    /// Helper processes of the lab (the HTTPS server of provisioning configs and releases).
    #[serde(default)]
    pub helpers: Vec<u32>,
}

impl LabState {
    pub fn path() -> PathBuf {
        lab_dir().join("state.json")
    }

    pub fn load() -> Result<Option<LabState>> {
        let p = Self::path();
        match std::fs::read(&p) {
            Ok(b) => {
                Ok(Some(serde_json::from_slice(&b).with_context(|| format!("corrupt lab state {}", p.display()))?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    pub fn save(&self) -> Result<()> {
        let p = Self::path();
        std::fs::create_dir_all(lab_dir())?;
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &p).with_context(|| format!("cannot write {}", p.display()))
    }

    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.etcd.iter().map(|e| e.client_url.clone()).collect()
    }

    pub fn api_url(&self) -> Option<&str> {
        self.engines.first().map(|e| e.api_url.as_str()).or(self.machine_engines.first().map(String::as_str))
    }

    /// Every engine's API: the lab's own, then those running inside provisioned machines.
    pub fn api_urls(&self) -> Vec<String> {
        self.engines.iter().map(|e| e.api_url.clone()).chain(self.machine_engines.iter().cloned()).collect()
    }

    /// The flags that give an engine the lab's etcd, TLS and auth settings.
    pub fn engine_base_args(&self) -> Vec<String> {
        vec![
            "--config".into(),
            pki::engine_config().display().to_string(),
            "--etcd-endpoints".into(),
            self.etcd_endpoints().join(","),
        ]
    }

    pub fn machine(&self, name: &str) -> Option<&MachineProc> {
        self.machines.iter().find(|m| m.name == name)
    }
}

/// How a machine is booted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineSpec {
    /// etcd client URLs as the machine reaches them (bridge addresses).
    #[serde(default)]
    pub etcd_endpoints: Vec<String>,
    pub name: String,
    pub ip: String,
    pub machine_id: String,
    pub metadata: Vec<(String, String)>,
    pub etcd_prefix: String,
    pub lease_ttl_secs: i64,
    /// Advertised capacity: memory and CPU as the agent's config spells them.
    pub capacity: (String, String),
    /// Boot the host image instead of this host's /usr.
    #[serde(default)]
    pub image: Option<image::ImageSpec>,
    /// Boot without an identity or configuration (a writable, empty /etc/fleet) and without
    /// starting its agent: a machine that joins by token (`fleet-agent join`).
    #[serde(default)]
    pub joining: bool,
    /// An image machine booted from nothing but the image and its provisioning config (which
    /// the lab put in its directory: `boot-args`, `config-drive/`): no identity, no settings.
    #[serde(default)]
    pub provisioned: bool,
}

impl MachineSpec {
    /// Lab machine number `n` (1-based): `fl-m<n>` at 10.231.90.(10+n).
    pub fn numbered(n: u8) -> Self {
        let name = format!("fl-m{n}");
        MachineSpec {
            machine_id: machine_id_for(&name, 0),
            ip: format!("10.231.90.{}", 10 + n as u32),
            metadata: vec![("hostname".into(), name.clone())],
            name,
            etcd_prefix: ETCD_PREFIX.into(),
            lease_ttl_secs: LEASE_TTL_SECS,
            capacity: ("2G".into(), "200%".into()),
            etcd_endpoints: vec![etcd_bridge_url()],
            image: None,
            joining: false,
            provisioned: false,
        }
    }
}

/// A stable, valid machine id derived from a name and a generation (a rebooted-as-new machine
/// gets a new generation).
pub fn machine_id_for(name: &str, generation: u32) -> String {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in name.bytes().chain(generation.to_le_bytes()) {
        h ^= b as u128;
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    format!("{h:032x}")
}

fn uuid_of(machine_id: &str) -> String {
    let m = machine_id;
    format!("{}-{}-{}-{}-{}", &m[0..8], &m[8..12], &m[12..16], &m[16..20], &m[20..32])
}

/// The host's etcd client URL that machines use.
pub fn etcd_bridge_url() -> String {
    format!("https://{HOST_IP}:{ETCD_CLIENT_PORT}")
}

/// Starts the lab's single-member etcd, listening on loopback and the bridge.
pub fn start_etcd(name: &str) -> Result<EtcdProc> {
    start_etcd_on(name, ETCD_CLIENT_PORT, ETCD_PEER_PORT, true)
}

/// Starts a single-member etcd on the given ports (loopback only unless `on_bridge`), with a
/// fresh data directory under the lab directory.
pub fn start_etcd_on(name: &str, client_port: u16, peer_port: u16, on_bridge: bool) -> Result<EtcdProc> {
    let cluster = format!("{name}=https://127.0.0.1:{peer_port}");
    let member = EtcdProc {
        name: name.into(),
        pid: 0,
        client_url: format!("https://127.0.0.1:{client_port}"),
        client_port,
        peer_port,
        cluster,
        on_bridge,
    };
    start_etcd_member(member, true)
}

/// Starts an etcd cluster of `n` members (`etcd1`..): member i listens for clients on
/// 12379 + 10·(i-1) (loopback and bridge) and for peers on the next port.
pub fn start_etcd_cluster(n: u8) -> Result<Vec<EtcdProc>> {
    let ports: Vec<(String, u16)> =
        (1..=n).map(|i| (format!("etcd{i}"), ETCD_CLIENT_PORT + 10 * (i as u16 - 1))).collect();
    let cluster: Vec<String> = ports.iter().map(|(name, p)| format!("{name}=https://127.0.0.1:{}", p + 1)).collect();
    ports
        .into_iter()
        .map(|(name, port)| {
            let member = EtcdProc {
                name,
                pid: 0,
                client_url: format!("https://127.0.0.1:{port}"),
                client_port: port,
                peer_port: port + 1,
                cluster: cluster.join(","),
                on_bridge: true,
            };
            start_etcd_member(member, true)
        })
        .collect()
}

/// Starts (`fresh`: with a new data directory) or restarts a member in place.
pub fn start_etcd_member(mut member: EtcdProc, fresh: bool) -> Result<EtcdProc> {
    let dir = lab_dir().join(&member.name);
    if fresh {
        let _ = std::fs::remove_dir_all(&dir);
    }
    std::fs::create_dir_all(&dir)?;
    for port in [member.client_port, member.peer_port] {
        ensure_port_free(port, &member.name)?;
    }
    let local = format!("https://127.0.0.1:{}", member.client_port);
    let (client_urls, advertise) = if member.on_bridge {
        let bridge = format!("https://{HOST_IP}:{}", member.client_port);
        (format!("{local},{bridge}"), bridge)
    } else {
        (local.clone(), local.clone())
    };
    let mut cmd = etcd_command(&member.name, &dir.join("data"), &client_urls, &advertise, member.peer_port);
    cmd.args(["--initial-cluster", &member.cluster, "--initial-cluster-state", if fresh { "new" } else { "existing" }]);
    member.pid = process::spawn_logged(cmd, &dir.join("etcd.log"))?;
    Ok(member)
}

/// Refuses to start a member whose port another process holds: etcd would exit at once, and the
/// lab would only say, much later, that etcd never became ready.
fn ensure_port_free(port: u16, member: &str) -> Result<()> {
    match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "port {port}, which the lab's {member} listens on, is taken by another process \
             (`ss -ltnp 'sport = :{port}'` shows which); stop it and run `./lab up` again"
        ),
        Err(e) => Err(e).with_context(|| format!("cannot check port {port} for {member}")),
    }
}

/// The command line of one etcd member (without its `--initial-cluster` flags when `data` already
/// holds a member: etcd then ignores them). Clients and peers must present a certificate signed
/// by the lab's CA.
pub fn etcd_command(name: &str, data: &Path, client_urls: &str, advertise: &str, peer_port: u16) -> Command {
    let peer = format!("https://127.0.0.1:{peer_port}");
    let tls = pki::identity("etcd");
    let mut cmd = Command::new("etcd");
    cmd.args(["--name", name, "--data-dir"])
        .arg(data)
        .args(["--listen-client-urls", client_urls, "--advertise-client-urls", advertise])
        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
        // As a provisioned member's etcd (lib/provision): quota, hourly compaction, small backend batch.
        .args(["--auto-compaction-retention", "1"])
        .args(["--quota-backend-bytes", &fleet_provision::ETCD_QUOTA_BYTES.to_string()])
        .args(crate::bench::LARGE_CLUSTER_ETCD_FLAGS)
        .arg("--client-cert-auth")
        .arg("--trusted-ca-file")
        .arg(&tls.ca_file)
        .arg("--cert-file")
        .arg(&tls.cert_file)
        .arg("--key-file")
        .arg(&tls.key_file)
        .arg("--peer-client-cert-auth")
        .arg("--peer-trusted-ca-file")
        .arg(&tls.ca_file)
        .arg("--peer-cert-file")
        .arg(&tls.cert_file)
        .arg("--peer-key-file")
        .arg(&tls.key_file);
    cmd
}

/// A client of the lab's etcd as its administrator (`https://` endpoints), or plain.
pub async fn etcd_admin(endpoints: &[String]) -> Result<etcd_client::Client> {
    if endpoints.iter().any(|e| e.starts_with("https://")) {
        pki::etcd_as(endpoints, "root").await
    } else {
        Ok(etcd_client::Client::connect(endpoints, None).await?)
    }
}

/// Waits until etcd answers a read.
pub async fn wait_etcd(endpoints: &[String], timeout: Duration) -> Result<()> {
    let until = Instant::now() + timeout;
    loop {
        let attempt = async {
            let mut c = etcd_admin(endpoints).await?;
            anyhow::Ok(c.get("/", None).await?)
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(_)) => return Ok(()),
            _ if Instant::now() > until => {
                bail!("etcd at {} did not become ready within {timeout:?}", endpoints.join(","))
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Starts an engine process from its recorded command line.
pub fn spawn_engine(engine: &EngineProc, bin_dir: &Path) -> Result<u32> {
    let mut cmd = Command::new(bin_dir.join("fleet-engine"));
    cmd.args(&engine.args);
    process::spawn_logged(cmd, &lab_dir().join(format!("{}.log", engine.name)))
}

/// The unix socket an engine started by the lab also serves the API on.
pub fn engine_socket(name: &str) -> PathBuf {
    lab_dir().join(format!("{name}.sock"))
}

/// Where an engine started by the lab records every change made through its API.
pub fn engine_audit_log(name: &str) -> PathBuf {
    lab_dir().join(format!("{name}.audit.log"))
}

/// Starts an engine serving the API over TLS on `127.0.0.1:port` (and on its unix socket), with
/// the lab's etcd identity and auth settings.
pub fn start_engine(
    name: &str,
    bin_dir: &Path,
    etcd: &[String],
    prefix: &str,
    port: u16,
    election_ttl: i64,
) -> Result<EngineProc> {
    let args: Vec<String> = [
        "--config",
        &pki::engine_config().display().to_string(),
        "--etcd-endpoints",
        &etcd.join(","),
        "--etcd-prefix",
        prefix,
        "--engine-id",
        name,
        "--listen",
        &engine_socket(name).display().to_string(),
        "--listen-tls",
        // The bridge address is for the machines' update agents (FleetLock).
        &format!("127.0.0.1:{port},{HOST_IP}:{port}"),
        "--audit-log",
        &engine_audit_log(name).display().to_string(),
        "--election-ttl-secs",
        &election_ttl.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut engine = EngineProc { name: name.into(), pid: 0, api_url: format!("https://127.0.0.1:{port}"), args };
    engine.pid = spawn_engine(&engine, bin_dir)?;
    Ok(engine)
}

/// Turns on etcd's auth for the lab: engines may use every key under `/fleet` (tests use
/// `/fleet-test/...` prefixes), machines only their own (see [`boot_machine`]).
pub async fn enable_etcd_auth(endpoints: &[String]) -> Result<()> {
    let mut root = pki::etcd_as(endpoints, "root").await?;
    fleet_engine::pki::etcd_enable_auth(&mut root, "/fleet").await?;
    Ok(())
}

/// Boots a machine: network namespace and address, agent config, then systemd-nspawn.
pub async fn boot_machine(spec: &MachineSpec, bin_dir: &Path, unit_template: &str) -> Result<MachineProc> {
    let m = start_machine(spec, bin_dir, unit_template).await?;
    // An image machine first installs its release and passes through its firmware.
    let boot_timeout = if spec.image.is_some() { 90 } else { 60 };
    wait_booted(&m, Duration::from_secs(boot_timeout)).await?;
    Ok(m)
}

/// Starts a machine without waiting for it to boot (machines that wait for each other, as etcd
/// members do, start together).
pub async fn start_machine(spec: &MachineSpec, bin_dir: &Path, unit_template: &str) -> Result<MachineProc> {
    let dir = lab_dir().join("machines").join(&spec.name);
    // An image machine keeps its disk and /var across power cycles; the others start afresh.
    if spec.image.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let etc = if spec.image.is_some() { image::fleet_etc(&dir) } else { dir.join("fleet") };
    std::fs::create_dir_all(dir.join("bus"))?;
    if !spec.provisioned {
        std::fs::create_dir_all(&etc)?;
    }
    net::add_machine_netns(&spec.name, &spec.ip)?;
    if spec.joining && spec.image.is_some() {
        bail!("machine {}: an image machine cannot boot as one that joins by token (yet)", spec.name);
    }
    // A machine that joins by token has nothing of the cluster yet: /etc/fleet empty and
    // writable, fleet-agent.service installed but not started (as after `apt install
    // fleet-agent`); `fleet-agent join` makes it a member.
    if spec.provisioned && spec.image.is_none() {
        bail!("machine {}: only an image machine is provisioned", spec.name);
    }
    if !spec.joining && !spec.provisioned {
        write_identity(spec, &etc).await?;
    }
    let pid = match &spec.image {
        Some(img) => {
            if spec.provisioned {
                image::prepare_blank(&dir, img)?;
            } else {
                image::prepare(&dir, img, ENGINE_PORT)?;
            }
            let cmd = image::firmware_command(bin_dir, &dir, &spec.name, &uuid_of(&spec.machine_id));
            process::spawn_logged(cmd, &dir.join("firmware.log"))?
        }
        None => {
            let unit = unit_template.replace("/usr/bin/fleet-agent", "/opt/fleet/fleet-agent");
            std::fs::write(dir.join("fleet-agent.service"), unit)?;
            // nspawn starts in the machine's own cgroup (see [`cgroup`]).
            let enter = cgroup::enter_script(&cgroup::prepare(&spec.name)?);
            let mut cmd = Command::new("sh");
            cmd.args(["-c", &format!("{enter}exec systemd-nspawn \"$@\""), "sh"]);
            cmd.args(["-D", "/", "--volatile=yes", "--register=no", "--keep-unit", "-M", &spec.name])
                .arg(format!("--uuid={}", uuid_of(&spec.machine_id)))
                .arg(format!("--network-namespace-path=/run/netns/{}", spec.name))
                .arg(format!("--bind={}:/run/dbus", dir.join("bus").display()))
                // Writable for a machine that joins: `fleet-agent join` writes there.
                .arg(format!(
                    "--bind{}={}:/etc/fleet",
                    if spec.joining { "" } else { "-ro" },
                    dir.join("fleet").display()
                ))
                .arg(format!(
                    "--bind-ro={}:/etc/systemd/system/fleet-agent.service",
                    dir.join("fleet-agent.service").display()
                ))
                .arg(format!("--bind-ro={}:/opt/fleet", bin_dir.display()))
                .args(["--boot", "--quiet", "--"])
                .arg("systemd.firstboot=off")
                .args((!spec.joining).then_some("systemd.wants=fleet-agent.service"))
                .args(MASKED.iter().map(|s| format!("systemd.mask={s}")));
            process::spawn_logged(cmd, &dir.join("console.log"))?
        }
    };
    let m = MachineProc {
        name: spec.name.clone(),
        pid,
        ip: spec.ip.clone(),
        machine_id: spec.machine_id.clone(),
        dir,
        spec: Some(spec.clone()),
    };
    Ok(m)
}

/// Machine `spec`'s identity (a certificate for `machine-<id>` and its etcd role: own keys only)
/// and its agent's configuration, into `etc`.
async fn write_identity(spec: &MachineSpec, etc: &Path) -> Result<()> {
    // The machine's identity: a certificate for `machine-<id>`, and its etcd role (own keys only).
    pki::issue_machine(&spec.name, &spec.machine_id, &spec.ip, etc)?;
    let endpoints: Vec<String> =
        spec.etcd_endpoints.iter().map(|e| e.replace(&format!("https://{HOST_IP}:"), "https://127.0.0.1:")).collect();
    let mut root = pki::etcd_as(&endpoints, "root").await?;
    fleet_engine::pki::etcd_add_machine(&mut root, &spec.etcd_prefix, &spec.machine_id).await?;
    let metadata: String = spec.metadata.iter().map(|(k, v)| format!("{k} = {v:?}\n")).collect();
    let config = format!(
        "etcd_endpoints = [{}]\netcd_prefix = {:?}\npublic_ip = {:?}\nlease_ttl_secs = {}\napi_listen = \"0.0.0.0:12490\"\netcd_ca_file = \"/etc/fleet/ca.pem\"\netcd_cert_file = \"/etc/fleet/machine.pem\"\netcd_key_file = \"/etc/fleet/machine.key\"\n\n[capacity]\nmemory = {:?}\ncpu = {:?}\n\n[metadata]\n{metadata}",
        spec.etcd_endpoints.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>().join(", "),
        spec.etcd_prefix,
        spec.ip,
        spec.lease_ttl_secs,
        spec.capacity.0,
        spec.capacity.1,
    );
    std::fs::write(etc.join("agent.toml"), config)?;
    Ok(())
}

/// Services installed on the host that must not start inside every machine.
const MASKED: &[&str] = &[
    "etcd.service",
    "postgresql.service",
    "docker.service",
    "containerd.service",
    "ssh.service",
    "nginx.service",
    "redis-server.service",
    "memcached.service",
    "cron.service",
    "e2scrub_reap.service",
    "systemd-networkd-wait-online.service",
];

/// Waits until the machine's systemd reports `running` or `degraded`.
pub async fn wait_booted(m: &MachineProc, timeout: Duration) -> Result<()> {
    let until = Instant::now() + timeout;
    let mut last = String::from("no bus yet");
    loop {
        if !process::alive(m.pid) {
            bail!("machine {} exited while booting; see {}", m.name, m.dir.join("console.log").display());
        }
        if m.dir.join("bus/system_bus_socket").exists() {
            let state = async {
                let conn = zbus::connection::Builder::address(m.bus_address().as_str())?.build().await?;
                let proxy = zbus::Proxy::new(
                    &conn,
                    "org.freedesktop.systemd1",
                    "/org/freedesktop/systemd1",
                    "org.freedesktop.systemd1.Manager",
                )
                .await?;
                proxy.get_property::<String>("SystemState").await
            };
            match tokio::time::timeout(Duration::from_secs(2), state).await {
                Ok(Ok(s)) if s == "running" || s == "degraded" => return Ok(()),
                Ok(Ok(s)) => last = s,
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "bus timeout".into(),
            }
        }
        if Instant::now() > until {
            bail!("machine {} did not boot within {timeout:?} (last: {last})", m.name);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops a machine: SIGTERM makes nspawn power the container off; SIGKILL after `grace`.
pub fn stop_machine(m: &MachineProc, grace: Duration) {
    // An image machine's PID is its firmware's, which powers the machine off when told to stop.
    let (program, nspawns) = if m.spec.as_ref().is_some_and(|s| s.image.is_some()) {
        ("fleet-lab", if process::runs(m.pid, "fleet-lab") { process::children(m.pid) } else { Vec::new() })
    } else {
        ("systemd-nspawn", vec![m.pid])
    };
    let inits: Vec<u32> =
        nspawns.iter().filter(|p| process::runs(**p, "systemd-nspawn")).flat_map(|p| process::children(*p)).collect();
    process::stop(m.pid, program, grace + Duration::from_secs(5));
    // If nspawn had to be killed, its machine would live on as an orphan: kill that too.
    for init in inits.into_iter().filter(|p| process::alive(*p)) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(init as i32), nix::sys::signal::Signal::SIGKILL);
    }
    net::del_machine_netns(&m.name);
    cgroup::remove(&m.name);
    let _ = std::fs::remove_file(m.dir.join("bus/system_bus_socket"));
}

/// Copies the built binaries into the lab, so a rebuild does not change what runs.
pub fn install_binaries(target_dir: &Path) -> Result<PathBuf> {
    let bin = lab_dir().join("bin");
    std::fs::create_dir_all(&bin)?;
    for b in ["fleet-agent", "fleet-engine", "fleet-image", "fleetctl", "fleet-lab", "fleet-sim"] {
        let src = target_dir.join(b);
        let tmp = bin.join(format!(".{b}.tmp"));
        std::fs::copy(&src, &tmp)
            .with_context(|| format!("cannot copy {} (is the workspace built?)", src.display()))?;
        std::fs::rename(&tmp, bin.join(b))?;
    }
    Ok(bin)
}

/// Stops everything in `state`, by PID, and removes what the lab created on the host.
pub fn teardown(state: &LabState) {
    for m in &state.machines {
        stop_machine(m, Duration::from_secs(10));
    }
    for e in &state.engines {
        process::stop(e.pid, "fleet-engine", Duration::from_secs(5));
    }
    for e in &state.etcd {
        process::stop(e.pid, "etcd", Duration::from_secs(5));
    }
    for pid in &state.helpers {
        process::stop(*pid, "fleet-lab", Duration::from_secs(5));
    }
}

/// Removes leftovers of any earlier run: namespaces, veths and the bridge named by the lab.
pub fn clean_host() {
    net::clean_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_etcd_port_is_named_with_its_member() {
        let held = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("a free loopback port");
        let port = held.local_addr().map(|a| a.port()).unwrap_or_default();
        let err = ensure_port_free(port, "etcd2").expect_err("the port is held");
        let text = err.to_string();
        assert!(text.contains(&port.to_string()) && text.contains("etcd2"), "{text}");
        drop(held);
        assert!(ensure_port_free(port, "etcd2").is_ok());
    }
}
