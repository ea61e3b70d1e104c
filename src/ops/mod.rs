//! CPU kernels as candle custom ops, with explicit backward passes where
//! they are differentiated: the convolutional layers' (candle's own versions
//! differentiate through general reductions and broadcasts, which on CPU
//! cost many times the arithmetic) and the one-pass norm the optimizer and
//! the measurements take of every tensor, the momentum update and the in-place
//! parameter update. Every op is tested against
//! candle's own result. Also the single-threaded matrix product of the
//! fused MLP passes ([`sgemm`]).

mod batch_norm;
pub mod disjoint;
mod im2col;
mod norm;
mod pool;
mod recycled;
mod scale;
mod scale_add;
pub mod sgemm;
mod subtract;
mod symmetry;
mod wide;

use std::ops::{Deref, Range};

use candle_core::{CpuStorage, Layout, Result, Storage, StorageRef, Tensor, bail};

pub use batch_norm::{BatchNormTrain, ChannelMoments};
pub use im2col::{Im2Col, Patches};
pub use norm::{SquareSum, host_l2_norm, l2_norm, sum_of_squares};
pub use pool::Pool2;
pub use recycled::Recycled;
pub use scale::{scale, scale_by};
pub use scale_add::scale_add;
pub use subtract::subtract_in_place;
pub use symmetry::mean_pairwise_cosine;
pub use wide::wide;

/// Values per share when an element-wise pass over a tensor is split
/// between rayon's threads (a single core cannot keep up with the memory
/// bus on the optimizer's passes over the largest layers); smaller tensors
/// stay on the calling thread. Called from a rayon worker (see
/// [`crate::optim::Optimizer::step`]) the split costs no thread wake-up.
pub(crate) const SHARE: usize = 1 << 15;

/// The values of a contiguous f32 tensor.
pub(crate) fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        bail!("larslab's CPU kernels are implemented for f32 only")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("larslab's CPU kernels need contiguous tensors")
    };
    Ok(&values[start..end])
}

/// The values of `t` on the host, borrowed from its storage, where `t` is a
/// contiguous f32 tensor on the CPU; `None` for another device or dtype, or a
/// strided view. The one test, outside the kernels, of whether a tensor's
/// values can be read and computed on in place: the fused passes, the
/// optimizer's pass and the measurements take their CPU path where it gives
/// `Some`, candle operations elsewhere.
pub fn host_f32(t: &Tensor) -> Option<F32View<'_>> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    matches!(&*storage, Storage::Cpu(CpuStorage::F32(_))).then_some(F32View {
        storage,
        range: start..end,
    })
}

/// A contiguous f32 CPU tensor's values, borrowed from its storage ([`host_f32`]).
pub struct F32View<'a> {
    storage: StorageRef<'a>,
    range: Range<usize>,
}

impl<'a> F32View<'a> {
    /// [`host_f32`], or an error for a tensor it does not take.
    pub fn of(t: &'a Tensor) -> Result<Self> {
        match host_f32(t) {
            Some(view) => Ok(view),
            None => bail!("larslab's CPU kernels need contiguous f32 tensors on the CPU"),
        }
    }
}

impl Deref for F32View<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(values)) => &values[self.range.clone()],
            _ => unreachable!("checked in F32View::of"),
        }
    }
}
