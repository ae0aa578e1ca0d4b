//! Connecting to etcd and following a prefix, the same way from every fleet process.

use crate::kv::prefix_end;
use crate::retry::{RetryError, RetryPolicy};
use etcd_client::{EventType, GetOptions, WatchOptions};
use std::time::Duration;
use tokio::sync::mpsc;

pub use etcd_client::Client;

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// CA and client certificate for `https://` endpoints (see [`crate::tls::ClientTls`]).
    pub tls: Option<etcd_client::TlsOptions>,
}

/// Connects with a connect timeout and a per-request timeout, retrying the first connection so a
/// daemon started just before etcd does not exit.
pub async fn connect(cfg: &EtcdConfig, policy: RetryPolicy) -> Result<Client, RetryError<etcd_client::Error>> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(cfg.request_timeout)
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
        .with_keep_alive_while_idle(true);
    let opts = match &cfg.tls {
        Some(tls) => opts.with_tls(tls.clone()),
        None => opts,
    };
    let what = format!("connect to etcd at {}", cfg.endpoints.join(","));
    policy.run(&what, |_| true, || Client::connect(cfg.endpoints.clone(), Some(opts.clone()))).await
}

/// etcd's answer to a request authorised against an older auth store than the one it is applied
/// to: a user or role changed in between (a machine joining creates its user). The request was
/// not applied; etcd's own Go client retries it, and so do we.
const AUTH_OLD_REVISION: &str = "revision of auth store is old";

/// Errors worth another attempt: the transport and unavailability, and a request that raced an
/// auth change; not a refused request.
pub fn is_transient(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            matches!(
                s.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Aborted | Code::Cancelled
            ) || (s.code() == Code::InvalidArgument && s.message().contains(AUTH_OLD_REVISION))
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// Longest wait between attempts to re-establish a watch. Short: with several etcd members a
/// failed attempt usually just picked a dead one, and the next may pick a live one.
const MAX_REWATCH_BACKOFF: Duration = Duration::from_secs(1);

/// One key's change, as seen by a prefix follower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
        mod_revision: i64,
    },
    /// `mod_revision` is the revision of the deletion itself.
    Delete {
        key: Vec<u8>,
        mod_revision: i64,
    },
}

/// What a prefix follower delivers, in revision order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixUpdate {
    /// The whole prefix as of `revision`; replaces everything delivered before. Sent first, and
    /// again whenever the watch fell behind etcd's compaction and history was lost.
    Snapshot { revision: i64, puts: Vec<Change> },
    /// A page of a listing still under way, sent only to followers that ask for pages
    /// ([`follow_prefix_paged`]), so they take in a large listing while the rest of it is read.
    /// The `Snapshot` that ends the listing completes it: that listing is every page from the
    /// last one marked `first`, then the snapshot's own `puts`. A listing that fails part way
    /// and is read again starts again with a `first` page.
    Page { first: bool, puts: Vec<Change> },
    /// Changes up to and including `revision`.
    Changes { revision: i64, changes: Vec<Change> },
}

impl PrefixUpdate {
    /// A snapshot from a prefix listing.
    pub fn snapshot(resp: &etcd_client::GetResponse) -> PrefixUpdate {
        let puts = resp
            .kvs()
            .iter()
            .map(|kv| Change::Put {
                key: kv.key().to_vec(),
                value: kv.value().to_vec(),
                lease: kv.lease(),
                mod_revision: kv.mod_revision(),
            })
            .collect();
        PrefixUpdate::Snapshot { revision: resp.header().map(|h| h.revision()).unwrap_or(0), puts }
    }
}

/// Keys in the first page when listing a prefix; later pages are sized from the bytes per key
/// seen so far (see [`next_page`]).
const LIST_PAGE: i64 = 1000;
/// Bytes a listing page aims at: well under [`MAX_WATCH_RESPONSE`], which lists also accept, so
/// a page of keys 30 times larger than those before it still decodes.
const LIST_PAGE_BYTES: usize = 8 << 20;
/// The most keys one page asks for.
const LIST_PAGE_MAX: i64 = 100_000;

