//! Per-sequence KV cache over preallocated buffers with a length cursor: appends write in
//! place, truncation moves the cursor, and `keep` gathers an accepted tree path into place.

use crate::api::{KvState, check_keep};
use crate::error::{EngineError, Result};
use candle_core::{DType, Device, Tensor};

/// Capacity grows in steps of this many tokens (or doubles, whichever is larger), so a
/// decode step almost never reallocates.
const GROW_STEP: usize = 256;

#[derive(Debug)]
pub struct KvCache {
    /// Per layer `(k, v)`, each `(1, kv_heads, capacity, head_dim)`. Empty until first use.
    layers: Vec<(Tensor, Tensor)>,
    num_layers: usize,
    kv_heads: usize,
    head_dim: usize,
    len: usize,
    capacity: usize,
    max_len: usize,
    dtype: DType,
    device: Device,
}

impl KvCache {
    pub fn new(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        max_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            layers: Vec::new(),
            num_layers,
            kv_heads,
            head_dim,
            len: 0,
            capacity: 0,
            max_len,
            dtype,
            device: device.clone(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Makes room for `extra` more entries, failing with `ContextOverflow` past the limit.
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        if needed > self.max_len {
            return Err(EngineError::ContextOverflow {
                needed,
                limit: self.max_len,
            });
        }
        if needed <= self.capacity {
            return Ok(());
        }
        let grown = self.grown_capacity(needed);
        let shape = (1, self.kv_heads, grown, self.head_dim);
        let mut layers = Vec::with_capacity(self.num_layers);
        for layer in 0..self.num_layers {
            let k = Tensor::zeros(shape, self.dtype, &self.device)?;
            let v = Tensor::zeros(shape, self.dtype, &self.device)?;
            if self.len > 0 {
                let (old_k, old_v) = &self.layers[layer];
                // A prefix along dim 2 of a (1, heads, capacity, d) tensor is strided
                // unless it spans the whole capacity; slice_set wants contiguous input.
                k.slice_set(&old_k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                v.slice_set(&old_v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            layers.push((k, v));
        }
        self.layers = layers;
        self.capacity = grown;
        Ok(())
    }

    /// The capacity that holds `needed` entries: steps of [`GROW_STEP`] or doubling.
    fn grown_capacity(&self, needed: usize) -> usize {
        if needed <= self.capacity {
            return self.capacity;
        }
        needed
            .next_multiple_of(GROW_STEP)
            .max(self.capacity * 2)
            .min(self.max_len)
    }

    fn bytes_for(&self, capacity: usize) -> usize {
        2 * self.num_layers * self.kv_heads * capacity * self.head_dim * self.dtype.size_in_bytes()
    }

    /// Writes `k`/`v` of shape `(1, kv_heads, n, head_dim)` after the committed entries of
    /// `layer` and returns views over everything up to and including them. The cursor
    /// only moves in `commit`, so a failed forward leaves the cache as it was.
    pub(crate) fn write(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        let (ck, cv) = &self.layers[layer];
        ck.slice_set(k, 2, self.len)?;
        cv.slice_set(v, 2, self.len)?;
        Ok((
            ck.narrow(2, 0, self.len + n)?,
            cv.narrow(2, 0, self.len + n)?,
        ))
    }

    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
    }

    /// The committed entries of one layer (for tests and tensor-parallel checks).
    pub fn layer(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        if self.len == 0 {
            let shape = (1, self.kv_heads, 0, self.head_dim);
            let empty = Tensor::zeros(shape, self.dtype, &self.device)?;
            return Ok((empty.clone(), empty));
        }
        let (k, v) = &self.layers[layer];
        Ok((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?))
    }
}

impl KvState for KvCache {
    fn len(&self) -> usize {
        self.len
    }

    fn truncate(&mut self, n: usize) -> Result<()> {
        self.len = self.len.min(n);
        Ok(())
    }

    fn keep(&mut self, base: usize, rows: &[usize]) -> Result<()> {
        check_keep(self.len, base, rows)?;
        // Rows already in place (the first draft tokens were accepted) need no copy.
        let in_place = rows
            .iter()
            .enumerate()
            .take_while(|&(i, &r)| r == base + i)
            .count();
        if in_place < rows.len() {
            let moved: Vec<u32> = rows[in_place..].iter().map(|&r| r as u32).collect();
            let idx = Tensor::new(moved.as_slice(), &self.device)?;
            for (k, v) in &self.layers {
                // index_select copies out before slice_set writes back, so overlap is safe.
                let k_rows = k.index_select(&idx, 2)?;
                let v_rows = v.index_select(&idx, 2)?;
                k.slice_set(&k_rows, 2, base + in_place)?;
                v.slice_set(&v_rows, 2, base + in_place)?;
            }
        }
        self.len = base + rows.len();
        Ok(())
    }

    fn memory_bytes(&self) -> usize {
        self.bytes_for(self.capacity)
    }

    fn memory_bytes_after(&self, extra: usize) -> usize {
        // Past the context limit the forward fails anyway; that is not a memory question.
        let needed = (self.len + extra).min(self.max_len);
        self.bytes_for(self.grown_capacity(needed))
    }
}
