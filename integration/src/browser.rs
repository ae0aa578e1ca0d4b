//! A real browser for the dashboard's tests: Debian's `chromium`, headless, driven over the
//! DevTools protocol (JSON over a websocket): navigate, evaluate script in the page, take
//! screenshots. Nothing is simulated: the page runs its own script against the engine.

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One headless Chromium with one page; killed when dropped.
pub struct Browser {
    child: Child,
    page: Socket,
    next_id: u64,
    _profile: tempdir::Profile,
}

mod tempdir {
    /// The browser's profile directory, removed with it.
    pub struct Profile(pub std::path::PathBuf);
    impl Drop for Profile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `chromium` on PATH, if installed.
pub fn chromium() -> Option<std::path::PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"].iter().map(std::path::PathBuf::from).find(|p| p.exists())
}

impl Browser {
    /// Starts Chromium with an empty profile and a window of `width`x`height`, and attaches to
    /// its page. TLS errors are ignored for this browser: it talks to the lab's engine, whose CA
    /// no browser knows (the API's TLS is tested elsewhere).
    pub async fn start(width: u32, height: u32) -> Result<Browser> {
        let exe = chromium().context("chromium is not installed (apt install chromium)")?;
        let profile = crate::process::scratch_dir(&std::env::temp_dir(), "fl-chromium")?;
        let mut child = Command::new(exe)
            .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions"])
            .args(["--disable-dev-shm-usage", "--remote-debugging-port=0", "--hide-scrollbars"])
            .arg("--ignore-certificate-errors")
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--window-size={width},{height}"))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start chromium")?;
        let profile = tempdir::Profile(profile);
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID" on stderr.
        let stderr = child.stderr.take().context("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let browser_url =
            rx.recv_timeout(Duration::from_secs(30)).context("chromium did not open its DevTools port")?;
        let port = browser_url
            .strip_prefix("ws://127.0.0.1:")
            .and_then(|r| r.split('/').next())
            .context("unexpected DevTools address")?
            .to_string();
        let targets: Value = reqwest::get(format!("http://127.0.0.1:{port}/json/list")).await?.json().await?;
        let page_url = targets
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .context("no page target")?
            .to_string();
        let (page, _) = tokio_tungstenite::connect_async(page_url).await.context("cannot attach to the page")?;
        let mut b = Browser { child, page, next_id: 0, _profile: profile };
        b.call("Page.enable", json!({})).await?;
        b.call("Security.setIgnoreCertificateErrors", json!({ "ignore": true })).await?;
        Ok(b)
    }

    /// One DevTools command; its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.page.send(Message::Text(msg.into())).await?;
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, self.page.next()).await.context(format!("{method}: no answer"))?;
            let Some(msg) = msg else { bail!("{method}: the browser went away") };
            let Message::Text(text) = msg? else { continue };
            let v: Value = serde_json::from_str(&text)?;
            if v["id"].as_u64() != Some(id) {
                continue; // an event, or another command's answer
            }
            if let Some(e) = v.get("error") {
                bail!("{method}: {e}");
            }
            return Ok(v["result"].clone());
        }
    }

    pub async fn navigate(&mut self, url: &str) -> Result<()> {
        self.call("Page.navigate", json!({ "url": url })).await?;
        Ok(())
    }

    /// Evaluates `expression` in the page (awaiting a promise); its value as JSON.
    pub async fn eval(&mut self, expression: &str) -> Result<Value> {
        let r = self
            .call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }))
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("script failed: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Waits up to `limit` for `expression` to be true in the page.
    pub async fn wait_for(&mut self, what: &str, expression: &str, limit: Duration) -> Result<()> {
        let until = Instant::now() + limit;
        loop {
            if self.eval(expression).await.ok().and_then(|v| v.as_bool()) == Some(true) {
                return Ok(());
            }
            if Instant::now() > until {
                let text = self.eval("document.body.innerText").await.unwrap_or_default();
                bail!("{what}: not seen within {limit:?}; the page shows:\n{}", text.as_str().unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of the page as it is now.
    pub async fn screenshot(&mut self, path: &Path) -> Result<()> {
        use base64::Engine as _;
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" })).await?;
        let png = base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap_or_default())?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("cannot write {}", path.display()))
    }
}