/// The next page's size in keys, from the keys and bytes listed so far.
///
/// etcd (3.4 and 3.5) walks the whole remaining range of its index for every page it answers,
/// to count it: listing N keys in pages of P costs O(N²/P). At a million units (two million keys)
/// pages of 1,000 made a new engine's first listing take 100 s; pages sized to ~8 MiB of small
/// records are a hundred times fewer.
fn next_page(keys: usize, bytes: usize) -> i64 {
    if keys == 0 {
        return LIST_PAGE;
    }
    let per_key = (bytes / keys).max(1);
    ((LIST_PAGE_BYTES / per_key) as i64).clamp(LIST_PAGE, LIST_PAGE_MAX)
}

/// Lists every key under `prefix` as one consistent snapshot (all pages read at the revision of
/// the first), in pages of about [`LIST_PAGE_BYTES`].
pub async fn list_prefix(client: &Client, prefix: &str) -> Result<PrefixUpdate, etcd_client::Error> {
    let (revision, puts, _) = list_prefix_paged(client, prefix, None).await?;
    Ok(PrefixUpdate::Snapshot { revision, puts })
}

/// [`list_prefix`]; with `pages`, each page goes there as a [`PrefixUpdate::Page`] as soon as it
/// is read, and what is returned (the listing's revision and keys) holds none of them. The
/// number of keys listed comes last, pages or not.
async fn list_prefix_paged(
    client: &Client,
    prefix: &str,
    pages: Option<&mpsc::Sender<PrefixUpdate>>,
) -> Result<(i64, Vec<Change>, usize), etcd_client::Error> {
    let listing = std::time::Instant::now();
    let end = prefix_end(prefix.as_bytes());
    let mut kv = client.kv_client().max_decoding_message_size(MAX_WATCH_RESPONSE);
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut puts = Vec::new();
    let (mut keys, mut bytes) = (0usize, 0usize);
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(next_page(keys, bytes));
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let mut resp = kv.get(from.clone(), Some(opts)).await?;
        let first = revision == 0;
        if first {
            revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        let more = resp.more();
        // Moved out of the response, not copied: a million units' keys and values pass here.
        for kv in resp.take_kvs() {
            let (lease, mod_revision) = (kv.lease(), kv.mod_revision());
            let (key, value) = kv.into_key_value();
            keys += 1;
            bytes += key.len() + value.len();
            puts.push(Change::Put { key, value, lease, mod_revision });
        }
        let next = match puts.last() {
            Some(Change::Put { key, .. }) if more => {
                let mut next = key.clone();
                next.push(0);
                Some(next)
            }
            _ => None,
        };
        if let Some(tx) = pages {
            // A follower gone: the snapshot cannot be delivered either, and its follow ends.
            if tx.send(PrefixUpdate::Page { first, puts: std::mem::take(&mut puts) }).await.is_err() {
                return Ok((revision, Vec::new(), keys));
            }
        }
        match next {
            Some(next) => from = next,
            None => {
                tracing::info!(%prefix, keys, ms = listing.elapsed().as_millis() as u64, "listed");
                return Ok((revision, puts, keys));
            }
        }
    }
}

/// The largest watch response a client accepts. A watcher that fell behind (a busy engine during
/// a large placement) is caught up by etcd in responses of up to 1,000 revisions each, which at
/// 100,000 units came to several MiB: past gRPC's default 4 MiB the response cannot be decoded,
/// and a rewatch from the same revision fails the same way forever.
pub const MAX_WATCH_RESPONSE: usize = 256 << 20;

/// A watch client that accepts responses up to [`MAX_WATCH_RESPONSE`].
pub fn watch_client(client: &Client) -> etcd_client::WatchClient {
    client.watch_client().max_decoding_message_size(MAX_WATCH_RESPONSE)
}

/// Follows `prefix` for as long as `tx` is open: a snapshot, then watch events from the next
/// revision; reconnects with backoff from the last revision seen, and relists after compaction.
/// This is the only way fleet processes read etcd continuously, so no one polls.
///
/// With `verify`, the follower checks that often that it holds as many keys as etcd has under
/// the prefix at the revision it reached, and relists if not: a safety net against a missed
/// event that costs etcd a count, where relisting costs it and the follower the whole prefix
/// (engines use it; agents do not, so an idle agent has no timers).
pub async fn follow_prefix(client: Client, prefix: String, tx: mpsc::Sender<PrefixUpdate>, verify: Option<Duration>) {
    follow(client, prefix, tx, verify, None, false).await
}

