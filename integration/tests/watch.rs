//! Watching etcd the way the engine's view does, against the lab's real etcd.

use etcd_client::WatchOptions;
use fleet_integration::testkit;
use std::time::Duration;

/// A watcher that starts (or falls) behind is caught up by etcd in responses of up to 1,000
/// revisions. With large revisions those responses pass gRPC's default 4 MiB limit; the engine
/// once could not decode them and rewatched from the same revision forever (seen as a new
/// leader that never placed anything at 100,000 units).
#[tokio::test]
async fn a_watcher_far_behind_catches_up_through_responses_over_4_mib() -> anyhow::Result<()> {
    let Some(lab) = testkit::lab() else { return Ok(()) };
    let mut etcd = testkit::etcd(&lab).await?;
    let prefix = format!("/fl-test-watch-{}/", std::process::id());
    let from = etcd.put(format!("{prefix}start"), "x", None).await?.header().map_or(0, |h| h.revision()) + 1;
    let value = "v".repeat(6 * 1024);
    let revisions = 1_000;
    for i in 0..revisions {
        etcd.put(format!("{prefix}k{i:05}"), value.as_str(), None).await?;
    }

    // The premise: etcd batches this backlog into responses too large for a default client.
    let opts = || Some(WatchOptions::new().with_prefix().with_start_revision(from));
    let mut plain = etcd.watch_client().watch(prefix.clone(), opts()).await?;
    let first_events = loop {
        match tokio::time::timeout(Duration::from_secs(10), plain.message()).await? {
            Ok(Some(r)) if r.events().is_empty() => continue,
            other => break other.map(|r| r.map(|r| r.events().len())),
        }
    };
    assert!(first_events.is_err(), "expected a response over 4 MiB to be refused, got {first_events:?}");

    let mut wc = fleet_store::etcd::watch_client(&etcd);
    let mut stream = wc.watch(prefix.clone(), opts()).await?;
    let mut seen = 0;
    while seen < revisions {
        let resp = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await?
            .map_err(|e| anyhow::anyhow!("after {seen} events: {e}"))?
            .ok_or_else(|| anyhow::anyhow!("watch ended after {seen} events"))?;
        seen += resp.events().len();
    }
    assert_eq!(seen, revisions);
    etcd.delete(prefix, Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
    Ok(())
}
