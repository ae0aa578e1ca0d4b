//! The in-memory store: etcd's semantics (the contract scenarios, also run against etcd in the
//! lab) and each fault it injects.

use super::*;

fn put(k: &str, v: &str) -> Txn {
    Txn { then: vec![Op::put(k, v, 0)], ..Txn::default() }
}

#[tokio::test]
async fn the_in_memory_store_passes_the_contract() {
    let s = MemStore::new();
    if let Err(e) = contract::all(&s, "/t/").await {
        panic!("{e}");
    }
}

#[tokio::test]
async fn an_unavailable_store_answers_transient_errors_and_changes_nothing() {
    let s = MemStore::new();
    s.set_unavailable(true);
    let r = s.txn(put("/k", "v")).await;
    assert!(r.as_ref().is_err_and(StoreError::is_transient), "{r:?}");
    assert!(s.range(b"/").await.is_err() && s.grant(5).await.is_err());
    s.set_unavailable(false);
    assert_eq!(s.peek(b"/k"), None);
    assert!(s.txn(put("/k", "v")).await.is_ok());
    assert_eq!(s.peek(b"/k"), Some(b"v".to_vec()));
}

#[tokio::test]
async fn refused_transactions_are_not_applied_and_later_ones_are() {
    let s = MemStore::new();
    s.refuse_next_txns(2);
    assert!(s.txn(put("/k", "1")).await.is_err());
    assert!(s.txn(put("/k", "2")).await.is_err());
    // A new store is at revision 1, as a new etcd is.
    assert_eq!((s.peek(b"/k"), s.revision()), (None, 1));
    let ok = s.txn(put("/k", "3")).await;
    assert_eq!(ok.map(|r| r.revision).ok(), Some(2));
    assert_eq!(s.peek(b"/k"), Some(b"3".to_vec()));
}

#[tokio::test(start_paused = true)]
async fn slow_answers_take_their_time() {
    let s = MemStore::new();
    s.set_delay(Duration::from_secs(3));
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(1), s.get(b"/k")).await;
    assert!(r.is_err(), "a caller's timeout fires first");
    assert!(s.get(b"/k").await.is_ok());
    assert!(start.elapsed() >= Duration::from_secs(4));
}

#[tokio::test]
async fn a_lost_watch_closes_and_a_new_one_resumes_from_a_revision() {
    let s = MemStore::new();
    let mut w = s.watch(b"/p/", 1).await.expect("watch");
    s.txn(put("/p/a", "1")).await.expect("put");
    assert_eq!(w.recv().await.and_then(Result::ok).map(|b| b.revision), Some(2));
    s.drop_watches();
    assert!(w.recv().await.is_none(), "the watch ends");
    s.txn(put("/p/b", "2")).await.expect("put");
    let mut again = s.watch(b"/p/", 3).await.expect("rewatch");
    let b = again.recv().await.and_then(Result::ok);
    assert_eq!(b.map(|b| (b.revision, b.events.len())), Some((3, 1)), "nothing missed, nothing repeated");
}

#[tokio::test]
async fn compaction_fails_watches_from_before_it() {
    let s = MemStore::new();
    let mut open = s.watch(b"/p/", 1).await.expect("watch");
    for i in 0..3 {
        s.txn(put(&format!("/p/{i}"), "v")).await.expect("put");
    }
    for _ in 0..3 {
        assert!(matches!(open.recv().await, Some(Ok(_))));
    }
    s.compact(2);
    assert_eq!(open.recv().await, Some(Err(StoreError::Compacted(2))), "an open watch is told");
    assert!(matches!(s.watch(b"/p/", 1).await, Err(StoreError::Compacted(2))));
    let mut w = s.watch(b"/p/", 2).await.expect("from the compaction on");
    assert_eq!(w.recv().await.and_then(Result::ok).map(|b| b.revision), Some(2));
}

