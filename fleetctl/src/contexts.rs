//! fleetctl's configuration file: named contexts, each a cluster's endpoints with how to reach
//! them (CA, client certificate, token), like kubeconfig, so a user picks a cluster with
//! `--context` instead of exporting five variables.
//!
//! What reaches a setting, strongest first: a flag, its environment variable, the chosen
//! context, the built-in default. The file is `--config`, `$FLEETCTL_CONFIG`, or
//! `$XDG_CONFIG_HOME/fleet/fleetctl.toml` (`~/.config/fleet/fleetctl.toml`); only the default
//! file may be absent. Relative paths in a context are relative to the file.

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The endpoint when nothing names one: the local engine's unix socket.
pub(crate) const DEFAULT_ENDPOINT: &str = "unix:///var/run/fleet.sock";
/// Seconds to wait for each API request when nothing says otherwise.
pub(crate) const DEFAULT_REQUEST_TIMEOUT: f64 = 10.0;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfigFile {
    /// The context used when no `--context` is given.
    pub(crate) current: Option<String>,
    #[serde(default)]
    pub(crate) contexts: BTreeMap<String, Context>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Context {
    /// Tried in order; a request that cannot reach one goes to the next.
    #[serde(default)]
    pub(crate) endpoints: Vec<String>,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) cert_file: Option<PathBuf>,
    pub(crate) key_file: Option<PathBuf>,
    /// A token written in the file itself; `token_file` keeps it out of it.
    pub(crate) token: Option<String>,
    pub(crate) token_file: Option<PathBuf>,
    pub(crate) request_timeout: Option<f64>,
}

/// How to reach the cluster, once flags, environment, context and defaults are laid together.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settings {
    /// Comma-separated, as `--endpoint` takes them.
    pub(crate) endpoint: String,
    pub(crate) request_timeout: f64,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) cert_file: Option<PathBuf>,
    pub(crate) key_file: Option<PathBuf>,
    pub(crate) token: Option<String>,
}

/// What the command line (flags or their variables) said; `None` where it said nothing.
#[derive(Debug, Default, Clone)]
pub(crate) struct Given {
    pub(crate) config: Option<PathBuf>,
    pub(crate) context: Option<String>,
    pub(crate) endpoint: Option<String>,
    pub(crate) request_timeout: Option<f64>,
    pub(crate) ca_file: Option<String>,
    pub(crate) cert_file: Option<String>,
    pub(crate) key_file: Option<String>,
    pub(crate) token: Option<String>,
}

/// `$XDG_CONFIG_HOME/fleet/fleetctl.toml`, or `~/.config/fleet/fleetctl.toml`.
pub(crate) fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("fleet").join("fleetctl.toml"))
}

/// Reads the configuration file: the one named (which must exist), else the default one if
/// it exists. `None` when there is none.
pub(crate) fn load(named: Option<&Path>) -> Result<Option<(PathBuf, ConfigFile)>> {
    let path = match named {
        Some(p) => p.to_path_buf(),
        None => match default_path() {
            Some(p) if p.exists() => p,
            _ => return Ok(None),
        },
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: ConfigFile =
        toml::from_str(&text).with_context(|| format!("{} is not a valid fleetctl configuration", path.display()))?;
    for (name, c) in &file.contexts {
        if c.token.is_some() && c.token_file.is_some() {
            bail!("{}: context {name:?} has both token and token_file; keep one", path.display());
        }
        if let Some(t) = c.request_timeout.filter(|t| !(*t > 0.0 && t.is_finite())) {
            bail!(
                "{}: context {name:?}: request_timeout must be a positive number of seconds, not {t}",
                path.display()
            );
        }
    }
    if let Some(current) = &file.current {
        if !file.contexts.contains_key(current) {
            bail!("{}: current context {current:?} is not among its contexts ({})", path.display(), names(&file));
        }
    }
    Ok(Some((path, file)))
}

/// Which file was looked for, for messages saying it does not exist.
fn looked_for(given: &Given) -> String {
    match given.config.clone().or_else(default_path) {
        Some(p) => p.display().to_string(),
        None => "no configuration file".into(),
    }
}

fn names(file: &ConfigFile) -> String {
    match file.contexts.is_empty() {
        true => "none".into(),
        false => file.contexts.keys().cloned().collect::<Vec<_>>().join(", "),
    }
}

/// The context chosen by `--context` (which must exist) or by the file's `current`.
pub(crate) fn chosen<'a>(given: &Given, file: Option<&'a (PathBuf, ConfigFile)>) -> Result<Option<&'a Context>> {
    match (&given.context, file) {
        (Some(name), Some((path, f))) => f
            .contexts
            .get(name)
            .map(Some)
            .ok_or_else(|| anyhow!("no context {name:?} in {} (contexts: {})", path.display(), names(f))),
        (Some(name), None) => Err(anyhow!("no context {name:?}: {} does not exist", looked_for(given))),
        (None, Some((_, f))) => Ok(f.current.as_ref().and_then(|c| f.contexts.get(c))),
        (None, None) => Ok(None),
    }
}

