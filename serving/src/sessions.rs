//! The session table every server keeps: ids, per-entry locks (calls on different
//! sessions never wait for each other), admission limits on the number of sessions and
//! their memory, and idle-time eviction.

use dashmap::DashMap;
use decoding::SessionId;
use decoding::{DecodingError, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    pub max_sessions: usize,
    /// New sessions are refused while the sessions' memory is at or above this.
    pub max_bytes: usize,
    /// Sessions idle for longer are evicted by [`SessionTable::evict_idle`].
    pub ttl: Option<Duration>,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_sessions: usize::MAX,
            max_bytes: usize::MAX,
            ttl: None,
        }
    }
}

/// Where a session table reads the time: the system's clock, or one a test moves by hand
/// (so idle-time eviction can be tested without racing a loaded machine).
#[derive(Clone, Default)]
pub struct Clock {
    /// A manual clock's reading: how far it was advanced from its start.
    manual: Option<Arc<Mutex<Duration>>>,
}

impl Clock {
    /// The system's monotonic clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that stands still until [`Clock::advance`] moves it forward.
    pub fn manual() -> Self {
        Self {
            manual: Some(Arc::new(Mutex::new(Duration::ZERO))),
        }
    }

    /// Moves a manual clock forward; does nothing to the system's.
    pub fn advance(&self, by: Duration) {
        if let Some(m) = &self.manual {
            *lock(m) += by;
        }
    }

    pub fn now(&self) -> Instant {
        match &self.manual {
            None => Instant::now(),
            Some(m) => manual_epoch() + *lock(m),
        }
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.manual {
            None => f.write_str("Clock::system"),
            Some(m) => write!(f, "Clock::manual(+{:?})", *lock(m)),
        }
    }
}

/// The instant every manual clock starts at.
fn manual_epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// One session's state with its bookkeeping.
pub struct Slot<S> {
    pub state: S,
    last_used: Instant,
    bytes: usize,
    /// Set on close or eviction; work queued before that finds it and gives up.
    closed: bool,
}

pub type SlotRef<S> = Arc<Mutex<Slot<S>>>;

/// What the table keeps per session; its memory counts against the budget.
pub trait SessionState {
    fn memory_bytes(&self) -> usize;
}

pub struct SessionTable<S> {
    map: DashMap<SessionId, SlotRef<S>>,
    next: AtomicU64,
    bytes: AtomicUsize,
    limits: SessionLimits,
    /// Set when the server shuts down: open sessions run to their end, new ones go
    /// elsewhere.
    draining: AtomicBool,
    clock: Clock,
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S: SessionState> SessionTable<S> {
    pub fn new(limits: SessionLimits) -> Self {
        Self::with_clock(limits, Clock::system())
    }

    /// A table whose idle times are read from `clock`.
    pub fn with_clock(limits: SessionLimits, clock: Clock) -> Self {
        // Ids start at a time-derived offset so a restarted server does not accept a
        // stale id from before the restart as one of its own.
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1)
            << 16;
        Self {
            map: DashMap::new(),
            next: AtomicU64::new(start.max(1)),
            bytes: AtomicUsize::new(0),
            limits,
            draining: AtomicBool::new(false),
            clock,
        }
    }

