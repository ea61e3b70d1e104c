//! A single-threaded f32 matrix product, `c = a · b`, for the fused MLP
//! passes ([`crate::model::fused`]), which split the work between threads
//! themselves.
//!
//! With AVX-512 it is a BLIS-style product of its own: `a` and `b` are
//! copied into panels that the micro-kernel reads contiguously (an 8×32
//! tile of `c` in 16 registers), at most 256 deep. An operand stored the
//! other way round (the forward pass's `x·Wᵀ`, a row-major `a`) is packed
//! through 16×16 register transposes. An operand that every thread of a
//! split product reads can be packed ahead, once, by all of them together
//! ([`Panels`]). On the 2-core reference machine it ran the MLP
//! benchmark's products 1.1–1.5× faster than the `gemm` crate under candle
//! (interleaved medians, README Speed); without AVX-512 the `gemm` crate
//! does the work.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::Range;

/// Columns of the blocks that [`sgemm_then`] finishes (but for the last,
/// narrower one) where AVX-512 runs the product: the micro-tile's width.
/// Without AVX-512 it finishes all of `c` at once.
pub const BLOCK_COLUMNS: usize = 32;

/// A matrix read by [`sgemm`]: its first value, and the distance between
/// consecutive rows and consecutive columns.
#[derive(Clone, Copy)]
pub struct Operand {
    pub ptr: *const f32,
    pub row_stride: isize,
    pub col_stride: isize,
}

impl Operand {
    /// Row-major with `stride` values per row.
    pub fn rows(ptr: *const f32, stride: usize) -> Self {
        Self {
            ptr,
            row_stride: stride as isize,
            col_stride: 1,
        }
    }

    /// Column-major (the transpose of a row-major matrix) with `stride` values per column.
    pub fn columns(ptr: *const f32, stride: usize) -> Self {
        Self {
            ptr,
            row_stride: 1,
            col_stride: stride as isize,
        }
    }

    /// The same values read as the transpose.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn transposed(self) -> Self {
        Self {
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// # Safety
    /// `(i, j)` must lie inside the matrix.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    unsafe fn at(&self, i: usize, j: usize) -> f32 {
        unsafe {
            *self
                .ptr
                .offset(i as isize * self.row_stride + j as isize * self.col_stride)
        }
    }
}

/// An operand as [`sgemm`] reads it: in place, packed by the calling thread
/// as it goes, or packed ahead into [`Panels`] that several threads share.
#[derive(Clone, Copy)]
pub enum OperandSource<'a> {
    Strided(Operand),
    Packed(&'a Panels),
}

impl From<Operand> for OperandSource<'_> {
    fn from(x: Operand) -> Self {
        OperandSource::Strided(x)
    }
}

impl<'a> From<&'a Panels> for OperandSource<'a> {
    fn from(panels: &'a Panels) -> Self {
        OperandSource::Packed(panels)
    }
}

/// Which side of the product an operand is on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Side {
    /// `a`, m×k.
    A,
    /// `b`, k×n.
    B,
}

/// An operand packed ahead, once, into the panels the AVX-512 product reads.
///
/// The threads of a split product each compute some columns (or rows) of
/// `c`, so each reads all of the other operand: packed as it goes, that
/// operand would be packed once per thread. Packed ahead, the threads pack
/// disjoint panels of it ([`Panels::pack`]) and then all read the result.
/// Without AVX-512 nothing is packed and the product reads the operand in
/// place.
pub struct Panels {
    x: Operand,
    side: Side,
    /// Rows of `a`, or columns of `b`.
    len: usize,
    depth: usize,
    /// Every pass's panels one after the other, not written until
    /// [`Panels::pack`] writes them. Empty where the product does not pack.
    values: Vec<MaybeUninit<f32>>,
    /// `values`' first value, taken once from `&mut`, through which `pack`
    /// writes and the products read.
    base: *mut MaybeUninit<f32>,
}

// SAFETY: the operand is only read, and `pack`'s callers write disjoint panels.
unsafe impl Send for Panels {}
unsafe impl Sync for Panels {}

