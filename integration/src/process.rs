//! Starting and stopping the lab's processes, always by PID and only after checking that the
//! PID still runs the program we started (PIDs are reused).

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Spawns `cmd` in its own process group with output appended to `log`; returns its PID. The
/// child is not waited for: it belongs to the lab, not to this process.
pub fn spawn_logged(mut cmd: Command, log: &Path) -> Result<u32> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err = out.try_clone()?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    Ok(child.id())
}

pub fn alive(pid: u32) -> bool {
    // A zombie has exited: treat it as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

/// True if `pid` runs a program whose name contains `program`.
pub fn runs(pid: u32, program: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|b| *b == 0).next().map(|argv0| String::from_utf8_lossy(argv0).contains(program)).unwrap_or(false)
        })
        .unwrap_or(false)
}

pub fn signal(pid: u32, program: &str, sig: Signal) -> bool {
    if !runs(pid, program) {
        return false;
    }
    kill(Pid::from_raw(pid as i32), sig).is_ok()
}

/// SIGTERM, then SIGKILL after `grace`; reaps the child if it is ours.
pub fn stop(pid: u32, program: &str, grace: Duration) {
    if !signal(pid, program, Signal::SIGTERM) {
        return;
    }
    let until = Instant::now() + grace;
    while alive(pid) && Instant::now() < until {
        reap(pid);
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let until = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < until {
            reap(pid);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    reap(pid);
}

fn reap(pid: u32) {
    let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
}

/// Direct children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| s.split_whitespace().filter_map(|c| c.parse().ok()).collect())
        .unwrap_or_default()
}

/// A scratch directory `<base>/<name>-<this process's PID>`, made empty. Directories of the same
/// name left by processes that are gone (a test or a simulation killed before it cleaned up, at
/// a million units gigabytes in /dev/shm) are removed first.
pub fn scratch_dir(base: &Path, name: &str) -> Result<std::path::PathBuf> {
    let prefix = format!("{name}-");
    if let Ok(entries) = std::fs::read_dir(base) {
        for e in entries.flatten() {
            let file_name = e.file_name();
            let Some(pid) =
                file_name.to_str().and_then(|n| n.strip_prefix(&prefix)).and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = base.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod scratch_tests {
    use super::*;

    #[test]
    fn a_scratch_directory_sweeps_what_gone_processes_left_and_keeps_live_ones() {
        let base = std::env::temp_dir().join(format!("fl-scratch-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("base");
        // PID 1 runs; a PID above the kernel's largest never does.
        let gone = base.join("work-4194305");
        let live = base.join("work-1");
        let other = base.join("other-4194305");
        for d in [&gone, &live, &other] {
            std::fs::create_dir_all(d.join("inside")).expect("leftover");
        }
        let mine = scratch_dir(&base, "work").expect("scratch");
        assert_eq!(mine, base.join(format!("work-{}", std::process::id())));
        assert!(mine.is_dir() && !gone.exists(), "the gone process's directory is swept");
        assert!(live.exists() && other.exists(), "a live process's and other names' are kept");
        let _ = std::fs::remove_dir_all(&base);
    }
}
