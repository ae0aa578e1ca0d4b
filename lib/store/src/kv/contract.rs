//! What any [`Store`] must do, as scenarios run against both implementations: the in-memory one
//! in this crate's unit tests, etcd in the lab (`integration/tests/store.rs`), so the in-memory
//! store is known to answer as etcd does. Each scenario works under its own `prefix` and assumes
//! nothing about other writers (etcd's revision is shared): only revisions it wrote itself are
//! compared.

use super::*;

type Check = Result<(), String>;

fn check(ok: bool, what: impl FnOnce() -> String) -> Check {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

fn key(prefix: &str, k: &str) -> Vec<u8> {
    format!("{prefix}{k}").into_bytes()
}

fn err(e: StoreError) -> String {
    e.to_string()
}

/// Creating a key only if absent, then updating it only if unchanged since: the guard every
/// fleet write carries.
pub async fn guarded_writes<S: Store>(s: &S, prefix: &str) -> Check {
    let k = key(prefix, "unit");
    let create = |v: &str| Txn {
        when: vec![Compare::create_revision(k.clone(), CmpOp::Equal, 0)],
        then: vec![Op::put(k.clone(), v, 0)],
        otherwise: vec![Op::Get(k.clone())],
    };
    let first = s.txn(create("v1")).await.map_err(err)?;
    check(first.succeeded, || format!("creating an absent key: {first:?}"))?;
    let second = s.txn(create("v2")).await.map_err(err)?;
    check(!second.succeeded, || format!("creating it again must fail: {second:?}"))?;
    let Some(OpResult::Get(Some(e))) = second.results.first() else {
        return Err(format!("the failed branch reads the key: {second:?}"));
    };
    check(e.value == b"v1" && e.create_revision == first.revision && e.mod_revision == first.revision, || {
        format!("created at the first write's revision {}: {e:?}", first.revision)
    })?;
    check(second.revision >= first.revision, || format!("revisions never go back: {second:?}"))?;
    let update = |rev: i64, v: &str| Txn {
        when: vec![Compare::mod_revision(k.clone(), CmpOp::Equal, rev)],
        then: vec![Op::put(k.clone(), v, 0)],
        otherwise: vec![],
    };
    let third = s.txn(update(first.revision, "v3")).await.map_err(err)?;
    check(third.succeeded && third.revision > first.revision, || format!("update if unchanged: {third:?}"))?;
    let stale = s.txn(update(first.revision, "v4")).await.map_err(err)?;
    check(!stale.succeeded, || format!("an update from a stale revision must fail: {stale:?}"))?;
    let now = s.get(&k).await.map_err(err)?;
    check(
        now.as_ref().is_some_and(|e| {
            e.value == b"v3" && e.create_revision == first.revision && e.mod_revision == third.revision
        }),
        || format!("after the update: {now:?}"),
    )?;
    let gone = s.txn(Txn { then: vec![Op::delete(k.clone()), Op::delete(k.clone())], ..Txn::default() }).await;
    let gone = gone.map_err(err)?;
    check(gone.results == [OpResult::Delete { deleted: 1 }, OpResult::Delete { deleted: 0 }], || {
        format!("a delete says whether it deleted: {gone:?}")
    })?;
    let value_guard = Txn {
        when: vec![Compare::value(k.clone(), CmpOp::Equal, "v3")],
        then: vec![Op::put(k.clone(), "v5", 0)],
        otherwise: vec![],
    };
    let missing = s.txn(value_guard).await.map_err(err)?;
    check(!missing.succeeded, || format!("a value compare on a missing key fails: {missing:?}"))
}

/// A prefix lists its keys in order, and only its keys.
pub async fn prefix_listing<S: Store>(s: &S, prefix: &str) -> Check {
    let ops = ["a/2", "a/1", "b/1", "a"].iter().map(|k| Op::put(key(prefix, k), *k, 0)).collect();
    let w = s.txn(Txn { then: ops, ..Txn::default() }).await.map_err(err)?;
    let (entries, revision) = s.range(&key(prefix, "a/")).await.map_err(err)?;
    let keys: Vec<Vec<u8>> = entries.iter().map(|e| e.key.clone()).collect();
    check(keys == [key(prefix, "a/1"), key(prefix, "a/2")], || format!("listing {prefix}a/: {entries:?}"))?;
    check(revision >= w.revision, || format!("listed at {revision}, before the write at {}", w.revision))?;
    check(entries.iter().all(|e| e.mod_revision == w.revision), || format!("one revision per transaction: {entries:?}"))
}

/// A listing longer than etcd's page (2,500 keys) comes whole, in key order, at one revision.
pub async fn long_listing<S: Store>(s: &S, prefix: &str) -> Check {
    const KEYS: usize = 2_500;
    let mut last = 0;
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(100) {
        let ops = chunk.iter().map(|i| Op::put(key(prefix, &format!("k/{i:05}")), "v", 0)).collect();
        last = s.txn(Txn { then: ops, ..Txn::default() }).await.map_err(err)?.revision;
    }
    let (entries, revision) = s.range(&key(prefix, "k/")).await.map_err(err)?;
    let want: Vec<Vec<u8>> = (0..KEYS).map(|i| key(prefix, &format!("k/{i:05}"))).collect();
    let keys: Vec<Vec<u8>> = entries.iter().map(|e| e.key.clone()).collect();
    check(keys == want, || format!("{} keys listed of {KEYS} (first {:?})", keys.len(), keys.first()))?;
    check(revision >= last, || format!("listed at {revision}, before the last write at {last}"))?;
    // A key written after the listing is in the next one.
    s.txn(Txn { then: vec![Op::put(key(prefix, "k/99999"), "late", 0)], ..Txn::default() }).await.map_err(err)?;
    let (again, _) = s.range(&key(prefix, "k/")).await.map_err(err)?;
    check(again.len() == KEYS + 1, || format!("the next listing has {} keys", again.len()))
}

/// Keys on a lease live as long as the lease; a put on a lease that is gone writes nothing.
pub async fn leases<S: Store>(s: &S, prefix: &str) -> Check {
    let lease = s.grant(30).await.map_err(err)?;
    let k = key(prefix, "machine");
    s.txn(Txn { then: vec![Op::put(k.clone(), "m", lease)], ..Txn::default() }).await.map_err(err)?;
    let got = s.get(&k).await.map_err(err)?;
    check(got.as_ref().is_some_and(|e| e.lease == lease), || format!("a key on lease {lease:x}: {got:?}"))?;
    let ttl = s.time_to_live(lease).await.map_err(err)?;
    check(ttl.is_some_and(|t| t > 0 && t <= 30), || format!("time to live of a fresh lease: {ttl:?}"))?;
    // Take over one's own record, never another's (the agent's registration): create it, or
    // else replace it only if it is on this lease.
    let register = |lease: i64, v: &str| Txn {
        when: vec![Compare::create_revision(k.clone(), CmpOp::Equal, 0)],
        then: vec![Op::put(k.clone(), v, lease)],
        otherwise: vec![Op::Txn(Box::new(Txn {
            when: vec![Compare::lease(k.clone(), CmpOp::Equal, lease)],
            then: vec![Op::put(k.clone(), v, lease)],
            otherwise: vec![],
        }))],
    };
    let again = s.txn(register(lease, "m2")).await.map_err(err)?;
    check(!again.succeeded && matches!(&again.results[..], [OpResult::Txn(t)] if t.succeeded), || {
        format!("taking over a record on one's own lease: {again:?}")
    })?;
    let other = s.grant(30).await.map_err(err)?;
    let foreign = s.txn(register(other, "intruder")).await.map_err(err)?;
    check(!foreign.succeeded && matches!(&foreign.results[..], [OpResult::Txn(t)] if !t.succeeded), || {
        format!("a record on another lease is left alone: {foreign:?}")
    })?;
    s.revoke(other).await.map_err(err)?;
    let got = s.get(&k).await.map_err(err)?;
    check(got.as_ref().is_some_and(|e| e.value == b"m2"), || format!("the record after both: {got:?}"))?;
    let renewed = s.keep_alive(lease).await.map_err(err)?;
    check(renewed == 30, || format!("a renewal answers the TTL: {renewed}"))?;
    s.revoke(lease).await.map_err(err)?;
    let after = s.get(&k).await.map_err(err)?;
    check(after.is_none(), || format!("the key went with its lease: {after:?}"))?;
    let ttl = s.time_to_live(lease).await.map_err(err)?;
    check(ttl.is_none(), || format!("a revoked lease has no time left: {ttl:?}"))?;
    let late = s.txn(Txn { then: vec![Op::put(k.clone(), "late", lease)], ..Txn::default() }).await;
    check(matches!(late, Err(StoreError::LeaseNotFound(_))), || format!("a put on a revoked lease: {late:?}"))?;
    let after = s.get(&k).await.map_err(err)?;
    check(after.is_none(), || format!("nothing written by the refused put: {after:?}"))?;
    let renew = s.keep_alive(lease).await;
    check(matches!(renew, Err(StoreError::LeaseNotFound(_))), || format!("renewing a revoked lease: {renew:?}"))
}

/// A watch from a revision sees every change under its prefix from there, in order, one batch
/// per revision; changes elsewhere are not seen.
pub async fn watches<S: Store>(s: &S, prefix: &str) -> Check {
    let k = key(prefix, "w/x");
    let first = s.txn(Txn { then: vec![Op::put(k.clone(), "1", 0)], ..Txn::default() }).await.map_err(err)?;
    let mut w = s.watch(&key(prefix, "w/"), first.revision).await.map_err(err)?;
    s.txn(Txn { then: vec![Op::put(key(prefix, "other"), "o", 0)], ..Txn::default() }).await.map_err(err)?;
    let del = s.txn(Txn { then: vec![Op::delete(k.clone())], ..Txn::default() }).await.map_err(err)?;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), w.recv()).await {
            Ok(Some(Ok(b))) => seen.push(b),
            other => return Err(format!("watch ended early: {other:?} after {seen:?}")),
        }
    }
    check(
        seen[0].revision == first.revision && matches!(&seen[0].events[..], [Event::Put(e)] if e.value == b"1"),
        || format!("the history from the watch's revision first: {seen:?}"),
    )?;
    check(
        seen[1].revision == del.revision && matches!(&seen[1].events[..], [Event::Delete { key, .. }] if *key == k),
        || format!("then the delete, and nothing from outside the prefix: {seen:?}"),
    )
}

/// Every scenario, each under its own part of `prefix`.
pub async fn all<S: Store>(s: &S, prefix: &str) -> Check {
    guarded_writes(s, &format!("{prefix}guarded/")).await.map_err(|e| format!("guarded writes: {e}"))?;
    prefix_listing(s, &format!("{prefix}listing/")).await.map_err(|e| format!("prefix listing: {e}"))?;
    long_listing(s, &format!("{prefix}long/")).await.map_err(|e| format!("long listing: {e}"))?;
    leases(s, &format!("{prefix}leases/")).await.map_err(|e| format!("leases: {e}"))?;
    watches(s, &format!("{prefix}watches/")).await.map_err(|e| format!("watches: {e}"))
}