impl Panels {
    /// Room for the panels of `x`, `rows`×`cols` on `side`.
    pub fn new(side: Side, (rows, cols): (usize, usize), x: Operand) -> Self {
        let (len, depth) = match side {
            Side::A => (rows, cols),
            Side::B => (cols, rows),
        };
        let mut values: Vec<MaybeUninit<f32>> =
            panel_shape(side, len).map_or_else(Vec::new, |(count, width)| {
                let len = count * width * depth;
                let mut values = Vec::with_capacity(len);
                // SAFETY: `MaybeUninit` values need no initialisation, and the
                // capacity is `len`.
                unsafe { values.set_len(len) };
                values
            });
        let base = values.as_mut_ptr();
        Self {
            x,
            side,
            len,
            depth,
            values,
            base,
        }
    }

    /// How many panels there are to pack: zero where the product reads `x` in place.
    pub fn count(&self) -> usize {
        match panel_shape(self.side, self.len) {
            Some((count, _)) if !self.values.is_empty() => count,
            _ => 0,
        }
    }

    /// Packs panels `range` (of [`Panels::count`]), every pass of them.
    ///
    /// # Safety
    /// `x` must hold its matrix, and no two calls may pack the same panel
    /// at the same time or while a product reads them.
    pub unsafe fn pack(&self, range: Range<usize>) {
        assert!(range.end <= self.count());
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx512::pack_panels(self, range)
        }
    }
}

/// How many panels `len` rows of `a` (or columns of `b`) make for the
/// AVX-512 product, and their width; `None` where the product packs nothing.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn panel_shape(side: Side, len: usize) -> Option<(usize, usize)> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return Some((avx512::panels(side, len), avx512::width(side)));
    }
    None
}

/// `c = a · b` for `(m, n, k)`: `a` is m×k, `b` k×n, and `c` row-major m×n
/// with `c_stride` values per row. Runs on the calling thread.
///
/// # Safety
/// The operands must hold their matrices at the given strides (packed ones
/// all of their panels), and `c` must be valid for writes of its m×n
/// values, which nothing else touches.
pub unsafe fn sgemm<'a>(
    dims: (usize, usize, usize),
    c: *mut f32,
    c_stride: usize,
    a: impl Into<OperandSource<'a>>,
    b: impl Into<OperandSource<'a>>,
) {
    unsafe { sgemm_then(dims, c, c_stride, a, b, &|_, _| {}) }
}

/// [`sgemm`], then `finish(rows, columns)` on each block of `c` as soon as
/// its values are final, while the block is still in L1: a fused pass's
/// bias and activation read no value back from memory. The blocks cover `c`
/// once.
///
/// # Safety
/// As [`sgemm`].
pub unsafe fn sgemm_then<'a, F: Fn(Range<usize>, Range<usize>)>(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    c_stride: usize,
    a: impl Into<OperandSource<'a>>,
    b: impl Into<OperandSource<'a>>,
    finish: &F,
) {
    let (a, b) = (a.into(), b.into());
    for (source, side, len) in [(a, Side::A, m), (b, Side::B, n)] {
        if let OperandSource::Packed(p) = source {
            assert!(p.side == side && p.len == len && p.depth == k);
        }
    }
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return unsafe { avx512::sgemm((m, n, k), c, c_stride, a, b, finish) };
    }
    let strided = |x: OperandSource| match x {
        OperandSource::Strided(x) | OperandSource::Packed(&Panels { x, .. }) => x,
    };
    unsafe { portable((m, n, k), c, c_stride, strided(a), strided(b)) };
    finish(0..m, 0..n);
}

/// How a slice holds a matrix for [`product`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Row after row, each as long as the matrix is wide.
    RowMajor,
    /// Column after column, each as long as the matrix is high.
    ColumnMajor,
}

/// `c = a · b` on slices, the bounds checked: `a` m×k, `b` k×n and `c`
/// row-major m×n, on the calling thread.
pub fn product(
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
    (a, a_order): (&[f32], Order),
    (b, b_order): (&[f32], Order),
) {
    assert!(
        c.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "a product's slices hold its matrices"
    );
    let operand = |x: &[f32], order, (rows, cols): (usize, usize)| match order {
        Order::RowMajor => Operand::rows(x.as_ptr(), cols),
        Order::ColumnMajor => Operand::columns(x.as_ptr(), rows),
    };
    // SAFETY: the slices hold the m×k, k×n and m×n values at these strides,
    // and `c` is borrowed mutably.
    unsafe {
        sgemm(
            (m, n, k),
            c.as_mut_ptr(),
            n,
            operand(a, a_order, (m, k)),
            operand(b, b_order, (k, n)),
        )
    }
}

