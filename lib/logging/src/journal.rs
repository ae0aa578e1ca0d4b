//! Events to systemd's journal over its native protocol: each event's fields as journal fields
//! (`F_<NAME>`), and a `MESSAGE` that reads like the text format (`cannot register
//! machine=... error=...`), so `journalctl -u fleet-agent` shows everything without
//! `-o verbose` (journald's own layer for tracing puts only the message in `MESSAGE`).

use std::fmt::Write as _;
use std::os::unix::net::UnixDatagram;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

const SOCKET: &str = "/run/systemd/journal/socket";

/// A tracing layer writing to the journal; `None` if its socket cannot be reached.
pub struct JournalLayer {
    socket: UnixDatagram,
    identifier: String,
}

impl JournalLayer {
    pub fn new() -> std::io::Result<JournalLayer> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(SOCKET)?;
        let identifier = std::env::args()
            .next()
            .and_then(|a| std::path::Path::new(&a).file_name().map(|f| f.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "fleet".into());
        Ok(JournalLayer { socket, identifier })
    }
}

/// One event's message and fields.
#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.fields.push((field.name().to_string(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields.push((field.name().to_string(), format!("{value:?}")));
        }
    }
}

/// syslog's priorities, as journald reads them.
fn priority(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "3",
        Level::WARN => "4",
        Level::INFO => "6",
        _ => "7",
    }
}

/// `name` as a journal field name: upper case letters, digits and `_`, after `F_`.
fn field_name(name: &str) -> String {
    let mut out = String::from("F_");
    out.extend(name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }));
    out
}

/// Appends one field in journald's native format (the binary form when the value has a newline).
fn put(buf: &mut Vec<u8>, name: &str, value: &str) {
    buf.extend_from_slice(name.as_bytes());
    if value.contains('\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value.as_bytes());
    buf.push(b'\n');
}

/// The datagram for one event.
fn encode(identifier: &str, level: &Level, target: &str, file: Option<&str>, line: Option<u32>, f: &Fields) -> Vec<u8> {
    let mut message = f.message.clone();
    for (k, v) in &f.fields {
        let _ = write!(message, " {k}={v}");
    }
    let mut buf = Vec::with_capacity(256 + message.len());
    put(&mut buf, "PRIORITY", priority(level));
    put(&mut buf, "SYSLOG_IDENTIFIER", identifier);
    put(&mut buf, "MESSAGE", &message);
    put(&mut buf, "TARGET", target);
    if let Some(file) = file {
        put(&mut buf, "CODE_FILE", file);
    }
    if let Some(line) = line {
        put(&mut buf, "CODE_LINE", &line.to_string());
    }
    for (k, v) in &f.fields {
        put(&mut buf, &field_name(k), v);
    }
    buf
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for JournalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let datagram = encode(&self.identifier, meta.level(), meta.target(), meta.file(), meta.line(), &fields);
        // Too large for a datagram, or the journal went away: the line still reaches stderr
        // (which systemd also collects).
        if self.socket.send(&datagram).is_err() {
            let text = String::from_utf8_lossy(&datagram);
            let message = text.lines().find_map(|l| l.strip_prefix("MESSAGE=")).unwrap_or(&fields.message);
            eprintln!("{} {}: {message}", meta.level(), meta.target());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_native_and_in_the_message() {
        let f = Fields {
            message: "cannot register".into(),
            fields: vec![("machine".into(), "m1".into()), ("error".into(), "two\nlines".into())],
        };
        let d =
            encode("fleet-agent", &Level::WARN, "fleet_agent::presence", Some("agent/src/presence.rs"), Some(7), &f);
        let text = String::from_utf8_lossy(&d);
        assert!(text.contains("PRIORITY=4\n"), "{text}");
        assert!(text.contains("SYSLOG_IDENTIFIER=fleet-agent\n"), "{text}");
        assert!(text.contains("F_MACHINE=m1\n"), "{text}");
        assert!(text.contains("CODE_LINE=7\n"), "{text}");
        // A value with a newline goes in the binary form: name, newline, length, value.
        let mut binary = b"F_ERROR\n".to_vec();
        binary.extend_from_slice(&9u64.to_le_bytes());
        binary.extend_from_slice(b"two\nlines\n");
        assert!(d.windows(binary.len()).any(|w| w == binary.as_slice()), "{text}");
        let message = b"MESSAGE\n";
        assert!(d.windows(message.len()).any(|w| w == message), "the message has a newline: binary form");
        assert!(text.contains("cannot register machine=m1 error=two\nlines"), "{text}");
        assert_eq!(field_name("error.kind"), "F_ERROR_KIND");
    }
}
