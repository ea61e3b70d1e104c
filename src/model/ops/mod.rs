//! CPU kernels with explicit backward passes, as candle custom ops, for the
//! convolutional layers. Candle's own versions work but differentiate
//! through general reductions and broadcasts, which on CPU cost many times
//! the arithmetic. Every op here is tested against candle's own result.

mod batch_norm;
mod im2col;
mod pool;

use candle_core::{CpuStorage, Layout, Result, bail};

pub use batch_norm::{BatchNormTrain, ChannelMoments};
pub use im2col::Im2Col;
pub use pool::Pool2;

/// The values of a contiguous f32 tensor.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        bail!("larslab's CPU kernels are implemented for f32 only")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("larslab's CPU kernels need contiguous tensors")
    };
    Ok(&values[start..end])
}