/// [`follow_prefix`], restarting the watch (from the last revision seen) whenever `kick` is
/// notified, and delivering each listing page by page ([`PrefixUpdate::Page`]): a follower
/// that takes in a million keys does so while etcd reads the next page, rather than after.
pub async fn follow_prefix_paged(
    client: Client,
    prefix: String,
    tx: mpsc::Sender<PrefixUpdate>,
    verify: Option<Duration>,
    kick: Option<std::sync::Arc<tokio::sync::Notify>>,
) {
    follow(client, prefix, tx, verify, kick, true).await
}

/// How long a follower waits for etcd to count its prefix; a check not answered in time is
/// skipped until the next one.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// The keys a follower holds, kept from its listing and the watch's creations and deletions, to
/// be compared with etcd's count at the same revision.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct KeyCount(i64);

impl KeyCount {
    fn listed(keys: usize) -> Self {
        KeyCount(keys as i64)
    }

    /// A put whose key is at its first version created the key (again, after a deletion); any
    /// other put changed a key already counted.
    fn put(&mut self, version: i64) {
        if version == 1 {
            self.0 += 1;
        }
    }

    fn delete(&mut self) {
        self.0 -= 1;
    }

    /// Whether etcd's count at the revision this follower reached says it missed something.
    fn differs_from(self, etcd: i64) -> bool {
        self.0 != etcd
    }
}

/// etcd's count of the keys under `prefix` at `revision`; `None` when not answered (a busy etcd,
/// or the revision compacted away): the follower asks again next time.
async fn count_at(client: &Client, prefix: &str, revision: i64) -> Option<i64> {
    let opts = GetOptions::new().with_range(prefix_end(prefix.as_bytes())).with_count_only().with_revision(revision);
    let mut kv = client.kv_client();
    match tokio::time::timeout(VERIFY_TIMEOUT, kv.get(prefix, Some(opts))).await {
        Ok(Ok(resp)) => Some(resp.count()),
        Ok(Err(e)) => {
            tracing::debug!(%prefix, revision, error = %e, "cannot count the prefix; checking again later");
            None
        }
        Err(_) => None,
    }
}

