//! The dashboard in a real browser (headless Chromium) against the fault lab: an anonymous
//! visitor gets the sign-in prompt and no data; signed in with a read token, the page shows
//! every machine; a unit started with fleetctl appears, active, without a reload; a machine cut
//! off shows as lost and its unit moving to another. Screenshots go to target/dashboard/ (kept
//! by CI as artifacts).

use super::*;
use fleet_integration::browser::{self, Browser};

fn shots() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard")
}

/// A JavaScript string literal.
fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_dashboard_shows_the_cluster_live_in_a_browser() {
    if browser::chromium().is_none() {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "chromium is not installed (.ci/run installs it)");
        eprintln!("skipped: chromium is not installed");
        return;
    }
    let Some(mut lab) = fault_lab("fault-dashboard").await else { return };
    let url = format!("{}/", lab.api());
    let machines: Vec<String> = lab.state.machines.iter().map(|m| m.machine_id.clone()).collect();
    let mut b = Browser::start(1400, 900).await.expect("chromium");
    b.navigate(&url).await.expect("navigate");

    // Anonymous: the sign-in prompt, and not one machine id on the page.
    b.wait_for("the sign-in prompt", "!document.getElementById('login').hidden", T).await.expect("login prompt");
    let text = b.eval("document.body.innerText").await.expect("text").as_str().unwrap_or_default().to_string();
    assert!(machines.iter().all(|m| !text.contains(&m[..8])), "an anonymous visitor sees data:\n{text}");
    b.screenshot(&shots().join("0-sign-in.png")).await.expect("screenshot");

    // Signed in with the read token (the least role that may look).
    let token = fleet_integration::pki::token("read").expect("read token");
    b.eval(&format!(
        "document.getElementById('token').value = {}; document.getElementById('login-form').requestSubmit(); true",
        js(&token)
    ))
    .await
    .expect("sign in");
    let all_machines = format!(
        "{}.every(id => document.querySelector(`#machines [data-machine=\"${{id}}\"]`) !== null)",
        serde_json::to_string(&machines).unwrap_or_default()
    );
    b.wait_for("every machine listed", &all_machines, T).await.expect("machines shown");
    // From here on, a reload would lose this mark.
    b.eval("window.flMark = 'no reload'; true").await.expect("mark");

    // A unit started with fleetctl shows up, active, by itself.
    // It declares its health (healthy after 2 s active): that shows too, from its event.
    let f = lab.file("fl-dash.service", "MinHealthyTime=2s\n");
    lab.ok(&["start", &f]);
    let row = "document.querySelector('#units [data-unit=\"fl-dash.service\"]')";
    b.wait_for("the unit active in its row", &format!("{row} !== null && {row}.innerText.includes('active')"), T)
        .await
        .expect("unit shown live");
    b.wait_for("its events in the feed", "document.getElementById('events').innerText.includes('unit-started')", T)
        .await
        .expect("events shown");
    b.wait_for("its health in its row", &format!("{row}.innerText.includes('healthy')"), T)
        .await
        .expect("health shown live");
    assert_eq!(b.eval("window.flMark").await.expect("mark").as_str(), Some("no reload"), "the page reloaded");
    b.screenshot(&shots().join("1-unit-started.png")).await.expect("screenshot");

    // Cut its machine off: the page shows the machine lost and the unit moving elsewhere.
    let placed = lab.placement();
    let from = placed.get("fl-dash.service").cloned().expect("placed");
    let from_id = lab.machine(&from).machine_id;
    let _cut = Cut::new(&lab.state, &from);
    let gone = format!("document.querySelector('#machines [data-machine=\"{from_id}\"]') === null");
    b.wait_for("the cut machine gone from the list", &gone, T).await.expect("machine lost shown");
    let feed = "document.getElementById('events').innerText";
    b.wait_for(
        "machine-lost and unit-moved in the feed",
        &format!("{feed}.includes('machine-lost') && {feed}.includes('unit-moved')"),
        T,
    )
    .await
    .expect("move shown");
    let moved = format!(
        "{row} !== null && !{row}.innerText.includes({}) && {row}.innerText.includes('active')",
        js(&from_id[..8])
    );
    b.wait_for("the unit active on another machine", &moved, T).await.expect("unit moved shown");
    assert_eq!(b.eval("window.flMark").await.expect("mark").as_str(), Some("no reload"), "the page reloaded");
    b.screenshot(&shots().join("2-machine-lost.png")).await.expect("screenshot");

    // A unit's detail: its file, status and events.
    b.eval(&format!("{row}.click(); true")).await.expect("open detail");
    b.wait_for("the unit's detail", "document.getElementById('detail-file').innerText.includes('ExecStart')", T)
        .await
        .expect("detail shown");
    b.wait_for(
        "its events in the detail",
        "document.getElementById('detail-events').innerText.includes('unit-moved')",
        T,
    )
    .await
    .expect("detail events");
    b.screenshot(&shots().join("3-unit-detail.png")).await.expect("screenshot");
}
