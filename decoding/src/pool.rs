//! The phrase pool: for each key token, the newest fixed-length phrases seen after it.
//!
//! Shared by every request (warm start) and by both drafting paths: the draft's lookahead
//! window writes n-grams into it, the target's verification output refines it, and the
//! verify tree reads candidate suffixes from it. Contents never affect correctness, only
//! how often drafts hit.

use dashmap::DashMap;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Sizing of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Tokens per phrase (`g = N - 1` for lookahead level `N`).
    pub phrase_len: usize,
    /// Most phrases kept per key (`G`); the oldest goes first.
    pub per_key: usize,
    /// Most phrases kept in all; the least recently touched keys go first.
    pub max_phrases: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            phrase_len: 6,
            per_key: 20,
            max_phrases: 2_000_000,
        }
    }
}

#[derive(Debug, Default)]
struct KeyList {
    phrases: VecDeque<Box<[u32]>>,
    touched: u64,
}

/// Drops the least recently touched entries of `map` until `total` is at most `target`;
/// `measure` gives an entry's last touch and its share of `total`. One scan over all keys
/// serves many inserts, since callers evict down to below their cap.
pub(crate) fn evict_least_recent<V>(
    map: &DashMap<u32, V>,
    total: &AtomicUsize,
    target: usize,
    measure: impl Fn(&V) -> (u64, usize),
) {
    let mut keys: Vec<(u64, u32)> = map
        .iter()
        .map(|e| (measure(e.value()).0, *e.key()))
        .collect();
    keys.sort_unstable();
    for (_, key) in keys {
        if total.load(Ordering::Relaxed) <= target {
            break;
        }
        if let Some((_, v)) = map.remove(&key) {
            total.fetch_sub(measure(&v).1, Ordering::Relaxed);
        }
    }
}

/// A phrase and the key it follows: the unit of pool deltas and harvests.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ngram {
    pub key: u32,
    pub phrase: Vec<u32>,
}

/// Concurrent phrase pool with per-key LRU lists and a global cap.
#[derive(Debug)]
pub struct PhrasePool {
    config: PoolConfig,
    map: DashMap<u32, KeyList>,
    total: AtomicUsize,
    clock: AtomicU64,
}

const SNAPSHOT_MAGIC: &[u8; 8] = b"OUROPOOL";
/// 2 adds the vocabulary stamp after the phrase length.
const SNAPSHOT_VERSION: u32 = 2;

/// Which vocabulary a snapshot's token ids belong to: the tokenizer's entry count and a
/// fingerprint of its strings. A snapshot of another vocabulary is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabStamp {
    pub entries: u32,
    pub fingerprint: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("pool snapshot I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a pool snapshot (bad magic or version {0})")]
    Format(u32),
    #[error("snapshot has phrases of {found} tokens, this pool keeps {expected}")]
    PhraseLen { found: usize, expected: usize },
    #[error("snapshot of another vocabulary ({found:?}; this server's is {expected:?})")]
    Vocabulary {
        found: VocabStamp,
        expected: VocabStamp,
    },
    #[error("snapshot holds token {0}, outside its vocabulary")]
    Token(u32),
}

