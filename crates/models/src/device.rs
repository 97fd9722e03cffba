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
            new_cuda(n).map_err(|e| Error::Device(format!("cuda:{n}: {e}")))
        }
        Device::Auto => {
            if cuda_compiled() {
                match new_cuda(0) {
                    Ok(d) => return Ok(d),
                    Err(e) => {
                        // Said once per process, however often the device is asked for.
                        static SAID: std::sync::Once = std::sync::Once::new();
                        SAID.call_once(|| tracing::warn!("no usable CUDA device ({e}); using the CPU"));
                    }
                }
            }
            Ok(candle_core::Device::Cpu)
        }
    }
}

/// `candle_core::Device::new_cuda` with cudarc's panics turned into errors: a CUDA build made
/// by scripts/build-cuda opens the CUDA libraries at run time (cudarc's `dynamic-loading`),
/// and cudarc panics when one is missing (libcuda.so.1 without an NVIDIA driver;
/// libcublas.so.13 or libcurand.so.10 when the CUDA 13 libraries are not on
/// LD_LIBRARY_PATH).
fn new_cuda(n: usize) -> std::result::Result<candle_core::Device, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(|| candle_core::Device::new_cuda(n));
    std::panic::set_hook(hook);
    match r {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("CUDA initialisation panicked");
            // "Unable to dynamically load the \"cublas\" shared library - searched for library names: […]"
            let msg = msg.split(" - searched").next().unwrap_or(msg);
            Err(format!("{msg}: is the NVIDIA driver installed, and are the CUDA 13 libraries on LD_LIBRARY_PATH?"))
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
