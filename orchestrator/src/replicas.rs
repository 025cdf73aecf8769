//! Many replicas of a draft or target service behind one backend. A session lives on one
//! pod (its KV cache is there), so each session is opened on the replica with the fewest
//! sessions opened from here and every later call of that session goes to the same one. A
//! replica that turns the session away (full, draining, down) passes it to the next.
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;
use tonic::codegen::http::Uri;

struct Replica<B> {
    url: String,
    backend: B,
    open: AtomicUsize,
}

struct Inner<B> {
    live: RwLock<Vec<Arc<Replica<B>>>>,
    /// Our session id -> the replica and its own id for the session.
    sessions: DashMap<SessionId, (Arc<Replica<B>>, SessionId)>,
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
                    live.push(Arc::new(Replica {
                        url,
                        backend: b,
                        open: AtomicUsize::new(0),
                    }));
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

    /// Replicas to try for a new session, least loaded first.
    fn candidates(&self) -> Vec<Arc<Replica<B>>> {
        let mut order = read(&self.inner.live).clone();
        order.sort_by_key(|r| r.open.load(Ordering::Relaxed));
        order
    }

    fn pin(&self, r: Arc<Replica<B>>, remote: SessionId) -> SessionId {
        r.open.fetch_add(1, Ordering::Relaxed);
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.inner.sessions.insert(id, (r, remote));
        id
    }

    fn route(&self, session: SessionId) -> Result<(Arc<Replica<B>>, SessionId)> {
        self.inner
            .sessions
            .get(&session)
            .map(|e| e.value().clone())
            .ok_or(DecodingError::UnknownSession(session))
    }

    fn unpin(&self, session: SessionId) -> Result<(Arc<Replica<B>>, SessionId)> {
        let (_, (r, remote)) = self
            .inner
            .sessions
            .remove(&session)
            .ok_or(DecodingError::UnknownSession(session))?;
        r.open.fetch_sub(1, Ordering::Relaxed);
        Ok((r, remote))
    }
}

/// Opens a session on the first replica that takes it; refusals (full, draining, down)
/// move on, any other error is the caller's.
macro_rules! open_on_replicas {
    ($self:ident, $committed:ident) => {{
        let mut last = DecodingError::Unavailable("no replica is connected".into());
        for r in $self.candidates() {
            match r.backend.open($committed).await {
                Ok(remote) => return Ok($self.pin(r, remote)),
                Err(e @ (DecodingError::Exhausted(_) | DecodingError::Unavailable(_))) => {
                    tracing::debug!(url = %r.url, "replica refused a session: {e}");
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }};
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
                Ok(b) if info(&b) == inner.info => added.push(Arc::new(Replica {
                    url: url.clone(),
                    backend: b,
                    open: AtomicUsize::new(0),
                })),
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
        open_on_replicas!(self, committed)
    }

    async fn verify(
        &self,
        session: SessionId,
        tree: &DraftTree,
        sampling: &SamplingParams,
        logprobs: Option<usize>,
    ) -> Result<(VerifyOutcome, ServerTiming)> {
        let (r, remote) = self.route(session)?;
        r.backend.verify(remote, tree, sampling, logprobs).await
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
        open_on_replicas!(self, committed)
    }

    async fn draft(
        &self,
        session: SessionId,
        request: DraftRequest,
    ) -> Result<(DraftOutcome, ServerTiming)> {
        let (r, remote) = self.route(session)?;
        r.backend.draft(remote, request).await
    }

    async fn close(&self, session: SessionId) -> Result<()> {
        let (r, remote) = self.unpin(session)?;
        r.backend.close(remote).await
    }
}
