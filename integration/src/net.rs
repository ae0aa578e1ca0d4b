//! The lab's network: one bridge on the host and one namespace per machine, joined by a veth.

use crate::{BRIDGE, HOST_IP, PREFIX_LEN};
use anyhow::{bail, Context, Result};
use std::process::Command;

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("cannot run ip (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

fn exists(link: &str) -> bool {
    Command::new("ip").args(["link", "show", link]).output().map(|o| o.status.success()).unwrap_or(false)
}

/// True if the lab's bridge exists (a lab is up, or one left it behind).
pub fn bridge_exists() -> bool {
    exists(BRIDGE)
}

/// Removes the lab's bridge (what a test that made it for itself leaves as it found).
pub fn remove_bridge() {
    ip_quiet(&["link", "del", BRIDGE]);
}

pub fn ensure_bridge() -> Result<()> {
    if !exists(BRIDGE) {
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    }
    // A bridge without a MAC of its own takes the lowest of its ports' MACs, so a machine booted
    // or killed would change the gateway's MAC under every other machine's ARP cache and cut
    // them all off for seconds. A fixed, locally administered address keeps it stable.
    ip(&["link", "set", BRIDGE, "address", BRIDGE_MAC])?;
    ip_quiet(&["addr", "add", &format!("{HOST_IP}/{PREFIX_LEN}"), "dev", BRIDGE]);
    ip(&["link", "set", BRIDGE, "up"])
}

const BRIDGE_MAC: &str = "02:66:6c:5a:90:01";

fn host_veth(name: &str) -> String {
    // Interface names are limited to 15 bytes.
    let short: String = name.trim_start_matches("fl-").chars().take(11).collect();
    format!("flh-{short}")
}

pub fn add_machine_netns(name: &str, addr: &str) -> Result<()> {
    del_machine_netns(name);
    let veth = host_veth(name);
    ip(&["netns", "add", name])?;
    ip(&["link", "add", &veth, "type", "veth", "peer", "name", "flc0", "netns", name])?;
    ip(&["link", "set", &veth, "master", BRIDGE, "up"])?;
    let ns = |args: &[&str]| {
        let mut full = vec!["-n", name];
        full.extend_from_slice(args);
        ip(&full)
    };
    ns(&["link", "set", "flc0", "name", "eth0"])?;
    ns(&["addr", "add", &format!("{addr}/{PREFIX_LEN}"), "dev", "eth0"])?;
    ns(&["link", "set", "eth0", "up"])?;
    ns(&["link", "set", "lo", "up"])?;
    ns(&["route", "add", "default", "via", HOST_IP])
}

pub fn del_machine_netns(name: &str) {
    ip_quiet(&["link", "del", &host_veth(name)]);
    ip_quiet(&["netns", "del", name]);
}

/// Cuts a machine off the network (its veth down) or heals it.
pub fn set_link(name: &str, up: bool) -> Result<()> {
    ip(&["link", "set", &host_veth(name), if up { "up" } else { "down" }])
}

/// True if the machine's veth is administratively down (it was cut off).
pub fn is_cut(name: &str) -> bool {
    let Ok(out) = Command::new("ip").args(["-o", "link", "show", &host_veth(name)]).output() else { return false };
    let text = String::from_utf8_lossy(&out.stdout);
    let flags =
        text.split_once('<').and_then(|(_, r)| r.split_once('>')).map(|(f, _)| f.to_string()).unwrap_or_default();
    out.status.success() && !flags.split(',').any(|f| f == "UP")
}

/// Removes every namespace, veth and bridge the lab may have left behind.
pub fn clean_all() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(ns) = line.split_whitespace().next().filter(|n| n.starts_with("fl-")) {
                ip_quiet(&["netns", "del", ns]);
            }
        }
    }
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.split(':').nth(1).map(|s| s.trim().split('@').next().unwrap_or("").to_string()) {
                if name.starts_with("flh-") {
                    ip_quiet(&["link", "del", &name]);
                }
            }
        }
    }
    ip_quiet(&["link", "del", BRIDGE]);
}