#[tokio::test]
async fn an_expired_lease_takes_its_keys_and_watchers_see_them_go() {
    let s = MemStore::new();
    let lease = s.grant(10).await.expect("lease");
    s.txn(Txn { then: vec![Op::put("/m/1", "m", lease), Op::put("/m/2", "kept", 0)], ..Txn::default() })
        .await
        .expect("put");
    let mut w = s.watch(b"/m/", s.revision() + 1).await.expect("watch");
    s.expire_lease(lease);
    let b = w.recv().await.and_then(Result::ok).expect("a delete");
    assert!(matches!(&b.events[..], [Event::Delete { key, .. }] if key == b"/m/1"), "{b:?}");
    assert_eq!((s.peek(b"/m/1"), s.peek(b"/m/2")), (None, Some(b"kept".to_vec())));
    assert!(matches!(s.keep_alive(lease).await, Err(StoreError::LeaseNotFound(_))));
}

#[tokio::test(start_paused = true)]
async fn a_lease_not_renewed_for_its_ttl_expires() {
    let s = MemStore::new();
    let lease = s.grant(5).await.expect("lease");
    s.txn(Txn { then: vec![Op::put("/m", "m", lease)], ..Txn::default() }).await.expect("put");
    tokio::time::advance(Duration::from_secs(4)).await;
    assert_eq!(s.keep_alive(lease).await, Ok(5), "renewed in time");
    tokio::time::advance(Duration::from_secs(4)).await;
    assert!(s.get(b"/m").await.ok().flatten().is_some(), "alive 8 s after the grant: renewed at 4 s");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(s.get(b"/m").await, Ok(None), "gone 6 s after its last renewal");
    assert_eq!(s.time_to_live(lease).await, Ok(None));
}

#[tokio::test]
async fn a_watcher_too_slow_to_keep_up_is_dropped() {
    let s = MemStore::new();
    let mut w = s.watch(b"/p/", 1).await.expect("watch");
    for i in 0..(MEM_WATCH_BUFFER + 10) {
        s.txn(put(&format!("/p/{i}"), "v")).await.expect("put");
    }
    let mut got = 0;
    while let Some(Ok(_)) = w.recv().await {
        got += 1;
    }
    assert_eq!(got, MEM_WATCH_BUFFER, "what was buffered arrives, then the watch ends");
}

#[tokio::test]
async fn requests_are_counted() {
    let s = MemStore::new();
    s.txn(put("/a", "1")).await.expect("put");
    let _ = s.get(b"/a").await;
    let _ = s.range(b"/").await;
    assert_eq!(s.requests(), 3);
}

#[tokio::test(start_paused = true)]
async fn following_a_prefix_survives_lost_watches_and_compaction() {
    let s = MemStore::new();
    s.txn(put("/p/a", "1")).await.expect("put");
    let (tx, mut rx) = mpsc::channel(16);
    tokio::spawn(follow(s.clone(), "/p/".to_string(), tx));
    let first = rx.recv().await;
    assert!(matches!(&first, Some(PrefixUpdate::Snapshot { revision: 2, puts }) if puts.len() == 1), "{first:?}");
    s.txn(put("/p/b", "2")).await.expect("put");
    assert!(matches!(rx.recv().await, Some(PrefixUpdate::Changes { revision: 3, .. })));
    // A lost watch: the next change still arrives, once.
    s.drop_watches();
    s.txn(put("/p/c", "3")).await.expect("put");
    let next = rx.recv().await;
    assert!(matches!(&next, Some(PrefixUpdate::Changes { revision: 4, changes }) if changes.len() == 1), "{next:?}");
    // Compaction past what the follower saw while its watch was gone: a new snapshot.
    s.drop_watches();
    s.txn(put("/p/d", "4")).await.expect("put");
    s.txn(put("/q/x", "elsewhere")).await.expect("put");
    s.compact(6);
    let again = rx.recv().await;
    assert!(
        matches!(&again, Some(PrefixUpdate::Snapshot { revision: 6, puts }) if puts.len() == 4),
        "everything under the prefix, as of the compaction: {again:?}"
    );
}
