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

/// The engine's view checks now and then that it holds as many keys as etcd has under its
/// prefix at the revision it reached, and relists only if not (a relist at a million units costs
/// the engines ~21 CPU-seconds). Creations, overwrites, single and ranged deletions, a key
/// deleted and created again, and keys gone with their lease must all be counted right: a
/// follower that miscounted would relist on every check.
#[tokio::test]
async fn a_follower_that_checks_its_count_relists_nothing_that_it_followed() -> anyhow::Result<()> {
    use fleet_store::etcd::{Change, PrefixUpdate};
    use std::collections::BTreeSet;
    let Some(lab) = testkit::lab() else { return Ok(()) };
    let etcd = testkit::etcd(&lab).await?;
    let prefix = format!("/fl-test-count-{}/", std::process::id());
    let mut kv = etcd.kv_client();
    for i in 0..20 {
        kv.put(format!("{prefix}before{i:02}"), "v", None).await?;
    }

    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let every = Duration::from_millis(200);
    tokio::spawn(fleet_store::etcd::follow_prefix(etcd.clone(), prefix.clone(), tx, Some(every)));
    let PrefixUpdate::Snapshot { puts, .. } = next_update(&mut rx).await? else {
        anyhow::bail!("the first update is not a snapshot");
    };
    let mut held: BTreeSet<Vec<u8>> = BTreeSet::new();
    for c in puts {
        if let Change::Put { key, .. } = c {
            held.insert(key);
        }
    }
    assert_eq!(held.len(), 20);

    let key = |s: &str| format!("{prefix}{s}");
    for i in 0..30 {
        kv.put(key(&format!("new{i:02}")), "v", None).await?;
    }
    for i in 0..10 {
        kv.put(key(&format!("new{i:02}")), "changed", None).await?;
    }
    for i in 0..5 {
        kv.delete(key(&format!("before{i:02}")), None).await?;
    }
    // A ranged deletion: before10..before19.
    kv.delete(key("before1"), Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
    kv.delete(key("new29"), None).await?;
    kv.put(key("new29"), "again", None).await?;
    // Creations and a deletion in one transaction (one revision).
    let ops = vec![
        etcd_client::TxnOp::put(key("txn-a"), "v", None),
        etcd_client::TxnOp::put(key("txn-b"), "v", None),
        etcd_client::TxnOp::delete(key("new28"), None),
    ];
    kv.txn(etcd_client::Txn::new().and_then(ops)).await?;
    // Keys gone with their lease, as a lost machine's are.
    let mut lc = etcd.lease_client();
    let lease = lc.grant(30, None).await?.id();
    for i in 0..5 {
        kv.put(key(&format!("leased{i}")), "v", Some(etcd_client::PutOptions::new().with_lease(lease))).await?;
    }
    lc.revoke(lease).await?;
    let last = kv.put(key("last"), "v", None).await?.header().map_or(0, |h| h.revision());

    // Everything arrives as changes, then a dozen checks pass with nothing new to follow.
    let until = tokio::time::Instant::now() + 12 * every;
    let mut reached = 0;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let Ok(update) = tokio::time::timeout(left, rx.recv()).await else { break };
        match update {
            Some(PrefixUpdate::Changes { revision, changes }) => {
                reached = reached.max(revision);
                for c in changes {
                    match c {
                        Change::Put { key, .. } => held.insert(key),
                        Change::Delete { key, .. } => held.remove(&key),
                    };
                }
            }
            Some(PrefixUpdate::Snapshot { revision, puts }) => {
                anyhow::bail!(
                    "the follower relisted at revision {revision} ({} keys) a prefix it followed in full",
                    puts.len()
                )
            }
            Some(other) => anyhow::bail!("unexpected {other:?}"),
            None => anyhow::bail!("the follower stopped"),
        }
    }
    assert!(reached >= last, "changes up to {reached}, the last write at {last}");
    let in_etcd = kv.get(prefix.clone(), Some(etcd_client::GetOptions::new().with_prefix().with_count_only())).await?;
    assert_eq!(held.len() as i64, in_etcd.count(), "the changes followed are etcd's keys");
    kv.delete(prefix, Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
    Ok(())
}