/// Lays what was given over the context over the defaults.
pub(crate) fn settings(given: &Given, file: Option<&(PathBuf, ConfigFile)>) -> Result<Settings> {
    let context = chosen(given, file)?.cloned().unwrap_or_default();
    let dir = file.and_then(|(p, _)| p.parent()).unwrap_or(Path::new("."));
    let near = |p: &Option<PathBuf>| p.as_ref().map(|p| dir.join(p));
    // An empty value (`--cert-file ""`, or an empty variable) means unset, here and below.
    let flag = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
    let token = match (flag(&given.token), &context.token, &context.token_file) {
        (Some(t), _, _) => Some(t),
        (None, Some(t), _) => Some(t.clone()),
        (None, None, Some(f)) => {
            let f = dir.join(f);
            let t = std::fs::read_to_string(&f).with_context(|| format!("cannot read token_file {}", f.display()))?;
            Some(t.trim().to_string()).filter(|t| !t.is_empty())
        }
        (None, None, None) => None,
    };
    let endpoint = match flag(&given.endpoint) {
        Some(e) => e,
        None if !context.endpoints.is_empty() => context.endpoints.join(","),
        None => DEFAULT_ENDPOINT.to_string(),
    };
    let request_timeout = given.request_timeout.or(context.request_timeout).unwrap_or(DEFAULT_REQUEST_TIMEOUT);
    if !(request_timeout > 0.0 && request_timeout.is_finite()) {
        bail!("--request-timeout must be a positive number of seconds");
    }
    Ok(Settings {
        endpoint,
        request_timeout,
        ca_file: flag(&given.ca_file).map(PathBuf::from).or_else(|| near(&context.ca_file)),
        cert_file: flag(&given.cert_file).map(PathBuf::from).or_else(|| near(&context.cert_file)),
        key_file: flag(&given.key_file).map(PathBuf::from).or_else(|| near(&context.key_file)),
        token,
    })
}

