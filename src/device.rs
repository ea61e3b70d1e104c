//! Choosing where tensors live.

use candle_core::Device;

use crate::config::DeviceKind;
use crate::error::UserError;

/// The device a config asks for. `cuda` on a build or machine without CUDA is
/// a config error; `auto` falls back to the CPU.
pub fn select(kind: DeviceKind) -> Result<Device, UserError> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => Device::new_cuda(0).map_err(|e| {
            UserError::key(
                "device",
                format!("no CUDA device ({e}); build with `--features cuda` on a GPU machine, or use \"cpu\""),
            )
        }),
        DeviceKind::Auto => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
    }
}