/// [`sgemm`] through the `gemm` crate, for CPUs without AVX-512.
///
/// # Safety
/// As [`sgemm`].
unsafe fn portable(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    c_stride: usize,
    a: Operand,
    b: Operand,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_stride as isize,
            false,
            a.ptr,
            a.col_stride,
            a.row_stride,
            b.ptr,
            b.col_stride,
            b.row_stride,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Room for a product's packed panels, written by the packing before the product reads them.
type Packing = Vec<MaybeUninit<f32>>;

thread_local! {
    /// Each thread's packed panels of `a` and `b`, kept between calls.
    static PACKED: RefCell<(Packing, Packing)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The AVX-512 product and its packing.
///
/// SAFETY, for every `unsafe` block in this module (rather than repeated at
/// each): the functions run only where `is_x86_feature_detected!("avx512f")`
/// said yes ([`sgemm_then`], [`panel_shape`]); every pointer is derived from
/// an [`Operand`] or `c` that the caller of the public `unsafe` functions
/// vouches for (valid for its matrix at its strides, `c` for writes of m×n
/// values that nothing else touches), offset only within that matrix (tile
/// and panel offsets are bounded by `m`, `n`, `k` and the panel counts);
/// packed panels are written by [`Panels::pack`] or `pack_a`/`pack_b` before
/// any product reads them, and each thread's panels of `PACKED` are its own.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Operand, OperandSource, PACKED, Panels, Range, Side};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// Rows of `c` per micro-tile.
    const MR: usize = 8;
    /// Columns of `c` per micro-tile, in 16-lane registers: 8×2 accumulators.
    /// (6×64 and 8×48 tiles, with fewer broadcasts per FMA, ran no faster.)
    const NR: usize = super::BLOCK_COLUMNS;
    const LANES: usize = NR / 16;
    /// Depth of one pass over `c`: a micro-panel of `b` (KC×NR) stays in L1.
    const KC: usize = 256;
    /// Columns of `b` packed at once (KC×NC in L2).
    const NC: usize = 1024;

    /// The width of a panel on `side`.
    pub fn width(side: Side) -> usize {
        match side {
            Side::A => MR,
            Side::B => NR,
        }
    }

    /// Panels of [`width`] that hold `len` rows of `a` or columns of `b`.
    pub fn panels(side: Side, len: usize) -> usize {
        len.div_ceil(width(side))
    }

    /// The passes over `c`, `(first, depth)`: equal ones at most KC deep,
    /// 784 = 4 × 196 rather than 3 × 256 + 16, whose last pass would load and
    /// store `c` for little work.
    fn passes(k: usize) -> impl Iterator<Item = (usize, usize)> {
        let depth = k.div_ceil(k.div_ceil(KC).max(1)).max(1);
        (0..k).step_by(depth).map(move |pc| (pc, depth.min(k - pc)))
    }

    /// Where pass `pc` of `panels` begins: the passes before it hold `pc`
    /// values per row (or column) of every panel.
    fn pass_of(panels: &Panels, pc: usize) -> *const f32 {
        // The products read the packed values only after `pack` wrote them.
        (panels.base as *const f32).wrapping_add(pass_offset(panels, pc))
    }

    /// [`pass_of`] as an offset into the panels' values.
    fn pass_offset(panels: &Panels, pc: usize) -> usize {
        pc * self::panels(panels.side, panels.len) * width(panels.side)
    }

    /// # Safety
    /// As [`Panels::pack`], on a CPU with AVX-512F.
    pub unsafe fn pack_panels(panels: &Panels, range: Range<usize>) {
        let w = width(panels.side);
        let (first, len) = (range.start * w, (range.end * w).min(panels.len));
        for (pc, kc) in passes(panels.depth) {
            // SAFETY: the caller packs these panels and no one else.
            let out = unsafe {
                std::slice::from_raw_parts_mut(
                    panels
                        .base
                        .add(pass_offset(panels, pc) + range.start * w * kc),
                    range.len() * w * kc,
                )
            };
            unsafe {
                match panels.side {
                    Side::A => pack::<MR>(out, panels.x, first, len - first, pc, kc),
                    Side::B => pack::<NR>(out, panels.x.transposed(), first, len - first, pc, kc),
                }
            }
        }
    }

    /// # Safety
    /// As [`super::sgemm`], on a CPU with AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sgemm<F: Fn(Range<usize>, Range<usize>)>(
        (m, n, k): (usize, usize, usize),
        c: *mut f32,
        c_stride: usize,
        a: OperandSource,
        b: OperandSource,
        finish: &F,
    ) {
        PACKED.with_borrow_mut(|(pa, pb)| {
            let m_panels = m.div_ceil(MR);
            grow(pa, m_panels * MR * KC);
            grow(pb, NC.min(n).div_ceil(NR) * NR * KC);
            if k == 0 {
                for i in 0..m {
                    unsafe { std::ptr::write_bytes(c.add(i * c_stride), 0, n) };
                }
                finish(0..m, 0..n);
                return;
            }
            for (pc, kc) in passes(k) {
                let panels_a = match a {
                    OperandSource::Packed(p) if p.count() > 0 => pass_of(p, pc),
                    OperandSource::Strided(a) | OperandSource::Packed(&Panels { x: a, .. }) => {
                        unsafe { pack_a(pa, a, m, pc, kc) };
                        pa.as_ptr() as *const f32
                    }
                };
                for jc in (0..n).step_by(NC) {
                    let nc = NC.min(n - jc);
                    let panels_b = match b {
                        OperandSource::Packed(p) if p.count() > 0 => {
                            pass_of(p, pc).wrapping_add(jc * kc)
                        }
                        OperandSource::Strided(b) | OperandSource::Packed(&Panels { x: b, .. }) => {
                            unsafe { pack_b(pb, b, nc, jc, pc, kc) };
                            pb.as_ptr() as *const f32
                        }
                    };
                    for ip in 0..m_panels {
                        let i0 = ip * MR;
                        let rows = MR.min(m - i0);
                        let panel_a = unsafe { panels_a.add(ip * MR * kc) };
                        for jp in 0..nc.div_ceil(NR) {
                            let j0 = jp * NR;
                            let cols = NR.min(nc - j0);
                            let panel_b = unsafe { panels_b.add(jp * NR * kc) };
                            let tile = unsafe { c.add(i0 * c_stride + jc + j0) };
                            unsafe {
                                micro(kc, panel_a, panel_b, tile, c_stride, rows, cols, pc > 0)
                            };
                            if pc + kc == k {
                                finish(i0..i0 + rows, jc + j0..jc + j0 + cols);
                            }
                        }
                    }
                }
            }
        })
    }

    /// Makes `buffer` at least `len` long, never shorter (shrinking and growing
    /// again would zero the memory on every call).
    fn grow(buffer: &mut super::Packing, len: usize) {
        if buffer.len() < len {
            buffer.resize(len, MaybeUninit::new(0.0));
        }
    }

    /// `a[.., pc..pc+kc]` as MR-row panels, each column of a panel contiguous;
    /// rows past `m` are zero.
    unsafe fn pack_a(packed: &mut [MaybeUninit<f32>], a: Operand, m: usize, pc: usize, kc: usize) {
        unsafe { pack::<MR>(packed, a, 0, m, pc, kc) }
    }

    /// `b[pc..pc+kc, jc..jc+nc]` as NR-column panels, each row of a panel
    /// contiguous; columns past `nc` are zero.
    unsafe fn pack_b(
        packed: &mut [MaybeUninit<f32>],
        b: Operand,
        nc: usize,
        jc: usize,
        pc: usize,
        kc: usize,
    ) {
        unsafe { pack::<NR>(packed, b.transposed(), jc, nc, pc, kc) }
    }

    /// Rows `r0..r0+len` and columns `pc..pc+kc` of `x` as panels of W rows,
    /// each panel stored column after column (W values each); rows past
    /// `len` are zero. `a`'s panels are `a`'s rows, `b`'s are `bᵀ`'s.
    #[target_feature(enable = "avx512f")]
    unsafe fn pack<const W: usize>(
        packed: &mut [MaybeUninit<f32>],
        x: Operand,
        r0: usize,
        len: usize,
        pc: usize,
        kc: usize,
    ) {
        let full = len / W;
        let (whole, rest) = packed[..len.div_ceil(W) * W * kc].split_at_mut(full * W * kc);
        if x.row_stride == 1 {
            // A few columns of `x` (rows of memory) at a time, across all the
            // panels, so that each panel receives whole cache lines (256
            // bytes) at once while the columns' values stay in L1. Panel by
            // panel, each read would take a few values from a different page;
            // column by column, each write would fill half a line that other
            // panels' writes, 8 KiB apart in the same cache set, evict.
            let block = (64 / W).max(1);
            for p0 in (0..kc).step_by(block) {
                for (k, panel) in whole.chunks_exact_mut(W * kc).enumerate() {
                    for p in p0..(p0 + block).min(kc) {
                        let src = unsafe { x.ptr.offset((pc + p) as isize * x.col_stride).add(r0) };
                        let to = &mut panel[p * W..(p + 1) * W];
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                src.add(k * W),
                                to.as_mut_ptr() as *mut f32,
                                W,
                            )
                        };
                    }
                }
            }
        } else if x.col_stride == 1 {
            for (k, panel) in whole.chunks_exact_mut(W * kc).enumerate() {
                unsafe { transpose_into::<W>(panel, x, r0 + k * W, pc, kc) };
            }
        } else {
            for (k, panel) in whole.chunks_exact_mut(W * kc).enumerate() {
                unsafe { pack_by_values::<W>(panel, x, r0 + k * W, W, pc, kc) };
            }
        }
        if !rest.is_empty() {
            unsafe { pack_by_values::<W>(rest, x, r0 + full * W, len % W, pc, kc) };
        }
    }

    /// One panel of `rows` ≤ W rows of `x` from `first`, value by value,
    /// zero past `rows`.
    unsafe fn pack_by_values<const W: usize>(
        panel: &mut [MaybeUninit<f32>],
        x: Operand,
        first: usize,
        rows: usize,
        pc: usize,
        kc: usize,
    ) {
        for i in 0..W {
            for p in 0..kc {
                panel[p * W + i].write(if i < rows {
                    unsafe { x.at(first + i, pc + p) }
                } else {
                    0.0
                });
            }
        }
    }

    /// A full panel of W rows of a row-major `x`, in blocks of 16 rows (fewer
    /// padded with zeros) by 16 columns, transposed in registers.
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose_into<const W: usize>(
        panel: &mut [MaybeUninit<f32>],
        x: Operand,
        first: usize,
        pc: usize,
        kc: usize,
    ) {
        unsafe {
            let row = |i: usize| {
                x.ptr
                    .offset((first + i) as isize * x.row_stride + pc as isize)
            };
            let blocks = kc / 16;
            for group in (0..W).step_by(16) {
                let height = 16.min(W - group);
                let lanes: __mmask16 = ((1u32 << height) - 1) as __mmask16;
                for q in 0..blocks {
                    let rows: [__m512; 16] = std::array::from_fn(|i| {
                        if i < height {
                            _mm512_loadu_ps(row(group + i).add(16 * q))
                        } else {
                            _mm512_setzero_ps()
                        }
                    });
                    for (t, column) in transpose16(rows).into_iter().enumerate() {
                        let at = panel.as_mut_ptr().add((16 * q + t) * W + group) as *mut f32;
                        _mm512_mask_storeu_ps(at, lanes, column);
                    }
                }
            }
            for p in 16 * blocks..kc {
                for i in 0..W {
                    panel[p * W + i].write(*row(i).add(p));
                }
            }
        }
    }

    /// The transpose of a 16×16 block held as 16 rows.
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        // Interleave pairs of rows, then pairs of pairs, then 128-bit lanes twice.
        let mut t = [_mm512_setzero_ps(); 16];
        for k in 0..8 {
            t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
            t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
        }
        let mut u = [_mm512_setzero_ps(); 16];
        for k in 0..4 {
            let (a, b, c, d) = (t[4 * k], t[4 * k + 1], t[4 * k + 2], t[4 * k + 3]);
            u[4 * k] = _mm512_shuffle_ps::<0x44>(a, c);
            u[4 * k + 1] = _mm512_shuffle_ps::<0xEE>(a, c);
            u[4 * k + 2] = _mm512_shuffle_ps::<0x44>(b, d);
            u[4 * k + 3] = _mm512_shuffle_ps::<0xEE>(b, d);
        }
        let mut v = [_mm512_setzero_ps(); 16];
        for k in 0..2 {
            for l in 0..4 {
                let (a, b) = (u[8 * k + l], u[8 * k + 4 + l]);
                v[8 * k + l] = _mm512_shuffle_f32x4::<0x88>(a, b);
                v[8 * k + 4 + l] = _mm512_shuffle_f32x4::<0xDD>(a, b);
            }
        }
        let mut w = [_mm512_setzero_ps(); 16];
        for l in 0..8 {
            w[l] = _mm512_shuffle_f32x4::<0x88>(v[l], v[8 + l]);
            w[8 + l] = _mm512_shuffle_f32x4::<0xDD>(v[l], v[8 + l]);
        }
        w
    }

    /// One MR×NR tile of `c` (of which `rows`×`cols` are real): set to, or
    /// with `accumulate` increased by, panel_a · panel_b over depth `kc`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro(
        kc: usize,
        panel_a: *const f32,
        panel_b: *const f32,
        c: *mut f32,
        c_stride: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        unsafe {
            // The tile's rows lie a row of `c` apart, out of cache since the
            // last pass: ask for them now, read them after the loop.
            for i in 0..rows {
                for l in 0..LANES {
                    _mm_prefetch::<_MM_HINT_T0>(c.add(i * c_stride + 16 * l) as *const i8);
                }
            }
            let mut acc = [[_mm512_setzero_ps(); LANES]; MR];
            let (mut pa, mut pb) = (panel_a, panel_b);
            for _ in 0..kc {
                let b: [__m512; LANES] = std::array::from_fn(|l| _mm512_loadu_ps(pb.add(16 * l)));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let ai = _mm512_set1_ps(*pa.add(i));
                    for l in 0..LANES {
                        acc[l] = _mm512_fmadd_ps(ai, b[l], acc[l]);
                    }
                }
                pa = pa.add(MR);
                pb = pb.add(NR);
            }
            if rows == MR && cols == NR {
                for (i, acc) in acc.iter().enumerate() {
                    let row = c.add(i * c_stride);
                    for (l, &v) in acc.iter().enumerate() {
                        let at = row.add(16 * l);
                        let v = if accumulate {
                            _mm512_add_ps(v, _mm512_loadu_ps(at))
                        } else {
                            v
                        };
                        _mm512_storeu_ps(at, v);
                    }
                }
                return;
            }
            let mut tile = [0f32; MR * NR];
            for (i, acc) in acc.iter().enumerate() {
                for (l, &v) in acc.iter().enumerate() {
                    _mm512_storeu_ps(tile.as_mut_ptr().add(i * NR + 16 * l), v);
                }
            }
            for i in 0..rows {
                let row = c.add(i * c_stride);
                for j in 0..cols {
                    let v = tile[i * NR + j];
                    *row.add(j) = if accumulate { *row.add(j) + v } else { v };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Kernel = unsafe fn((usize, usize, usize), *mut f32, usize, Operand, Operand);

    /// `rows`×`cols` values, stored row-major, or column-major when `transposed`.
    fn matrix(rows: usize, cols: usize, transposed: bool, seed: usize) -> (Vec<f32>, bool) {
        let values = (0..rows * cols)
            .map(|i| (((i * 7919 + seed * 104_729) % 1009) as f32 - 504.0) / 337.0)
            .collect();
        (values, transposed)
    }

    fn operand((values, transposed): &(Vec<f32>, bool), rows: usize, cols: usize) -> Operand {
        if *transposed {
            Operand::columns(values.as_ptr(), rows)
        } else {
            Operand::rows(values.as_ptr(), cols)
        }
    }

    /// Every layout against a float64 product, on sizes that leave partial
    /// tiles, partial 16×16 transposes and several 256-deep passes, and into
    /// a `c` wider than the product (a column block, as the fused passes use).
    #[test]
    fn equals_a_float64_product_in_every_layout() {
        let kernels: [(&str, Kernel); 2] = [("dispatched", sgemm), ("portable", portable)];
        for (m, n, k) in [
            (1, 1, 1),
            (8, 32, 16),
            (13, 37, 300),
            (128, 70, 129),
            (40, 64, 600),
            (9, 100, 513),
        ] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = matrix(m, k, ta, 1);
                let b = matrix(k, n, tb, 2);
                let (oa, ob) = (operand(&a, m, k), operand(&b, k, n));
                for (name, kernel) in kernels {
                    let stride = n + 3;
                    let mut c = vec![f32::NAN; m * stride];
                    unsafe { kernel((m, n, k), c.as_mut_ptr(), stride, oa, ob) };
                    for i in 0..m {
                        for j in 0..n {
                            let exact: f64 = (0..k)
                                .map(|p| unsafe { oa.at(i, p) as f64 * ob.at(p, j) as f64 })
                                .sum();
                            let got = c[i * stride + j] as f64;
                            assert!(
                                (got - exact).abs()
                                    <= 1e-5 * (1.0 + exact.abs()) * (k as f64).sqrt(),
                                "{name} {m}x{n}x{k} ({ta}, {tb}) at ({i}, {j}): {got} vs {exact}"
                            );
                        }
                        assert!(
                            c[i * stride + n..(i + 1) * stride]
                                .iter()
                                .all(|v| v.is_nan()),
                            "{name} wrote past its columns"
                        );
                    }
                }
            }
        }
    }

    /// Operands packed ahead, by several calls over parts of their panels,
    /// give the bits of operands packed as the product goes, in every layout,
    /// on sizes with partial panels and several passes.
    #[test]
    fn panels_packed_ahead_give_the_same_product() {
        for (m, n, k) in [(13, 37, 300), (40, 64, 600), (9, 1100, 20), (64, 70, 784)] {
            for (ta, tb) in [(false, false), (true, true)] {
                let a = matrix(m, k, ta, 3);
                let b = matrix(k, n, tb, 4);
                let (oa, ob) = (operand(&a, m, k), operand(&b, k, n));
                let (pa, pb) = (
                    Panels::new(Side::A, (m, k), oa),
                    Panels::new(Side::B, (k, n), ob),
                );
                for p in [&pa, &pb] {
                    let half = p.count() / 2;
                    unsafe {
                        p.pack(half..p.count());
                        p.pack(0..half);
                    }
                }
                let mut want = vec![0f32; m * n];
                unsafe { sgemm((m, n, k), want.as_mut_ptr(), n, oa, ob) };
                for (sa, sb) in [
                    (OperandSource::from(&pa), OperandSource::from(ob)),
                    (OperandSource::from(oa), OperandSource::from(&pb)),
                    (OperandSource::from(&pa), OperandSource::from(&pb)),
                ] {
                    let mut got = vec![f32::NAN; m * n];
                    unsafe { sgemm((m, n, k), got.as_mut_ptr(), n, sa, sb) };
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(g, w)| g.to_bits() == w.to_bits()),
                        "{m}x{n}x{k} ({ta}, {tb})"
                    );
                }
            }
        }
    }

    /// `finish` sees every value of `c` once, after its last pass: past
    /// several column blocks (NC), several passes and an empty product.
    #[test]
    fn finish_sees_every_value_once_when_it_is_final() {
        for (m, n, k) in [(13, 37, 300), (40, 64, 600), (9, 1100, 20), (5, 7, 0)] {
            let a = matrix(m, k, false, 1);
            let b = matrix(k, n, true, 2);
            let (oa, ob) = (operand(&a, m, k), operand(&b, k, n));
            let stride = n + 3;
            let mut plain = vec![f32::NAN; m * stride];
            let mut finished = plain.clone();
            let c = finished.as_mut_ptr();
            let finish = |rows: Range<usize>, cols: Range<usize>| {
                for i in rows {
                    for j in cols.clone() {
                        unsafe { *c.add(i * stride + j) = *c.add(i * stride + j) * 2.0 + 1.0 };
                    }
                }
            };
            unsafe {
                sgemm((m, n, k), plain.as_mut_ptr(), stride, oa, ob);
                sgemm_then((m, n, k), c, stride, oa, ob, &finish);
            }
            for i in 0..m {
                for j in 0..stride {
                    let (got, want) = (finished[i * stride + j], plain[i * stride + j] * 2.0 + 1.0);
                    assert!(
                        got == want || (j >= n && got.is_nan()),
                        "{m}x{n}x{k} at ({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
