//! Threads writing disjoint parts of one buffer: the fused MLP passes
//! ([`crate::model::fused`]) split each layer's results (z, h, ∂W, δ)
//! between rayon's threads, and each thread writes its own block of them,
//! most of them into memory that nothing has written yet (zeroing it first
//! would be a pass over memory that the products overwrite anyway).
//!
//! - [`each_part`], [`in_parts`] and [`in_parts_pair`] are the split: the
//!   shares of a length cover it exactly, in multiples of 16 ([`share`]).
//! - [`Uninit`] is a buffer of values not yet written, [`MaybeUninit`] until
//!   [`Uninit::assume_init`] takes it as a `Vec`.
//! - [`Disjoint`] hands the parts raw access to their own elements of an
//!   [`Uninit`] (or of an initialised slice), and in tests and debug builds
//!   checks what the parts promise: no element is handed out for writing
//!   twice, none is read as written before it was, and every one was
//!   written before the buffer is taken as initialised.

use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::ops::Range;
#[cfg(any(test, debug_assertions))]
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

/// Runs `part(k, parts)` for each `k` in `0..parts`, one per thread of rayon's pool.
pub fn each_part(part: impl Fn(usize, usize) + Sync) {
    let parts = rayon::current_num_threads().max(1);
    if parts == 1 {
        part(0, 1)
    } else {
        (0..parts).into_par_iter().for_each(|k| part(k, parts));
    }
}

/// Share `k` of `parts` of `0..len`: equal shares in multiples of 16 (whole
/// SIMD registers), the last ones shorter or empty. The shares of
/// `0..parts` cover `0..len` once, in order.
pub fn share(len: usize, k: usize, parts: usize) -> Range<usize> {
    let size = len.div_ceil(parts).next_multiple_of(16);
    (k * size).min(len)..((k + 1) * size).min(len)
}

/// Runs `part` on a [`share`] of `0..len` per thread of rayon's pool.
pub fn in_parts(len: usize, part: impl Fn(Range<usize>) + Sync) {
    in_parts_pair((len, len), |a, _| part(a));
}

/// [`in_parts`] over two lengths at once, the k-th share of each to the same part.
pub fn in_parts_pair((a, b): (usize, usize), part: impl Fn(Range<usize>, Range<usize>) + Sync) {
    each_part(|k, parts| part(share(a, k, parts), share(b, k, parts)));
}

/// `len` values not yet written, for the parts of a split pass to write
/// through [`Uninit::parts`].
pub struct Uninit<T> {
    values: Vec<MaybeUninit<T>>,
    /// Which values were handed out for writing (tests and debug builds).
    #[cfg(any(test, debug_assertions))]
    written: Vec<AtomicBool>,
}

impl<T> Uninit<T> {
    pub fn new(len: usize) -> Self {
        let mut values = Vec::with_capacity(len);
        // SAFETY: `MaybeUninit` values need no initialisation, and the
        // capacity is `len`.
        unsafe { values.set_len(len) };
        Self {
            values,
            #[cfg(any(test, debug_assertions))]
            written: (0..len).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// The buffer shared between the parts that write it.
    pub fn parts(&mut self) -> Disjoint<'_, T> {
        Disjoint {
            ptr: self.values.as_mut_ptr(),
            len: self.values.len(),
            #[cfg(any(test, debug_assertions))]
            written: Some(&self.written),
            _values: PhantomData,
        }
    }

    /// The values as a `Vec`.
    ///
    /// # Safety
    /// Every value must have been written (through [`Disjoint::write`] or
    /// into a [`Disjoint::block`]); tests and debug builds check that each
    /// was handed out for writing.
    pub unsafe fn assume_init(self) -> Vec<T> {
        #[cfg(any(test, debug_assertions))]
        if let Some(gap) = self.written.iter().position(|w| !w.load(Ordering::Relaxed)) {
            panic!("value {gap} of {} was never written", self.values.len());
        }
        let mut values = std::mem::ManuallyDrop::new(self.values);
        let (ptr, len, capacity) = (values.as_mut_ptr(), values.len(), values.capacity());
        // SAFETY: `MaybeUninit<T>` has `T`'s size and alignment, the
        // allocation is the Vec's own, and the caller vouches that every
        // value is initialised.
        unsafe { Vec::from_raw_parts(ptr as *mut T, len, capacity) }
    }
}

/// A buffer that the parts of [`in_parts`] write, each its own elements:
/// values not written yet (from [`Uninit::parts`]) or written ones
/// ([`Disjoint::new`]).
pub struct Disjoint<'a, T> {
    ptr: *mut MaybeUninit<T>,
    len: usize,
    /// For an [`Uninit`]: which values were handed out for writing.
    #[cfg(any(test, debug_assertions))]
    written: Option<&'a [AtomicBool]>,
    _values: PhantomData<&'a mut [MaybeUninit<T>]>,
}

