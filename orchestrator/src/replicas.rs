//! Many replicas of a draft or target service behind one backend. A session lives on one
//! pod (its KV cache is there), so each session is opened on the replica with the fewest
//! sessions opened from here and every later call of that session goes to the same one. A
//! replica that turns the session away (full, draining, down) passes it to the next.
//!
//! Failover: every token a session's replica holds is kept here too, so when that replica
//! fails (down, lost the session, no memory to grow it) the session is opened again on
//! another replica with the same tokens and the call is repeated there. The new replica
//! prefills exactly what the old one held, so the output does not change. A replica that
//! failed is passed over for new sessions for a while (1 s, doubling to 30 s) and then
//! tried again.
//!
//! Replicas come from a comma-separated list of URLs whose host names may resolve to many
//! addresses (a Kubernetes headless Service gives one per ready pod); the names are
//! resolved again periodically, so pods that come and go are picked up.

use dashmap::DashMap;
use decoding::{
    BackendInfo, DecodingError, DraftBackend, DraftOutcome, DraftRequest, DraftTree, Result,
    SamplingParams, ServerTiming, SessionId, TargetBackend, VerifyOutcome,
};
use futures::future::BoxFuture;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};
use tonic::codegen::http::Uri;

struct Replica<B> {
    url: String,
    backend: B,
    open: AtomicUsize,
    /// Failures in a row, and until when new sessions pass this replica over.
    failures: AtomicU32,
    resting_until: Mutex<Option<Instant>>,
}

/// How long a replica that failed `n` times in a row is passed over: 1 s, doubling, at most
/// 30 s.
fn backoff(n: u32) -> Duration {
    Duration::from_secs(1 << n.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

impl<B> Replica<B> {
    fn new(url: String, backend: B) -> Arc<Self> {
        Arc::new(Self {
            url,
            backend,
            open: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            resting_until: Mutex::new(None),
        })
    }

    fn resting(&self, now: Instant) -> bool {
        lock(&self.resting_until).is_some_and(|t| now < t)
    }

    /// It could not be reached: pass it over for a while, longer each time in a row (the
    /// calls of many sessions failing at once, while it rests already, count once).
    fn failed(&self) {
        if self.resting(Instant::now()) {
            return;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let pause = backoff(n);
        tracing::warn!(url = %self.url, failures = n, "replica failed; passed over for {pause:?}");
        *lock(&self.resting_until) = Some(Instant::now() + pause);
    }

    fn answered(&self) {
        if self.failures.swap(0, Ordering::Relaxed) > 0 {
            *lock(&self.resting_until) = None;
        }
    }
}

/// Where one of our sessions lives.
struct Pinned<B> {
    replica: Arc<Replica<B>>,
    /// The replica's own id for the session.
    remote: SessionId,
    /// Every token the replica's session holds, the last one the root of its next tree
    /// (target) or the newest committed (draft): what it is re-opened with elsewhere.
    tokens: Vec<u32>,
}

struct Inner<B> {
    live: RwLock<Vec<Arc<Replica<B>>>>,
    sessions: DashMap<SessionId, Pinned<B>>,
    next: AtomicU64,
    info: BackendInfo,
}

/// A backend over every replica that `spec` names.
pub struct Replicas<B> {
    inner: Arc<Inner<B>>,
}

/// Turns a spec into replica URLs: [`resolve`] (DNS) when serving; tests pass their own.
pub type Resolver =
    Arc<dyn Fn(String) -> BoxFuture<'static, anyhow::Result<Vec<String>>> + Send + Sync>;

/// [`resolve`] as a [`Resolver`].
pub fn dns() -> Resolver {
    Arc::new(|spec: String| Box::pin(async move { resolve(&spec).await }))
}

/// Every `scheme://address:port` that the URLs in `spec` (comma-separated) resolve to.
pub async fn resolve(spec: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for url in spec.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let uri: Uri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("bad endpoint {url}: {e}"))?;
        let scheme = uri.scheme_str().unwrap_or("http");
        let host = uri
            .host()
            .ok_or_else(|| anyhow::anyhow!("endpoint {url} has no host"))?;
        let port = uri.port_u16().unwrap_or(80);
        let addrs = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| anyhow::anyhow!("resolving {url}: {e}"))?;
        for a in addrs {
            let u = format!("{scheme}://{a}");
            if !out.contains(&u) {
                out.push(u);
            }
        }
    }
    if out.is_empty() {
        anyhow::bail!("no address found for '{spec}'");
    }
    Ok(out)
}

