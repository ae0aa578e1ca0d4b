//! Fault injection: kill and start etcd members, engines, agents and machines, and cut a
//! machine's network. Everything is addressed by the names `lab ps` prints and acts by PID (or,
//! for an agent, through its machine's systemd), and the lab state is updated so `ps` stays true.

use crate::{boot_machine, net, process, spawn_engine, start_etcd_member, LabState};
use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Etcd,
    Engine,
    Agent,
    Machine,
}

impl std::str::FromStr for Kind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "etcd" => Kind::Etcd,
            "engine" => Kind::Engine,
            "agent" => Kind::Agent,
            "machine" => Kind::Machine,
            other => bail!("unknown kind {other:?}: expected engine, agent, machine or etcd"),
        })
    }
}

async fn agent_call(state: &LabState, machine: &str, method: &str) -> Result<()> {
    let m = state.machine(machine).with_context(|| format!("no machine named {machine}"))?;
    let conn = zbus::connection::Builder::address(m.bus_address().as_str())?
        .build()
        .await
        .with_context(|| format!("cannot reach the systemd of {machine}"))?;
    let manager = zbus::Proxy::new(
        &conn,
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
    )
    .await?;
    match method {
        "kill" => {
            let main_pid = || async {
                let path: zbus::zvariant::OwnedObjectPath = manager.call("LoadUnit", &("fleet-agent.service",)).await?;
                let service =
                    zbus::Proxy::new(&conn, "org.freedesktop.systemd1", path, "org.freedesktop.systemd1.Service")
                        .await?;
                anyhow::Ok(service.get_property::<u32>("MainPID").await?)
            };
            let before = main_pid().await?;
            manager.call::<_, _, ()>("KillUnit", &("fleet-agent.service", "main", Signal::SIGKILL as i32)).await?;
            // Killed means that process is gone (systemd restarts the agent as another one).
            let until = std::time::Instant::now() + Duration::from_secs(5);
            while before != 0 && main_pid().await? == before {
                if std::time::Instant::now() >= until {
                    bail!("the agent of {machine} (pid {before} in its machine) still runs 5 s after SIGKILL");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        _ => {
            let _: zbus::zvariant::OwnedObjectPath =
                manager.call("StartUnit", &("fleet-agent.service", "replace")).await?;
        }
    }
    Ok(())
}

/// SIGKILLs one part of the lab. An agent killed this way is restarted by its machine's systemd
/// (`Restart=always`), as on a real host.
pub async fn kill(state: &mut LabState, kind: Kind, name: &str) -> Result<()> {
    match kind {
        Kind::Etcd => {
            let e =
                state.etcd.iter().find(|e| e.name == name).with_context(|| format!("no etcd member named {name}"))?;
            process::signal(e.pid, "etcd", Signal::SIGKILL);
            wait_dead(e.pid, name).await?;
        }
        Kind::Engine => {
            let e = state.engines.iter().find(|e| e.name == name).with_context(|| format!("no engine named {name}"))?;
            process::signal(e.pid, "fleet-engine", Signal::SIGKILL);
            wait_dead(e.pid, name).await?;
        }
        Kind::Agent => agent_call(state, name, "kill").await?,
        Kind::Machine => {
            let m = state.machine(name).with_context(|| format!("no machine named {name}"))?;
            // Power loss: kill the container's init first (killing only nspawn would orphan the
            // running machine), which takes its whole PID namespace with it.
            if process::runs(m.pid, "systemd-nspawn") {
                for child in process::children(m.pid) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child as i32), Signal::SIGKILL);
                }
            }
            process::signal(m.pid, "systemd-nspawn", Signal::SIGKILL);
            wait_dead(m.pid, name).await?;
            let _ = std::fs::remove_file(m.dir.join("bus/system_bus_socket"));
        }
    }
    Ok(())
}

/// Waits until `pid` is gone; an error if it still runs after 5 s (a fault that did not happen
/// must not pass for one).
async fn wait_dead(pid: u32, name: &str) -> Result<()> {
    for _ in 0..100 {
        if !process::alive(pid) {
            return Ok(());
        }
        let _ =
            nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{name} (pid {pid}) still runs 5 s after SIGKILL")
}

/// Brings a killed part back (a no-op if it runs).
pub async fn start(state: &mut LabState, kind: Kind, name: &str, unit_template: &str) -> Result<()> {
    match kind {
        Kind::Etcd => {
            let i = state
                .etcd
                .iter()
                .position(|e| e.name == name)
                .with_context(|| format!("no etcd member named {name}"))?;
            if !process::alive(state.etcd[i].pid) {
                state.etcd[i] = start_etcd_member(state.etcd[i].clone(), false)?;
            }
        }
        Kind::Engine => {
            let bin = state.bin_dir.clone();
            let e =
                state.engines.iter_mut().find(|e| e.name == name).with_context(|| format!("no engine named {name}"))?;
            if !process::alive(e.pid) {
                e.pid = spawn_engine(e, &bin)?;
            }
        }
        Kind::Agent => agent_call(state, name, "start").await?,
        Kind::Machine => {
            let i = state
                .machines
                .iter()
                .position(|m| m.name == name)
                .with_context(|| format!("no machine named {name}"))?;
            if !process::alive(state.machines[i].pid) {
                let spec = state.machines[i].spec.clone().context("machine has no recorded spec")?;
                state.machines[i] = boot_machine(&spec, &state.bin_dir.clone(), unit_template).await?;
            }
        }
    }
    state.save()
}

/// Takes a machine's network down (`up` false) or up, at its veth on the bridge.
pub fn set_cut(state: &LabState, name: &str, cut: bool) -> Result<()> {
    state.machine(name).with_context(|| format!("no machine named {name}"))?;
    net::set_link(name, !cut)
}

/// Undoes whatever faults are still in place: heals cut machines, starts dead etcd members,
/// engines and machines, and starts every machine's agent (a no-op where it runs). A fault test
/// calls it first, so one that failed half-way (with a machine still cut, say) costs only
/// itself, not every test after it. Returns what it had to mend.
pub async fn repair(state: &mut LabState, unit_template: &str) -> Result<Vec<String>> {
    let mut mended = Vec::new();
    let machines: Vec<String> = state.machines.iter().map(|m| m.name.clone()).collect();
    for m in &machines {
        if net::is_cut(m) {
            set_cut(state, m, false)?;
            mended.push(format!("healed {m}"));
        }
    }
    let dead_etcd: Vec<String> = state.etcd.iter().filter(|e| !process::alive(e.pid)).map(|e| e.name.clone()).collect();
    for e in dead_etcd {
        start(state, Kind::Etcd, &e, unit_template).await?;
        mended.push(format!("started {e}"));
    }
    let dead_engines: Vec<String> =
        state.engines.iter().filter(|e| !process::alive(e.pid)).map(|e| e.name.clone()).collect();
    for e in dead_engines {
        start(state, Kind::Engine, &e, unit_template).await?;
        mended.push(format!("started engine {e}"));
    }
    for m in &machines {
        let alive = state.machine(m).is_some_and(|p| process::alive(p.pid));
        if !alive {
            start(state, Kind::Machine, m, unit_template).await?;
            mended.push(format!("booted {m}"));
        } else {
            agent_call(state, m, "start").await?;
        }
    }
    Ok(mended)
}