// SAFETY: `Disjoint` is a `&mut [T]` whose elements the parts access from
// their threads, each its own (the contract of every accessor).
unsafe impl<T: Send> Send for Disjoint<'_, T> {}
unsafe impl<T: Send> Sync for Disjoint<'_, T> {}

impl<'a, T> Disjoint<'a, T> {
    /// Values written already, such as sums that the parts add to.
    pub fn new(values: &'a mut [T]) -> Self {
        Self {
            ptr: values.as_mut_ptr() as *mut MaybeUninit<T>,
            len: values.len(),
            #[cfg(any(test, debug_assertions))]
            written: None,
            _values: PhantomData,
        }
    }

    /// `span` for writing, the values in it possibly not written yet.
    ///
    /// # Safety
    /// No other part may touch `span` while the slice lives, and each value
    /// is handed out for writing once (tests and debug builds check that).
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    pub unsafe fn write(&self, span: Range<usize>) -> &mut [MaybeUninit<T>] {
        assert!(span.start <= span.end && span.end <= self.len);
        self.claim(span.clone());
        // SAFETY: in bounds; the caller has `span` to itself.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(span.start), span.len()) }
    }

    /// `span`, whose values are written.
    ///
    /// # Safety
    /// No other part may touch `span` while the slice lives, and every value
    /// in it must have been written (tests and debug builds check that it was
    /// handed out for writing).
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    pub unsafe fn written(&self, span: Range<usize>) -> &mut [T] {
        assert!(span.start <= span.end && span.end <= self.len);
        #[cfg(any(test, debug_assertions))]
        if let Some(written) = self.written {
            let unwritten = written[span.clone()]
                .iter()
                .position(|w| !w.load(Ordering::Relaxed));
            assert!(
                unwritten.is_none(),
                "reading values of {span:?} never written"
            );
        }
        // SAFETY: in bounds, written, and the caller has `span` to itself.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(span.start) as *mut T, span.len()) }
    }

    /// Where a product writes the `rows`×`cols` block of a row-major matrix
    /// with `stride` values per row that begins at `offset`. The block is
    /// taken as written from here on.
    ///
    /// # Safety
    /// The caller must write every value of the block before it is read, and
    /// no other part may touch the block; each value is handed out for
    /// writing once (tests and debug builds check that).
    pub unsafe fn block(
        &self,
        offset: usize,
        (rows, cols): (usize, usize),
        stride: usize,
    ) -> *mut T {
        assert!(offset <= self.len);
        if rows > 0 && cols > 0 {
            assert!(cols <= stride && offset + (rows - 1) * stride + cols <= self.len);
            for r in 0..rows {
                self.claim(offset + r * stride..offset + r * stride + cols);
            }
        }
        // SAFETY: `offset` is within the buffer or one past its end.
        unsafe { self.ptr.add(offset) as *mut T }
    }

    /// Marks `span` handed out for writing; panics where a value of it was
    /// already (two parts, or one part twice).
    #[inline(always)]
    #[cfg_attr(not(any(test, debug_assertions)), allow(unused_variables))]
    fn claim(&self, span: Range<usize>) {
        #[cfg(any(test, debug_assertions))]
        if let Some(written) = self.written {
            for (i, w) in span.clone().zip(&written[span]) {
                assert!(
                    !w.swap(true, Ordering::Relaxed),
                    "value {i} handed out twice for writing"
                );
            }
        }
    }
}

/// Fills `dst` with `f` of each value of `src`, which is as long, and gives
/// `dst` back as written values.
#[inline(always)]
pub fn init_map<'d, S, T>(
    dst: &'d mut [MaybeUninit<T>],
    src: &[S],
    f: impl Fn(&S) -> T,
) -> &'d mut [T] {
    init_zip(dst, src, src, |s, _| f(s))
}