impl<B: Send + Sync + 'static> Replicas<B> {
    /// Connects to every address of `spec`; at least one must answer. `info` reads a
    /// replica's model; replicas whose model differs from the first one's are left out.
    /// With a nonzero `refresh`, the names are resolved again that often.
    pub async fn connect<C, F>(
        spec: &str,
        connect: C,
        info: fn(&B) -> BackendInfo,
        refresh: Duration,
    ) -> anyhow::Result<Self>
    where
        C: Fn(String) -> F + Send + Sync + 'static,
        F: Future<Output = anyhow::Result<B>> + Send + 'static,
    {
        Self::connect_resolving(spec, dns(), connect, info, refresh).await
    }

    /// [`Self::connect`] with the addresses from `resolver` instead of DNS.
    pub async fn connect_resolving<C, F>(
        spec: &str,
        resolver: Resolver,
        connect: C,
        info: fn(&B) -> BackendInfo,
        refresh: Duration,
    ) -> anyhow::Result<Self>
    where
        C: Fn(String) -> F + Send + Sync + 'static,
        F: Future<Output = anyhow::Result<B>> + Send + 'static,
    {
        let mut live = Vec::new();
        let mut first_info = None;
        for url in resolver(spec.to_string()).await? {
            match connect(url.clone()).await {
                Ok(b) => {
                    let i = info(&b);
                    if first_info.get_or_insert_with(|| i.clone()) != &i {
                        tracing::warn!(%url, "replica serves another model; left out");
                        continue;
                    }
                    live.push(Replica::new(url, b));
                }
                Err(e) => tracing::warn!(%url, "replica not reachable: {e:#}"),
            }
        }
        let Some(info_all) = first_info else {
            anyhow::bail!("no replica of '{spec}' answered");
        };
        tracing::info!(
            spec,
            replicas = live.len(),
            "connected to {}",
            live.iter()
                .map(|r| r.url.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let inner = Arc::new(Inner {
            live: RwLock::new(live),
            sessions: DashMap::new(),
            next: AtomicU64::new(1),
            info: info_all,
        });
        if !refresh.is_zero() {
            tokio::spawn(keep_fresh(
                Arc::downgrade(&inner),
                spec.to_string(),
                resolver,
                connect,
                info,
                refresh,
            ));
        }
        Ok(Self { inner })
    }

    pub fn urls(&self) -> Vec<String> {
        read(&self.inner.live)
            .iter()
            .map(|r| r.url.clone())
            .collect()
    }

    pub fn info(&self) -> BackendInfo {
        self.inner.info.clone()
    }

    /// Something read off one live replica (all serve the same model).
    pub fn read_first<R>(&self, f: impl FnOnce(&B) -> R) -> Option<R> {
        read(&self.inner.live).first().map(|r| f(&r.backend))
    }

    /// Replicas to try for a new session: those not resting after a failure first, each
    /// group least loaded first (resting ones are still tried when nothing else answers).
    fn candidates(&self) -> Vec<Arc<Replica<B>>> {
        let now = Instant::now();
        let mut order = read(&self.inner.live).clone();
        order.sort_by_key(|r| (r.resting(now), r.open.load(Ordering::Relaxed)));
        order
    }

    /// Opens a session on the first of `order` that takes it; refusals (full, draining,
    /// down) move on, any other error is the caller's.
    async fn open_on(
        order: Vec<Arc<Replica<B>>>,
        committed: &[u32],
        ops: &impl SessionOps<B>,
    ) -> Result<(Arc<Replica<B>>, SessionId)> {
        let mut last = DecodingError::Unavailable("no replica to open it on".into());
        for r in order {
            match ops.open(&r.backend, committed).await {
                Ok(remote) => {
                    r.answered();
                    return Ok((r, remote));
                }
                Err(e @ (DecodingError::Exhausted(_) | DecodingError::Unavailable(_))) => {
                    tracing::debug!(url = %r.url, "replica refused a session: {e}");
                    if matches!(e, DecodingError::Unavailable(_)) && !deadline_passed() {
                        r.failed();
                    }
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    async fn open_session(&self, committed: &[u32], ops: &impl SessionOps<B>) -> Result<SessionId> {
        let (r, remote) = Self::open_on(self.candidates(), committed, ops).await?;
        r.open.fetch_add(1, Ordering::Relaxed);
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let pinned = Pinned {
            replica: r,
            remote,
            tokens: committed.to_vec(),
        };
        self.inner.sessions.insert(id, pinned);
        Ok(id)
    }

    fn route(&self, session: SessionId) -> Result<(Arc<Replica<B>>, SessionId)> {
        self.inner
            .sessions
            .get(&session)
            .map(|p| (p.replica.clone(), p.remote))
            .ok_or(DecodingError::UnknownSession(session))
    }

    /// Records tokens the session's replica now holds too.
    fn holds(&self, session: SessionId, tokens: impl IntoIterator<Item = u32>) {
        if let Some(mut p) = self.inner.sessions.get_mut(&session) {
            p.tokens.extend(tokens);
        }
    }

    /// A draft call begins its committed tokens at `start`: any the session held from
    /// there on (sent ahead of the target's verdict) are taken back; at least one stays.
    fn takes_back(&self, session: SessionId, start: usize) {
        if let Some(mut p) = self.inner.sessions.get_mut(&session) {
            p.tokens.truncate(start.max(1));
        }
    }

    /// Runs `call` on the session's replica; when that replica fails in a way another
    /// could make good (down, lost the session, out of memory for it), the session is
    /// opened again on another replica with every token it held, and `call` runs there.
    /// `root` is the token the call expects the session to end with, where it has one.
    async fn call_with_failover<R>(
        &self,
        session: SessionId,
        root: Option<u32>,
        ops: &impl SessionOps<B>,
        call: &impl SessionCall<B, Out = R>,
    ) -> Result<R> {
        let mut moves = 0;
        loop {
            let (r, remote) = self.route(session)?;
            let err = match call.run(&r.backend, remote, moves > 0).await {
                Ok(out) => return Ok(out),
                Err(e) => e,
            };
            let movable = match &err {
                DecodingError::Unavailable(_) => !deadline_passed(),
                DecodingError::UnknownSession(_) | DecodingError::Exhausted(_) => true,
                _ => false,
            };
            let Some(tokens) = self.inner.sessions.get(&session).map(|p| p.tokens.clone()) else {
                return Err(err);
            };
            // Only a session whose tokens are known exactly can move (the tree grows from
            // the last one); and each replica gets one chance per call.
            if !movable || root.is_some_and(|t| tokens.last() != Some(&t)) || moves >= self.len() {
                return Err(err);
            }
            moves += 1;
            let order: Vec<_> = match err {
                // The replica is up and lost the session (restarted, expired it): it may
                // take it again.
                DecodingError::UnknownSession(_) => self.candidates(),
                _ => self
                    .candidates()
                    .into_iter()
                    .filter(|c| !Arc::ptr_eq(c, &r))
                    .collect(),
            };
            if matches!(err, DecodingError::Unavailable(_)) {
                r.failed();
            }
            let (to, new_remote) = match Self::open_on(order, &tokens, ops).await {
                Ok(opened) => opened,
                Err(e) => {
                    tracing::warn!(url = %r.url, "session lost with its replica ({err}); no other replica took it: {e}");
                    return Err(match (err, e) {
                        (full @ DecodingError::Exhausted(_), _) => full,
                        (
                            _,
                            refused @ (DecodingError::Exhausted(_) | DecodingError::Unavailable(_)),
                        ) => DecodingError::Unavailable(format!(
                            "the session's replica failed and no other replica took it: {refused}"
                        )),
                        (_, other) => other,
                    });
                }
            };
            tracing::warn!(
                from = %r.url,
                to = %to.url,
                tokens = tokens.len(),
                "session moved to another replica: {err}"
            );
            telemetry::metrics().session_failovers.inc();
            // A replica that is still up gets back what the session held there.
            if matches!(err, DecodingError::Exhausted(_)) {
                let _ = ops.close(&r.backend, remote).await;
            }
            r.open.fetch_sub(1, Ordering::Relaxed);
            to.open.fetch_add(1, Ordering::Relaxed);
            match self.inner.sessions.get_mut(&session) {
                Some(mut p) => {
                    p.replica = to;
                    p.remote = new_remote;
                }
                // Closed meanwhile: nobody will close the new one.
                None => {
                    let _ = ops.close(&to.backend, new_remote).await;
                    return Err(DecodingError::UnknownSession(session));
                }
            }
        }
    }

    fn len(&self) -> usize {
        read(&self.inner.live).len()
    }

    fn unpin(&self, session: SessionId) -> Result<(Arc<Replica<B>>, SessionId)> {
        let (_, p) = self
            .inner
            .sessions
            .remove(&session)
            .ok_or(DecodingError::UnknownSession(session))?;
        p.replica.open.fetch_sub(1, Ordering::Relaxed);
        Ok((p.replica, p.remote))
    }
}

/// Opening and closing a session on one replica: the same for draft and target replicas,
/// spelt by each trait.
trait SessionOps<B> {
    async fn open(&self, backend: &B, committed: &[u32]) -> Result<SessionId>;
    async fn close(&self, backend: &B, session: SessionId) -> Result<()>;
}

struct TargetOps;

impl<B: TargetBackend> SessionOps<B> for TargetOps {
    async fn open(&self, backend: &B, committed: &[u32]) -> Result<SessionId> {
        backend.open(committed).await
    }
    async fn close(&self, backend: &B, session: SessionId) -> Result<()> {
        backend.close(session).await
    }
}

struct DraftOps;

impl<B: DraftBackend> SessionOps<B> for DraftOps {
    async fn open(&self, backend: &B, committed: &[u32]) -> Result<SessionId> {
        backend.open(committed).await
    }
    async fn close(&self, backend: &B, session: SessionId) -> Result<()> {
        backend.close(session).await
    }
}

/// One call on a session's replica, repeated on another one after a failover (`moved`).
trait SessionCall<B> {
    type Out;
    async fn run(&self, backend: &B, session: SessionId, moved: bool) -> Result<Self::Out>;
}

struct Verify<'a> {
    tree: &'a DraftTree,
    sampling: &'a SamplingParams,
    logprobs: Option<usize>,
}

impl<B: TargetBackend> SessionCall<B> for Verify<'_> {
    type Out = (VerifyOutcome, ServerTiming);
    async fn run(&self, backend: &B, session: SessionId, _: bool) -> Result<Self::Out> {
        backend
            .verify(session, self.tree, self.sampling, self.logprobs)
            .await
    }
}

struct Draft(DraftRequest);

impl<B: DraftBackend> SessionCall<B> for Draft {
    type Out = (DraftOutcome, ServerTiming);
    /// A moved session was opened on every committed token: none is new to it.
    async fn run(&self, backend: &B, session: SessionId, moved: bool) -> Result<Self::Out> {
        let mut request = self.0.clone();
        if moved {
            request.new_committed.clear();
            request.start = None;
        }
        backend.draft(session, request).await
    }
}

/// Whether the request being served has run out of time: then a failure says nothing
/// about the replica.
fn deadline_passed() -> bool {
    crate::remote::request_deadline().is_some_and(|d| Instant::now() >= d)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Re-resolves the names every `every`: connects new addresses, stops opening sessions on
/// addresses that are gone (their open sessions finish where they are).
async fn keep_fresh<B, C, F>(
    inner: Weak<Inner<B>>,
    spec: String,
    resolver: Resolver,
    connect: C,
    info: fn(&B) -> BackendInfo,
    every: Duration,
) where
    B: Send + Sync + 'static,
    C: Fn(String) -> F + Send + Sync + 'static,
    F: Future<Output = anyhow::Result<B>> + Send,
{
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else { return };
        // A name that resolves to nothing for a moment (every pod restarting) keeps the
        // replicas there are: better a stale address than none to try.
        let urls = match resolver(spec.clone()).await {
            Ok(u) if !u.is_empty() => u,
            Ok(_) => {
                tracing::warn!("re-resolving {spec}: no address; keeping the replicas");
                continue;
            }
            Err(e) => {
                tracing::warn!("re-resolving {spec}: {e:#}");
                continue;
            }
        };
        let known: Vec<String> = read(&inner.live).iter().map(|r| r.url.clone()).collect();
        let mut added = Vec::new();
        for url in urls.iter().filter(|u| !known.contains(u)) {
            match connect(url.clone()).await {
                Ok(b) if info(&b) == inner.info => added.push(Replica::new(url.clone(), b)),
                Ok(_) => tracing::warn!(%url, "replica serves another model; left out"),
                Err(e) => tracing::debug!(%url, "new replica not reachable yet: {e:#}"),
            }
        }
        let mut live = inner.live.write().unwrap_or_else(|p| p.into_inner());
        let before = live.len();
        live.retain(|r| urls.contains(&r.url));
        let removed = before - live.len();
        let n_added = added.len();
        live.extend(added);
        if removed + n_added > 0 {
            tracing::info!(
                spec,
                added = n_added,
                removed,
                now = live.len(),
                "replicas changed"
            );
        }
    }
}

impl<B: TargetBackend + 'static> TargetBackend for Replicas<B> {
    fn info(&self) -> BackendInfo {
        self.inner.info.clone()
    }

    /// The smallest limit of the replicas there are: a session may land on any of them.
    fn max_tree_nodes(&self) -> Option<usize> {
        read(&self.inner.live)
            .iter()
            .filter_map(|r| r.backend.max_tree_nodes())
            .min()
    }

    /// Whether any replica answers.
    async fn reachable(&self) -> bool {
        let live = read(&self.inner.live).clone();
        for r in live {
            if r.backend.reachable().await {
                return true;
            }
        }
        false
    }

    async fn open(&self, committed: &[u32]) -> Result<SessionId> {
        self.open_session(committed, &TargetOps).await
    }

    /// On the session's replica, or on another one holding the same tokens if that one
    /// fails.
    async fn verify(
        &self,
        session: SessionId,
        tree: &DraftTree,
        sampling: &SamplingParams,
        logprobs: Option<usize>,
    ) -> Result<(VerifyOutcome, ServerTiming)> {
        let root = tree.tokens.first().copied();
        let call = Verify {
            tree,
            sampling,
            logprobs,
        };
        let (v, timing) = self
            .call_with_failover(session, root, &TargetOps, &call)
            .await?;
        // The accepted path's tokens are in the replica's cache now, and the bonus is the
        // next tree's root.
        self.holds(session, v.accepted.iter().copied().chain([v.bonus]));
        Ok((v, timing))
    }

    async fn close(&self, session: SessionId) -> Result<()> {
        let (r, remote) = self.unpin(session)?;
        r.backend.close(remote).await
    }
}

impl<B: DraftBackend + 'static> DraftBackend for Replicas<B> {
    fn info(&self) -> BackendInfo {
        self.inner.info.clone()
    }

    fn wants_pool_delta(&self) -> bool {
        read(&self.inner.live)
            .first()
            .is_none_or(|r| r.backend.wants_pool_delta())
    }

    async fn open(&self, committed: &[u32]) -> Result<SessionId> {
        self.open_session(committed, &DraftOps).await
    }

    /// On the session's replica, or on another one if that one fails (opened on every
    /// committed token, so the request's new ones are already there).
    async fn draft(
        &self,
        session: SessionId,
        request: DraftRequest,
    ) -> Result<(DraftOutcome, ServerTiming)> {
        if let Some(start) = request.start {
            self.takes_back(session, start);
        }
        self.holds(session, request.new_committed.iter().copied());
        self.call_with_failover(session, None, &DraftOps, &Draft(request))
            .await
    }

    async fn close(&self, session: SessionId) -> Result<()> {
        let (r, remote) = self.unpin(session)?;
        r.backend.close(remote).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_replica_rests_longer_each_time_up_to_30_s() {
        let secs: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        let r = Replica::new("http://a".into(), ());
        let now = Instant::now();
        assert!(!r.resting(now));
        r.failed();
        // Failures while it rests (many sessions' calls at once) count once.
        r.failed();
        assert_eq!(r.failures.load(Ordering::Relaxed), 1);
        assert!(r.resting(Instant::now()));
        assert!(!r.resting(Instant::now() + Duration::from_millis(1100)));
        // Its rest over, it fails again: a longer rest.
        *lock(&r.resting_until) = None;
        r.failed();
        assert_eq!(r.failures.load(Ordering::Relaxed), 2);
        assert!(r.resting(Instant::now() + Duration::from_millis(1100)));
        assert!(!r.resting(Instant::now() + Duration::from_millis(2100)));
        r.answered();
        assert!(!r.resting(Instant::now()));
        assert_eq!(r.failures.load(Ordering::Relaxed), 0);
    }
}