async fn follow(
    client: Client,
    prefix: String,
    tx: mpsc::Sender<PrefixUpdate>,
    verify: Option<Duration>,
    kick: Option<std::sync::Arc<tokio::sync::Notify>>,
    paged: bool,
) {
    // Each page of a listing is bounded by the client's request timeout; the whole listing (a
    // few hundred pages at 100,000 units, seconds on a busy etcd) must not be, or a large view
    // is retried from scratch forever.
    let policy = RetryPolicy { attempts: u32::MAX, timeout: Duration::from_secs(300), ..RetryPolicy::default() };
    let mut revision: Option<i64> = None;
    let mut held = KeyCount::default();
    // Kept across rewatches: a watch restarted often (kicks, a flaky member) still gets checked.
    let mut verify_at = verify.map(|d| tokio::time::Instant::now() + d);
    let mut backoff = Duration::from_millis(100);
    loop {
        if tx.is_closed() {
            return;
        }
        let start = match revision {
            Some(r) => r + 1,
            None => {
                let pages = paged.then_some(&tx);
                let got = policy.run("list prefix", is_transient, || list_prefix_paged(&client, &prefix, pages)).await;
                let (rev, puts, keys) = match got {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(%prefix, error = %e, "cannot list prefix");
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                };
                if tx.send(PrefixUpdate::Snapshot { revision: rev, puts }).await.is_err() {
                    return;
                }
                revision = Some(rev);
                held = KeyCount::listed(keys);
                verify_at = verify.map(|d| tokio::time::Instant::now() + d);
                rev + 1
            }
        };
        let mut watch_client = watch_client(&client);
        let opts = WatchOptions::new().with_prefix().with_start_revision(start).with_progress_notify();
        let mut stream = match watch_client.watch(prefix.clone(), Some(opts)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%prefix, error = %e, "cannot watch prefix; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_REWATCH_BACKOFF);
                continue;
            }
        };
        loop {
            let due = async {
                match verify_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = tx.closed() => return,
                _ = due => {
                    verify_at = verify.map(|d| tokio::time::Instant::now() + d);
                    let at = revision.unwrap_or(0);
                    match count_at(&client, &prefix, at).await {
                        Some(etcd) if held.differs_from(etcd) => {
                            tracing::warn!(%prefix, revision = at, ours = held.0, etcd, "this follower's keys differ from etcd's: a change was missed; relisting");
                            revision = None;
                            break;
                        }
                        Some(_) => tracing::debug!(%prefix, revision = at, keys = held.0, "checked against etcd's count"),
                        None => {}
                    }
                    continue;
                }
                _ = async {
                    match &kick {
                        Some(k) => k.notified().await,
                        None => std::future::pending().await,
                    }
                } => {
                    tracing::info!(%prefix, "watch lags a write; rewatching");
                    backoff = Duration::from_millis(10);
                    break;
                }
            };
            match msg {
                Ok(Some(resp)) => {
                    backoff = Duration::from_millis(100);
                    if resp.compact_revision() > 0 {
                        tracing::info!(%prefix, compacted = resp.compact_revision(), "watch fell behind compaction; relisting");
                        revision = None;
                        break;
                    }
                    if resp.canceled() {
                        tracing::warn!(%prefix, reason = resp.cancel_reason(), "watch cancelled; rewatching");
                        break;
                    }
                    // The response confirming a new watch carries the store's current revision
                    // in its header, not the revision the watch has delivered up to: taking it
                    // as progress would skip every event still queued behind it (and a rewatch
                    // would then start after them, losing them for good).
                    if resp.created() && resp.events().is_empty() {
                        continue;
                    }
                    let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                    let changes: Vec<Change> = resp
                        .events()
                        .iter()
                        .filter_map(|ev| {
                            let kv = ev.kv()?;
                            Some(match ev.event_type() {
                                EventType::Put => {
                                    held.put(kv.version());
                                    Change::Put {
                                        key: kv.key().to_vec(),
                                        value: kv.value().to_vec(),
                                        lease: kv.lease(),
                                        mod_revision: kv.mod_revision(),
                                    }
                                }
                                EventType::Delete => {
                                    held.delete();
                                    Change::Delete { key: kv.key().to_vec(), mod_revision: kv.mod_revision() }
                                }
                            })
                        })
                        .collect();
                    // Events of one revision arrive together; the header revision of a progress
                    // notification tells us etcd has nothing newer for this prefix.
                    let rev = resp.events().last().and_then(|e| e.kv()).map(|kv| kv.mod_revision()).unwrap_or(rev);
                    if rev > revision.unwrap_or(0) {
                        revision = Some(rev);
                    }
                    if tx.send(PrefixUpdate::Changes { revision: rev, changes }).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    tracing::warn!(%prefix, "watch stream ended; rewatching");
                    break;
                }
                Err(e) => {
                    tracing::warn!(%prefix, error = %e, "watch failed; rewatching");
                    break;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_REWATCH_BACKOFF);
    }
}

#[cfg(test)]
mod count_tests {
    use super::KeyCount;

    #[test]
    fn a_follower_counts_creations_and_deletions_not_overwrites() {
        let mut held = KeyCount::listed(3);
        held.put(1); // created
        held.put(2); // overwritten
        held.put(7); // overwritten
        held.delete();
        held.put(1); // created again after its deletion
        assert!(!held.differs_from(4));
        assert!(held.differs_from(3), "a missed deletion or creation is a difference");
        assert!(held.differs_from(5));
    }
}

#[cfg(test)]
mod list_tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/fleet/"), b"/fleet0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}

#[cfg(test)]
mod transient_tests {
    use super::is_transient;
    use tonic::{Code, Status};

    fn status(code: Code, message: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(Status::new(code, message))
    }

    #[test]
    fn a_request_that_raced_an_auth_change_is_retried_and_a_refusal_is_not() {
        // What etcd 3.4 answers while a machine's user is being created (seen in the fault lab:
        // the leader resigned over it).
        assert!(is_transient(&status(Code::InvalidArgument, "etcdserver: revision of auth store is old")));
        assert!(is_transient(&status(Code::Unavailable, "tcp connect error")));
        assert!(!is_transient(&status(Code::InvalidArgument, "etcdserver: key is not provided")));
        assert!(!is_transient(&status(Code::PermissionDenied, "etcdserver: permission denied")));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pages_grow_to_a_few_mib_of_small_records_and_shrink_for_large_ones() {
        assert_eq!(super::next_page(0, 0), 1000);
        // 100-byte records: 8 MiB is ~84,000 of them.
        assert_eq!(super::next_page(1000, 100_000), 83_886);
        // Tiny records: capped.
        assert_eq!(super::next_page(1000, 1000), 100_000);
        // 64 KiB bodies: never below the first page's size.
        assert_eq!(super::next_page(10, 10 << 16), 1000);
    }
}
