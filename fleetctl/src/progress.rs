//! The progress line a long wait draws on a terminal (and clears before printing a result).

use crate::*;

/// A one-line spinner on stderr while a command waits, only on a terminal; erased when done.
pub(crate) struct Progress {
    on: bool,
    frame: usize,
    started: Instant,
}

impl Progress {
    pub(crate) fn new() -> Self {
        use std::io::IsTerminal;
        Progress { on: std::io::stderr().is_terminal(), frame: 0, started: Instant::now() }
    }

    pub(crate) fn tick(&mut self, what: &str) {
        // Quick waits stay silent.
        if !self.on || self.started.elapsed() < Duration::from_millis(500) {
            return;
        }
        const FRAMES: [char; 4] = ['|', '/', '-', '\\'];
        self.frame += 1;
        let mut line: String = what.chars().take(100).collect();
        if line.len() < what.len() {
            line.push_str("...");
        }
        eprint!("\r\x1b[K{} {line} ({}s)", FRAMES[self.frame % 4], self.started.elapsed().as_secs());
    }
}

impl Progress {
    pub(crate) fn clear(&mut self) {
        if self.on && self.frame > 0 {
            eprint!("\r\x1b[K");
            self.frame = 0;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}
