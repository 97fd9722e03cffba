use crate::{Error, Result};
use magpie_core::Device;

/// Whether this build has CUDA support compiled in.
pub fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

/// Maps the user's device choice to a candle device. `Auto` takes a CUDA GPU when the
/// build has CUDA and the driver answers, otherwise the CPU (logging why once).
pub fn select_device(choice: Device) -> Result<candle_core::Device> {
    match choice {
        Device::Cpu => Ok(candle_core::Device::Cpu),
        Device::Cuda(n) => {
            if !cuda_compiled() {
                return Err(Error::CudaNotCompiled);
            }
            candle_core::Device::new_cuda(n).map_err(|e| Error::Device(format!("cuda:{n}: {e}")))
        }
        Device::Auto => {
            if cuda_compiled() {
                match candle_core::Device::new_cuda(0) {
                    Ok(d) => return Ok(d),
                    Err(e) => tracing::warn!("no usable CUDA device ({e}); using the CPU"),
                }
            }
            Ok(candle_core::Device::Cpu)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        if !cuda_compiled() {
            let err = select_device(Device::Cuda(0)).unwrap_err().to_string();
            assert!(err.contains("without CUDA"), "{err}");
            assert!(select_device(Device::Auto).unwrap().is_cpu());
        }
    }
}
