//! Host buffers that a training step takes and gives back, so that the
//! fused passes allocate nothing in the steady state.
//!
//! A CNN step's feature maps and their gradients are megabytes each. Fresh
//! from the allocator every step, each came as new pages that the kernel
//! zeroed on first touch (about a tenth of the step on the reference
//! machine). A [`Recycled`] buffer goes back to a free list when dropped and
//! the next step takes it from there.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Free buffers kept for the next step: more than one step of the fused
/// CNN pass holds at once.
const KEPT: usize = 32;
/// At most this many values (1 GiB) are kept free; a larger buffer given
/// back is freed.
const KEPT_VALUES: usize = 1 << 28;

static FREE: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// An f32 buffer that returns to the free list when dropped: the first
/// `len` values of `values`, which keeps the length it grew to (shortening
/// it and growing it again would zero the difference on every use).
pub struct Recycled {
    values: Vec<f32>,
    len: usize,
}

impl Recycled {
    /// `len` values, which hold whatever an earlier user left: the caller
    /// writes every one of them before it reads any.
    pub fn overwritten(len: usize) -> Self {
        let reused = {
            let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
            // The smallest buffer that holds `len`, else the largest (to grow).
            let fits = free
                .iter()
                .enumerate()
                .filter(|(_, v)| v.len() >= len)
                .min_by_key(|(_, v)| v.len())
                .or_else(|| free.iter().enumerate().max_by_key(|(_, v)| v.len()))
                .map(|(i, _)| i);
            fits.map(|i| free.swap_remove(i))
        };
        let mut values = reused.unwrap_or_default();
        if values.len() < len {
            values.resize(len, 0.0);
        }
        Self { values, len }
    }

    /// Sets every free buffer's values to NaN, so that a test can show that
    /// no pass reads a value it did not write.
    #[doc(hidden)]
    pub fn poison_free_buffers() {
        let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
        for v in free.iter_mut() {
            v.fill(f32::NAN);
        }
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        let values = std::mem::take(&mut self.values);
        let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
        let kept: usize = free.iter().map(Vec::len).sum();
        if free.len() < KEPT && !values.is_empty() && kept + values.len() <= KEPT_VALUES {
            free.push(values);
        }
    }
}

impl Deref for Recycled {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.values[..self.len]
    }
}

impl DerefMut for Recycled {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.values[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the free list holds (other tests share it), a buffer has
    /// the length asked for, shorter or longer than the one it reuses.
    #[test]
    fn a_buffer_has_the_length_asked_for() {
        for len in [1000, 600, 5000, 0, 1000] {
            let mut b = Recycled::overwritten(len);
            assert_eq!(b.len(), len);
            b.fill(1.0);
        }
        Recycled::poison_free_buffers();
        assert_eq!(Recycled::overwritten(700).len(), 700);
    }
}