impl PhrasePool {
    pub fn new(config: PoolConfig) -> Self {
        let config = PoolConfig {
            phrase_len: config.phrase_len.max(1),
            per_key: config.per_key.max(1),
            max_phrases: config.max_phrases.max(config.per_key.max(1)),
        };
        Self {
            config,
            map: DashMap::new(),
            total: AtomicUsize::new(0),
            clock: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> PoolConfig {
        self.config
    }

    pub fn phrase_len(&self) -> usize {
        self.config.phrase_len
    }

    /// Number of phrases held.
    pub fn len(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn num_keys(&self) -> usize {
        self.map.len()
    }

    /// Approximate heap use in bytes.
    pub fn memory_bytes(&self) -> usize {
        let per_phrase = self.config.phrase_len * 4 + std::mem::size_of::<Box<[u32]>>();
        self.len() * per_phrase + self.num_keys() * (std::mem::size_of::<KeyList>() + 8)
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a phrase after `key`, or makes it the newest if present. Phrases of the wrong
    /// length are ignored; returns whether the phrase was stored.
    pub fn insert(&self, key: u32, phrase: &[u32]) -> bool {
        if phrase.len() != self.config.phrase_len {
            return false;
        }
        let now = self.tick();
        let added = {
            let mut list = self.map.entry(key).or_default();
            list.touched = now;
            if let Some(i) = list.phrases.iter().position(|p| &p[..] == phrase) {
                let p = list.phrases.remove(i).expect("index from position");
                list.phrases.push_back(p);
                false
            } else {
                if list.phrases.len() >= self.config.per_key {
                    list.phrases.pop_front();
                } else {
                    self.total.fetch_add(1, Ordering::Relaxed);
                }
                list.phrases.push_back(phrase.into());
                true
            }
        };
        if added && self.len() > self.config.max_phrases {
            self.evict();
        }
        true
    }

    pub fn insert_all(&self, ngrams: &[Ngram]) {
        for n in ngrams {
            self.insert(n.key, &n.phrase);
        }
    }

    /// Drops the least recently touched keys until the pool is at 90% of its cap.
    fn evict(&self) {
        let cap = self.config.max_phrases;
        evict_least_recent(&self.map, &self.total, cap - cap / 10, |l| {
            (l.touched, l.phrases.len())
        });
    }

    /// Every phrase after `key`, oldest first.
    pub fn all(&self, key: u32) -> Vec<Vec<u32>> {
        self.newest(key, usize::MAX)
    }

    /// The `k` newest phrases after `key`, oldest of them first.
    pub fn newest(&self, key: u32, k: usize) -> Vec<Vec<u32>> {
        match self.map.get(&key) {
            Some(list) => {
                let skip = list.phrases.len().saturating_sub(k);
                list.phrases.iter().skip(skip).map(|p| p.to_vec()).collect()
            }
            None => Vec::new(),
        }
    }

    /// Overwrites the newest `phrases.len()` entries of `key` in place (refinement of the
    /// candidates the target has just scored). Wrong-length phrases are skipped.
    pub fn replace_newest(&self, key: u32, phrases: &[Vec<u32>]) {
        let Some(mut list) = self.map.get_mut(&key) else {
            return;
        };
        let n = list.phrases.len();
        let start = n.saturating_sub(phrases.len());
        for (slot, p) in (start..n).zip(phrases) {
            if p.len() == self.config.phrase_len {
                list.phrases[slot] = p.as_slice().into();
            }
        }
    }

    pub fn clear(&self) {
        self.map.clear();
        self.total.store(0, Ordering::Relaxed);
    }

    /// Writes every phrase, least recently touched keys first, so that a restore followed
    /// by eviction keeps the most recent ones.
    pub fn snapshot(
        &self,
        out: &mut impl Write,
        stamp: VocabStamp,
    ) -> Result<usize, SnapshotError> {
        type Entry = (u64, u32, Vec<Box<[u32]>>);
        let mut keys: Vec<Entry> = self
            .map
            .iter()
            .map(|e| {
                (
                    e.value().touched,
                    *e.key(),
                    e.value().phrases.iter().cloned().collect(),
                )
            })
            .collect();
        keys.sort_unstable_by_key(|k| (k.0, k.1));
        out.write_all(SNAPSHOT_MAGIC)?;
        out.write_all(&SNAPSHOT_VERSION.to_le_bytes())?;
        out.write_all(&(self.config.phrase_len as u32).to_le_bytes())?;
        out.write_all(&stamp.entries.to_le_bytes())?;
        out.write_all(&stamp.fingerprint.to_le_bytes())?;
        out.write_all(&(keys.len() as u64).to_le_bytes())?;
        let mut written = 0;
        for (_, key, phrases) in keys {
            out.write_all(&key.to_le_bytes())?;
            out.write_all(&(phrases.len() as u32).to_le_bytes())?;
            for p in phrases {
                for t in p.iter() {
                    out.write_all(&t.to_le_bytes())?;
                }
                written += 1;
            }
        }
        out.flush()?;
        Ok(written)
    }

    /// Inserts every phrase of a snapshot of vocabulary `stamp`; returns how many were
    /// read. All or nothing: a damaged, foreign or truncated snapshot changes nothing.
    pub fn restore(
        &self,
        input: &mut impl Read,
        stamp: VocabStamp,
    ) -> Result<usize, SnapshotError> {
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic)?;
        let version = read_u32(input)?;
        if &magic != SNAPSHOT_MAGIC || version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Format(version));
        }
        let g = read_u32(input)? as usize;
        if g != self.config.phrase_len {
            return Err(SnapshotError::PhraseLen {
                found: g,
                expected: self.config.phrase_len,
            });
        }
        let entries = read_u32(input)?;
        let mut buf = [0u8; 8];
        input.read_exact(&mut buf)?;
        let found = VocabStamp {
            entries,
            fingerprint: u64::from_le_bytes(buf),
        };
        if found != stamp {
            return Err(SnapshotError::Vocabulary {
                found,
                expected: stamp,
            });
        }
        input.read_exact(&mut buf)?;
        let keys = u64::from_le_bytes(buf);
        let token = |t: u32| match t < stamp.entries {
            true => Ok(t),
            false => Err(SnapshotError::Token(t)),
        };
        // Read it all before inserting anything.
        let mut phrases: Vec<(u32, Vec<u32>)> = Vec::new();
        for _ in 0..keys {
            let key = token(read_u32(input)?)?;
            let n = read_u32(input)?;
            for _ in 0..n {
                let mut phrase = vec![0u32; g];
                for t in phrase.iter_mut() {
                    *t = token(read_u32(input)?)?;
                }
                phrases.push((key, phrase));
            }
        }
        for (key, phrase) in &phrases {
            self.insert(*key, phrase);
        }
        Ok(phrases.len())
    }
}

fn read_u32(input: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    input.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// The n-grams of a token run: every position with `g` tokens after it.
pub fn ngrams_of(tokens: &[u32], g: usize) -> impl Iterator<Item = Ngram> + '_ {
    tokens.windows(g + 1).map(|w| Ngram {
        key: w[0],
        phrase: w[1..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(per_key: usize, max: usize) -> PhrasePool {
        PhrasePool::new(PoolConfig {
            phrase_len: 2,
            per_key,
            max_phrases: max,
        })
    }

    #[test]
    fn lists_are_lru_per_key() {
        let p = pool(3, 100);
        for ph in [[1, 2], [3, 4], [5, 6]] {
            assert!(p.insert(7, &ph));
        }
        assert!(p.insert(7, &[1, 2])); // present: moves to the newest end
        assert_eq!(p.all(7), vec![vec![3, 4], vec![5, 6], vec![1, 2]]);
        p.insert(7, &[8, 9]); // full: the oldest goes
        assert_eq!(p.all(7), vec![vec![5, 6], vec![1, 2], vec![8, 9]]);
        assert_eq!(p.newest(7, 2), vec![vec![1, 2], vec![8, 9]]);
        assert_eq!(p.len(), 3);
        assert!(!p.insert(7, &[1, 2, 3]), "wrong length is refused");
        assert!(p.all(8).is_empty());
    }

    #[test]
    fn replace_newest_overwrites_in_place() {
        let p = pool(4, 100);
        for ph in [[1, 1], [2, 2], [3, 3]] {
            p.insert(0, &ph);
        }
        p.replace_newest(0, &[vec![8, 8], vec![9, 9]]);
        assert_eq!(p.all(0), vec![vec![1, 1], vec![8, 8], vec![9, 9]]);
        p.replace_newest(5, &[vec![1, 1]]); // unknown key: nothing happens
        assert_eq!(p.num_keys(), 1);
    }

    #[test]
    fn global_cap_evicts_least_recently_touched_keys() {
        let p = pool(2, 10);
        for key in 0..10u32 {
            p.insert(key, &[key, key]);
        }
        p.insert(0, &[0, 0]); // touch key 0 again
        p.insert(10, &[1, 1]); // over the cap
        assert!(p.len() <= 10);
        assert!(!p.all(0).is_empty(), "recently touched key survives");
        assert!(p.all(1).is_empty(), "the oldest key went first");
        assert_eq!(p.all(10), vec![vec![1, 1]]);
    }

    #[test]
    fn snapshot_round_trip() {
        let p = pool(3, 100);
        for (k, ph) in [(1, [2, 3]), (1, [4, 5]), (9, [9, 9])] {
            p.insert(k, &ph);
        }
        let stamp = VocabStamp {
            entries: 10,
            fingerprint: 77,
        };
        let mut bytes = Vec::new();
        assert_eq!(p.snapshot(&mut bytes, stamp).unwrap(), 3);
        let q = pool(3, 100);
        assert_eq!(q.restore(&mut bytes.as_slice(), stamp).unwrap(), 3);
        assert_eq!(q.all(1), p.all(1));
        assert_eq!(q.all(9), p.all(9));
        let other = PhrasePool::new(PoolConfig {
            phrase_len: 3,
            ..PoolConfig::default()
        });
        assert!(matches!(
            other.restore(&mut bytes.as_slice(), stamp),
            Err(SnapshotError::PhraseLen {
                found: 2,
                expected: 3
            })
        ));
        assert!(q.restore(&mut &b"garbage!...."[..], stamp).is_err());
        // Another format version (an older server's file, or a newer one's): refused by
        // name, whatever follows.
        for version in [SNAPSHOT_VERSION - 1, SNAPSHOT_VERSION + 1] {
            let mut other = bytes.clone();
            other[8..12].copy_from_slice(&version.to_le_bytes());
            let fresh = pool(3, 100);
            let e = fresh.restore(&mut other.as_slice(), stamp).unwrap_err();
            assert!(matches!(e, SnapshotError::Format(v) if v == version), "{e}");
            assert_eq!(fresh.len(), 0);
        }
        // Another vocabulary, a token outside it, or a cut-off file: refused, and the pool
        // is left as it was.
        let fresh = pool(3, 100);
        let foreign = VocabStamp {
            fingerprint: 78,
            ..stamp
        };
        assert!(matches!(
            fresh.restore(&mut bytes.as_slice(), foreign),
            Err(SnapshotError::Vocabulary { .. })
        ));
        let small = VocabStamp {
            entries: 9,
            ..stamp
        };
        let mut small_bytes = Vec::new();
        p.snapshot(&mut small_bytes, small).unwrap();
        assert!(matches!(
            fresh.restore(&mut small_bytes.as_slice(), small),
            Err(SnapshotError::Token(9))
        ));
        for cut in [bytes.len() - 1, bytes.len() - 9, 30] {
            assert!(
                fresh.restore(&mut &bytes[..cut], stamp).is_err(),
                "cut at {cut}"
            );
        }
        assert_eq!(fresh.len(), 0, "a failed restore inserted phrases");
    }

    #[test]
    fn ngrams_cover_every_full_window() {
        let grams: Vec<Ngram> = ngrams_of(&[1, 2, 3, 4], 2).collect();
        assert_eq!(grams.len(), 2);
        assert_eq!(
            grams[1],
            Ngram {
                key: 2,
                phrase: vec![3, 4]
            }
        );
    }
}