/// `fleetctl contexts`: every context of the file, the current one marked.
pub(crate) fn list(given: &Given, file: Option<&(PathBuf, ConfigFile)>) -> Result<String> {
    let Some((path, f)) = file else {
        return Ok(format!("No contexts: {} does not exist.\n", looked_for(given)));
    };
    let current = given.context.as_ref().or(f.current.as_ref());
    let mut out = format!("Contexts in {}:\n", path.display());
    for (name, c) in &f.contexts {
        let mark = if Some(name) == current { "*" } else { " " };
        let how = match (&c.cert_file, c.token.is_some() || c.token_file.is_some()) {
            (Some(_), _) => "certificate",
            (None, true) => "token",
            (None, false) => "no credentials",
        };
        out.push_str(&format!("{mark} {name}\t{}\t{how}\n", c.endpoints.join(",")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
current = "lab"

[contexts.lab]
endpoints = ["https://10.0.0.1:49153", "https://10.0.0.2:49153"]
ca_file = "pki/ca.pem"
cert_file = "/etc/fleet/admin.pem"
key_file = "/etc/fleet/admin.key"
request_timeout = 3

[contexts.prod]
endpoints = ["https://prod:49153"]
token_file = "prod.token"
"#;

    fn file(text: &str) -> (PathBuf, ConfigFile) {
        (PathBuf::from("/home/u/.config/fleet/fleetctl.toml"), toml::from_str(text).expect("parses"))
    }

    #[test]
    fn the_current_context_fills_in_what_flags_leave_out() {
        let f = file(FILE);
        let s = settings(&Given::default(), Some(&f)).expect("settings");
        assert_eq!(s.endpoint, "https://10.0.0.1:49153,https://10.0.0.2:49153");
        assert_eq!(s.request_timeout, 3.0);
        assert_eq!(s.ca_file, Some(PathBuf::from("/home/u/.config/fleet/pki/ca.pem")), "relative to the file");
        assert_eq!(s.cert_file, Some(PathBuf::from("/etc/fleet/admin.pem")));
        // A flag or its variable wins over the context, setting by setting.
        let given =
            Given { endpoint: Some("https://other:1".into()), ca_file: Some("/ca.pem".into()), ..Given::default() };
        let s = settings(&given, Some(&f)).expect("settings");
        assert_eq!((s.endpoint.as_str(), s.ca_file), ("https://other:1", Some(PathBuf::from("/ca.pem"))));
        assert_eq!(s.cert_file, Some(PathBuf::from("/etc/fleet/admin.pem")));
        // An empty flag is no flag.
        let given = Given { endpoint: Some(String::new()), ..Given::default() };
        assert!(settings(&given, Some(&f)).expect("settings").endpoint.starts_with("https://10.0.0.1"));
    }

    #[test]
    fn without_a_file_or_context_the_defaults_hold() {
        let s = settings(&Given::default(), None).expect("settings");
        assert_eq!((s.endpoint.as_str(), s.request_timeout), (DEFAULT_ENDPOINT, DEFAULT_REQUEST_TIMEOUT));
        assert_eq!((s.ca_file, s.token), (None, None));
        let f = file("[contexts.a]\nendpoints = [\"http://a:1\"]\n");
        assert_eq!(settings(&Given::default(), Some(&f)).expect("settings").endpoint, DEFAULT_ENDPOINT, "no current");
    }

    #[test]
    fn a_token_file_is_read_and_a_missing_one_named() {
        let dir = std::env::temp_dir().join(format!("fleetctl-ctx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("prod.token"), "s3cret\n").expect("token");
        let f = (dir.join("fleetctl.toml"), toml::from_str::<ConfigFile>(FILE).expect("parses"));
        let given = Given { context: Some("prod".into()), ..Given::default() };
        assert_eq!(settings(&given, Some(&f)).expect("settings").token.as_deref(), Some("s3cret"));
        std::fs::remove_file(dir.join("prod.token")).expect("rm");
        let e = settings(&given, Some(&f)).expect_err("no token file");
        assert!(format!("{e:#}").contains("prod.token"), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_contexts_and_bad_files_are_refused_by_name() {
        let f = file(FILE);
        let given = Given { context: Some("staging".into()), ..Given::default() };
        let e = settings(&given, Some(&f)).expect_err("no such context");
        assert!(format!("{e}").contains("\"staging\"") && format!("{e}").contains("lab, prod"), "{e}");
        let e = settings(&given, None).expect_err("no file");
        assert!(format!("{e}").contains("does not exist"), "{e}");

        let dir = std::env::temp_dir().join(format!("fleetctl-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let write = |text: &str| {
            let p = dir.join("c.toml");
            std::fs::write(&p, text).expect("write");
            load(Some(&p)).map(|_| ()).map_err(|e| format!("{e:#}"))
        };
        assert!(write("current = \"x\"\n").is_err_and(|e| e.contains("\"x\"")));
        assert!(write("[contexts.a]\nendpoint = \"typo\"\n").is_err_and(|e| e.contains("endpoint")));
        assert!(write("[contexts.a]\ntoken = \"t\"\ntoken_file = \"f\"\n").is_err_and(|e| e.contains("both")));
        assert!(write("[contexts.a]\nrequest_timeout = -1\n").is_err_and(|e| e.contains("request_timeout")));
        assert!(write("[contexts.a]\nendpoints = [\"http://a:1\"]\n").is_ok());
        let missing = dir.join("missing.toml");
        assert!(load(Some(&missing)).is_err(), "a named file must exist");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_list_marks_the_context_in_use() {
        let f = file(FILE);
        let out = list(&Given::default(), Some(&f)).expect("list");
        assert!(out.contains("* lab\thttps://10.0.0.1:49153,https://10.0.0.2:49153\tcertificate"), "{out}");
        assert!(out.contains("  prod\thttps://prod:49153\ttoken"), "{out}");
        let out = list(&Given { context: Some("prod".into()), ..Given::default() }, Some(&f)).expect("list");
        assert!(out.contains("* prod"), "{out}");
    }
}
