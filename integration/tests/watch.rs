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

/// A paged follower (the engine's view) gets a large listing page by page as etcd answers, the
/// pages together exactly the keys a plain follower gets in one snapshot, then the snapshot that
/// ends the listing (no keys of its own), then the watch's changes.
#[tokio::test]
async fn a_paged_follower_gets_the_listing_in_pages_then_its_end_then_changes() -> anyhow::Result<()> {
    use fleet_store::etcd::{Change, PrefixUpdate};
    let Some(lab) = testkit::lab() else { return Ok(()) };
    let etcd = testkit::etcd(&lab).await?;
    let prefix = format!("/fl-test-pages-{}/", std::process::id());
    // More keys than the first page's 1,000: the listing needs more than one page.
    let total = 2_500;
    let mut kv = etcd.kv_client();
    for chunk in (0..total).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<_> =
            chunk.iter().map(|i| etcd_client::TxnOp::put(format!("{prefix}k{i:05}"), "v", None)).collect();
        kv.txn(etcd_client::Txn::new().and_then(ops)).await?;
    }
    let keys_of = |puts: &[Change]| -> Vec<Vec<u8>> {
        puts.iter().filter_map(|c| if let Change::Put { key, .. } = c { Some(key.clone()) } else { None }).collect()
    };

    let (tx, mut plain) = tokio::sync::mpsc::channel(16);
    tokio::spawn(fleet_store::etcd::follow_prefix(etcd.clone(), prefix.clone(), tx, None));
    let PrefixUpdate::Snapshot { revision: plain_revision, puts } = next_update(&mut plain).await? else {
        anyhow::bail!("a plain follower's first update is not a snapshot");
    };
    let whole = keys_of(&puts);
    assert_eq!(whole.len(), total);

    let (tx, mut paged) = tokio::sync::mpsc::channel(16);
    tokio::spawn(fleet_store::etcd::follow_prefix_paged(etcd.clone(), prefix.clone(), tx, None, None));
    let mut listed = Vec::new();
    let mut pages = Vec::new();
    let revision = loop {
        match next_update(&mut paged).await? {
            PrefixUpdate::Page { first, puts } => {
                pages.push((first, puts.len()));
                listed.extend(keys_of(&puts));
            }
            PrefixUpdate::Snapshot { revision, puts } => {
                assert!(puts.is_empty(), "the snapshot ending a paged listing holds {} keys", puts.len());
                break revision;
            }
            PrefixUpdate::Changes { .. } => anyhow::bail!("changes before the listing ended"),
        }
    };
    assert!(pages.len() >= 2, "{pages:?}");
    assert!(pages[0].0 && pages[1..].iter().all(|(first, _)| !first), "{pages:?}");
    assert_eq!(listed, whole, "the pages together are the plain follower's snapshot");
    // The lab's agents write too: the revision can only have moved on.
    assert!(revision >= plain_revision, "{revision} < {plain_revision}");

    let put = etcd.kv_client().put(format!("{prefix}later"), "v", None).await?;
    let put_revision = put.header().map_or(0, |h| h.revision());
    match next_update(&mut paged).await? {
        PrefixUpdate::Changes { revision, changes } => {
            assert_eq!(revision, put_revision);
            assert_eq!(keys_of(&changes), vec![format!("{prefix}later").into_bytes()]);
        }
        other => anyhow::bail!("expected the put as a change, got {other:?}"),
    }
    etcd.kv_client().delete(prefix, Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
    Ok(())
}

async fn next_update(
    rx: &mut tokio::sync::mpsc::Receiver<fleet_store::etcd::PrefixUpdate>,
) -> anyhow::Result<fleet_store::etcd::PrefixUpdate> {
    let got = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
    got.ok().flatten().ok_or_else(|| anyhow::anyhow!("no update within 30 s"))
}