/// Fills `dst` with `f` of each pair of values of `a` and `b`, which are as
/// long, and gives `dst` back as written values.
#[inline(always)]
pub fn init_zip<'d, A, B, T>(
    dst: &'d mut [MaybeUninit<T>],
    a: &[A],
    b: &[B],
    f: impl Fn(&A, &B) -> T,
) -> &'d mut [T] {
    assert!(a.len() == dst.len() && b.len() == dst.len());
    for ((d, a), b) in dst.iter_mut().zip(a).zip(b) {
        d.write(f(a, b));
    }
    // SAFETY: the loop wrote all `dst.len()` values, and `MaybeUninit<T>` has
    // `T`'s layout.
    unsafe { &mut *(dst as *mut [MaybeUninit<T>] as *mut [T]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_length_once_in_multiples_of_16() {
        for parts in 1..=9 {
            for len in 0..300 {
                let mut next = 0;
                for k in 0..parts {
                    let s = share(len, k, parts);
                    assert_eq!(
                        s.start, next,
                        "len {len}, {parts} parts: gap or overlap at part {k}"
                    );
                    assert!(s.end >= s.start);
                    if s.end < len {
                        assert_eq!(s.len() % 16, 0, "len {len}, {parts} parts, part {k}");
                    }
                    next = s.end;
                }
                assert_eq!(next, len, "len {len}, {parts} parts leave a tail");
            }
        }
    }

    /// The parts of [`in_parts_pair`], writing a matrix block by block as the
    /// fused passes do (by rows, by columns, and the blocks' rows one by one),
    /// write every value once, on 1 to 4 threads.
    #[test]
    fn parts_write_every_value_once() {
        for threads in 1..=4 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                for (rows, cols) in [(1, 1), (3, 10), (17, 40), (64, 33), (5, 0)] {
                    let value = |r: usize, c: usize| (r * cols + c) as f32;
                    // The product writes a block, the epilogue reads it, then
                    // writes a second buffer piece by piece.
                    let mut first = Uninit::<f32>::new(rows * cols);
                    let mut second = Uninit::<f32>::new(rows * cols);
                    {
                        let (a, b) = (first.parts(), second.parts());
                        in_parts_pair((rows, cols), |rs, cs| {
                            let (rs, cs) = if cols >= 16 * threads {
                                (0..rows, cs)
                            } else {
                                (rs, 0..cols)
                            };
                            // SAFETY: the parts' blocks are disjoint.
                            let c = unsafe {
                                a.block(rs.start * cols + cs.start, (rs.len(), cs.len()), cols)
                            };
                            for r in 0..rs.len() {
                                for j in 0..cs.len() {
                                    // SAFETY: within the part's own block.
                                    unsafe {
                                        c.add(r * cols + j).write(value(rs.start + r, cs.start + j))
                                    };
                                }
                            }
                            for r in rs {
                                let span = r * cols + cs.start..r * cols + cs.end;
                                // SAFETY: written just now, by this part.
                                let z = unsafe { a.written(span.clone()) };
                                // SAFETY: this part's own values, handed out once.
                                init_map(unsafe { b.write(span) }, z, |z| 2.0 * z);
                            }
                        });
                    }
                    // SAFETY: the test just checked that every value was written.
                    let (first, second) = unsafe { (first.assume_init(), second.assume_init()) };
                    for r in 0..rows {
                        for c in 0..cols {
                            assert_eq!(first[r * cols + c], value(r, c));
                            assert_eq!(second[r * cols + c], 2.0 * value(r, c));
                        }
                    }
                }
            });
        }
    }

    #[test]
    #[should_panic(expected = "handed out twice")]
    fn overlapping_parts_are_refused() {
        let mut buffer = Uninit::<f32>::new(64);
        let parts = buffer.parts();
        // SAFETY: deliberately not: the second span overlaps the first, and
        // the check panics before the slice is made.
        unsafe {
            parts.write(0..32);
            parts.write(16..48);
        }
    }

    #[test]
    #[should_panic(expected = "handed out twice")]
    fn overlapping_blocks_are_refused() {
        let mut buffer = Uninit::<f32>::new(8 * 8);
        let parts = buffer.parts();
        // SAFETY: deliberately not; the check panics first.
        unsafe {
            parts.block(0, (4, 4), 8);
            parts.block(3 * 8 + 3, (2, 2), 8);
        }
    }

    #[test]
    #[should_panic(expected = "never written")]
    fn a_gap_is_refused() {
        let mut buffer = Uninit::<f32>::new(48);
        {
            let parts = buffer.parts();
            for span in [0..16, 32..48] {
                // SAFETY: disjoint spans.
                init_map(unsafe { parts.write(span) }, &[1.0; 16], |&v| v);
            }
        }
        // SAFETY: deliberately not: 16..32 was never written, and the check panics.
        let _ = unsafe { buffer.assume_init() };
    }

    #[test]
    #[should_panic(expected = "never written")]
    fn reading_unwritten_values_is_refused() {
        let mut buffer = Uninit::<f32>::new(16);
        let parts = buffer.parts();
        // SAFETY: deliberately not; the check panics first.
        let _ = unsafe { parts.written(0..16) };
    }
}
