//! fleet-logging: one way for every daemon to set up its logs.
//!
//! - `text`: human-readable lines on stderr (a terminal, the lab's log files);
//! - `json`: one JSON object per line on stderr (a log shipper reading files or the journal);
//! - `journald`: straight to systemd's journal with native fields (`PRIORITY`, `CODE_FILE`,
//!   `CODE_LINE`, `TARGET`, and each event's fields in upper case after `F_`, e.g. `F_UNIT=`),
//!   so `journalctl -u fleet-engine F_UNIT=web.service` finds the lines about a unit; `MESSAGE`
//!   holds the fields too, so plain `journalctl` shows what the text format would;
//! - `auto` (the default): `journald` when stderr is connected to the journal (systemd sets
//!   `JOURNAL_STREAM` to its device and inode), else `text`.
//!
//! `RUST_LOG` chooses what is logged (default `info`). Depends on tracing only: no fleet crate.

mod journal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// How a daemon writes its log (`--log-format`, `FLEET_LOG_FORMAT`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Auto,
    Text,
    Json,
    Journald,
}

/// Whether stderr is the journal stream systemd gave this process (`JOURNAL_STREAM` is
/// `<device>:<inode>` of it; a child inheriting the variable but not the stream is not).
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else { return false };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else { return false };
    let Ok(meta) = std::fs::File::from(fd).metadata() else { return false };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// The format `auto` stands for here.
pub fn resolve(format: LogFormat) -> LogFormat {
    match format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    }
}

/// Sets up the process's logging; returns the format in force. The journal unreachable (no
/// socket) falls back to text on stderr, which systemd still collects.
pub fn init(format: LogFormat) -> LogFormat {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let registry = tracing_subscriber::registry().with(filter());
    match resolve(format) {
        LogFormat::Json => {
            let layer = tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(std::io::stderr);
            let _ = registry.with(layer).try_init();
            LogFormat::Json
        }
        LogFormat::Journald => match journal::JournalLayer::new() {
            Ok(layer) => {
                let _ = registry.with(layer).try_init();
                LogFormat::Journald
            }
            Err(e) => {
                let _ = registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).try_init();
                tracing::warn!(error = %e, "cannot reach the journal; logging text on stderr");
                LogFormat::Text
            }
        },
        _ => {
            // Colour only on a terminal: a file or a pipe gets plain text.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let layer = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr);
            let _ = registry.with(layer).try_init();
            LogFormat::Text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under a terminal or a pipe, `auto` is text: stderr is not the journal (the variable
    /// alone, inherited from a unit, does not make it so).
    #[test]
    fn auto_is_text_unless_stderr_is_the_journal_stream() {
        std::env::set_var("JOURNAL_STREAM", "1:1");
        assert_eq!(resolve(LogFormat::Auto), LogFormat::Text);
        assert_eq!(resolve(LogFormat::Json), LogFormat::Json);
    }
}