    pub fn limits(&self) -> SessionLimits {
        self.limits
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The open sessions' ids.
    pub fn ids(&self) -> Vec<SessionId> {
        self.map.iter().map(|e| *e.key()).collect()
    }

    /// Memory the sessions reported, in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Refuses new sessions from now on; the open ones carry on until closed or evicted.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether a new session may open now.
    pub fn admit(&self) -> Result<()> {
        self.admit_beside(0)
    }

    /// Whether a new session may open while `pending` others, admitted but not yet in the
    /// table (still prefilling), hold places too.
    pub fn admit_beside(&self, pending: usize) -> Result<()> {
        if self.is_draining() {
            return Err(DecodingError::Unavailable(
                "this replica is shutting down; open the session on another one".into(),
            ));
        }
        let l = &self.limits;
        if self.map.len() + pending >= l.max_sessions {
            return Err(DecodingError::Exhausted(format!(
                "all {} sessions are in use; retry later or on another replica",
                l.max_sessions
            )));
        }
        let used = self.bytes();
        if used >= l.max_bytes {
            return Err(DecodingError::Exhausted(format!(
                "KV memory budget is full ({used} of {} bytes); retry later or on another \
                 replica",
                l.max_bytes
            )));
        }
        Ok(())
    }

    pub fn insert(&self, state: S) -> SessionId {
        let bytes = state.memory_bytes();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let slot = Slot {
            state,
            last_used: self.clock.now(),
            bytes,
            closed: false,
        };
        self.map.insert(id, Arc::new(Mutex::new(slot)));
        id
    }

    pub fn get(&self, id: SessionId) -> Result<SlotRef<S>> {
        self.map
            .get(&id)
            .map(|e| e.value().clone())
            .ok_or(DecodingError::UnknownSession(id))
    }

    /// Runs `f` on the session's state under its lock, then records its memory.
    pub fn with<R>(&self, id: SessionId, f: impl FnOnce(&mut S) -> Result<R>) -> Result<R> {
        let slot = self.get(id)?;
        let mut g = lock(&slot);
        self.work_on(id, &mut g, f)
    }

    /// As [`Self::with`], for a caller that already holds the lock (a batch of sessions).
    pub fn work_on<R>(
        &self,
        id: SessionId,
        slot: &mut Slot<S>,
        f: impl FnOnce(&mut S) -> Result<R>,
    ) -> Result<R> {
        self.check_open(id, slot)?;
        let r = f(&mut slot.state);
        self.finish_work(slot);
        r
    }

    pub fn check_open(&self, id: SessionId, slot: &Slot<S>) -> Result<()> {
        if slot.closed {
            return Err(DecodingError::UnknownSession(id));
        }
        Ok(())
    }

    /// Records that work on a locked session ended and what memory it now holds.
    fn finish_work(&self, slot: &mut Slot<S>) {
        slot.last_used = self.clock.now();
        if !slot.closed {
            let bytes = slot.state.memory_bytes();
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
            self.bytes.fetch_sub(slot.bytes, Ordering::Relaxed);
            slot.bytes = bytes;
        }
    }

    fn release(&self, slot: &mut Slot<S>) {
        if !slot.closed {
            slot.closed = true;
            self.bytes.fetch_sub(slot.bytes, Ordering::Relaxed);
            slot.bytes = 0;
        }
    }

    /// Closes a session; waits for a call that is working on it.
    pub fn close(&self, id: SessionId) -> Result<()> {
        let (_, slot) = self
            .map
            .remove(&id)
            .ok_or(DecodingError::UnknownSession(id))?;
        self.release(&mut lock(&slot));
        Ok(())
    }

    /// The budget one forward's parts grow within: what the sessions hold, plus `beside`
    /// held outside the table (sessions still prefilling).
    pub fn budget(&self, beside: usize) -> Budget {
        Budget {
            used: self.bytes() + beside,
            max: self.limits.max_bytes,
        }
    }

    /// Closes a session whose lock the caller holds (a call that left it unusable).
    pub fn close_locked(&self, id: SessionId, slot: &mut Slot<S>) {
        self.map.remove(&id);
        self.release(slot);
    }

    /// Evicts sessions idle for longer than the TTL; busy sessions are not idle. Returns
    /// how many went.
    pub fn evict_idle(&self) -> usize {
        let Some(ttl) = self.limits.ttl else {
            return 0;
        };
        let mut evicted = 0;
        let now = self.clock.now();
        self.map.retain(|_, slot| {
            let Ok(mut g) = slot.try_lock() else {
                return true;
            };
            if now.saturating_duration_since(g.last_used) <= ttl {
                return true;
            }
            self.release(&mut g);
            evicted += 1;
            false
        });
        evicted
    }
}

/// KV memory in use and the most there may be, as one forward's parts are admitted: the
/// budget holds while sessions grow.
pub struct Budget {
    used: usize,
    max: usize,
}

impl Budget {
    /// Takes the memory `cache` needs for `rows` more entries, or refuses (the caller's
    /// session keeps what it had).
    pub fn grow(&mut self, cache: &impl engine::KvState, rows: usize, what: &str) -> Result<()> {
        let growth = cache
            .memory_bytes_after(rows)
            .saturating_sub(cache.memory_bytes());
        if growth > 0 && self.used + growth > self.max {
            return Err(DecodingError::Exhausted(format!(
                "KV memory budget is full: the session needs {growth} more bytes for {what} \
                 ({rows} rows) and {} of {} are in use; retry later or on another replica",
                self.used, self.max
            )));
        }
        self.used += growth;
        Ok(())
    }
}

impl<C: engine::KvState> SessionState for decoding::TargetSession<C> {
    fn memory_bytes(&self) -> usize {
        decoding::TargetSession::memory_bytes(self)
    }
}

impl<C: engine::KvState> SessionState for decoding::DraftSession<C> {
    fn memory_bytes(&self) -> usize {
        decoding::DraftSession::memory_bytes(self)
    }
}

/// Evicts the table's idle sessions every quarter of its TTL on a thread of its own (so it
/// runs under any executor, or none), keeping the session metrics of `what` current; the
/// thread ends once the table is dropped.
pub fn start_evictor<S: SessionState + Send + 'static>(
    sessions: &Arc<SessionTable<S>>,
    what: &'static str,
) {
    let Some(ttl) = sessions.limits().ttl else {
        return;
    };
    let tick = (ttl / 4).max(Duration::from_millis(10));
    let table = Arc::downgrade(sessions);
    let spawned = std::thread::Builder::new()
        .name(format!("{what}-evictor"))
        .spawn(move || {
            loop {
                std::thread::sleep(tick);
                let Some(sessions) = table.upgrade() else {
                    return;
                };
                let n = sessions.evict_idle();
                if n > 0 {
                    tracing::info!(evicted = n, "idle {what} sessions evicted");
                    crate::server::publish_sessions(what, &sessions);
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no {what} session evictor ({e}); idle sessions stay until closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Held;
    impl SessionState for Held {
        fn memory_bytes(&self) -> usize {
            7
        }
    }

    #[test]
    fn sessions_idle_past_the_ttl_on_the_tables_clock_are_evicted() {
        let clock = Clock::manual();
        let ttl = Duration::from_secs(60);
        let limits = SessionLimits {
            ttl: Some(ttl),
            ..SessionLimits::default()
        };
        let table = SessionTable::with_clock(limits, clock.clone());
        let old = table.insert(Held);
        clock.advance(ttl / 2);
        let young = table.insert(Held);
        assert_eq!(table.bytes(), 14);
        // Real time is not the table's: nothing is idle yet.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(table.evict_idle(), 0);
        clock.advance(ttl / 2 + Duration::from_millis(1));
        assert_eq!(table.evict_idle(), 1);
        assert!(table.get(old).is_err() && table.get(young).is_ok());
        assert_eq!(table.bytes(), 7);
        // Work resets the idle time.
        table.with(young, |_| Ok(())).unwrap();
        clock.advance(ttl);
        assert_eq!(table.evict_idle(), 0);
        clock.advance(Duration::from_millis(1));
        assert_eq!(table.evict_idle(), 1);
        assert!(table.is_empty());
    }
}
