//! The memory a run holds, read for each training log record.
//!
//! - **CUDA**: the device's memory pool, which candle allocates every tensor from
//!   (`cuMemAllocAsync`). `memory/device_allocated_gib` is the bytes of live tensors now and
//!   `memory/device_peak_gib` the most there were at once since the process started (PyTorch's
//!   `memory_allocated` and `max_memory_allocated`, the figure TRL's benchmark reports);
//!   `memory/device_reserved_gib` is what the pool holds from the driver now, freed blocks kept for
//!   reuse included. None of them counts the CUDA context or cuBLAS's workspace, which
//!   `nvidia-smi` does (1.0-1.9 GiB more on the H100, BENCHMARKS.md).
//! - **CPU** (Linux): the process's resident set now and at most since it started, `memory/rss_gib`
//!   and `memory/peak_rss_gib` (`VmRSS` and `VmHWM` of `/proc/self/status`).
//! - Elsewhere (Metal, other systems): nothing.
//!
//! Reading takes no synchronization with the device.

use candle_core::Device;
use serde_json::{Map, Value};

const GIB: f64 = (1u64 << 30) as f64;

/// The memory fields of a log record for `device` (empty where nothing can be read).
pub fn record(device: &Device) -> Map<String, Value> {
    let fields: Vec<(&str, u64)> = match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda_pool(cuda).unwrap_or_else(|e| {
            tracing::debug!("device memory pool not readable: {e:?}");
            Vec::new()
        }),
        Device::Cpu => resident_set().unwrap_or_default(),
        #[allow(unreachable_patterns)]
        _ => Vec::new(),
    };
    fields.into_iter().map(|(k, bytes)| (k.to_string(), Value::from(bytes as f64 / GIB))).collect()
}

/// The pool's bytes in use now and at most, and held from the driver now.
#[cfg(feature = "cuda")]
fn cuda_pool(
    cuda: &candle_core::CudaDevice,
) -> Result<Vec<(&'static str, u64)>, candle_core::cuda_backend::cudarc::driver::DriverError> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys::CUmemPool_attribute as A};
    let device = cuda.cuda_stream().context().cu_device();
    // SAFETY: `device` is a valid CUdevice, and these attributes are u64 (cuuint64_t) values.
    unsafe {
        let pool = result::device::get_mem_pool(device)?;
        let read = |attr| -> Result<u64, _> {
            let mut v = 0u64;
            result::mem_pool::get_attribute(pool, attr, (&mut v as *mut u64).cast()).map(|()| v)
        };
        Ok(vec![
            ("memory/device_allocated_gib", read(A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?),
            ("memory/device_peak_gib", read(A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?),
            ("memory/device_reserved_gib", read(A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?),
        ])
    }
}

/// `VmRSS` and `VmHWM` of this process, in bytes (Linux only).
fn resident_set() -> Option<Vec<(&'static str, u64)>> {
    let (now, peak) = parse_status(&std::fs::read_to_string("/proc/self/status").ok()?)?;
    Some(vec![("memory/rss_gib", now), ("memory/peak_rss_gib", peak)])
}

/// `VmRSS` and `VmHWM` of a `/proc/<pid>/status` text, in bytes.
fn parse_status(status: &str) -> Option<(u64, u64)> {
    let kib = |key: &str| -> Option<u64> {
        let line = status.lines().find_map(|l| l.strip_prefix(key))?;
        line.trim().strip_suffix("kB")?.trim().parse::<u64>().ok().map(|k| k * 1024)
    };
    Some((kib("VmRSS:")?, kib("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_in_bytes() {
        let status = "Name:\tdpo-train\nVmPeak:\t 2310824 kB\nVmHWM:\t   71900 kB\nVmRSS:\t   65536 kB\n";
        assert_eq!(parse_status(status), Some((65536 * 1024, 71900 * 1024)));
        assert_eq!(parse_status("VmRSS:\t12 kB\n"), None, "no VmHWM");
        assert_eq!(parse_status("VmRSS:\t12 MB\nVmHWM:\t12 kB\n"), None, "not in kB");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn cpu_record_reads_this_process() {
        let r = record(&Device::Cpu);
        let gib = |k: &str| r[k].as_f64().unwrap();
        // A test binary holds at least a few MiB, and its peak is at least what it holds now.
        assert!(gib("memory/rss_gib") > 1.0 / 1024.0, "{r:?}");
        assert!(gib("memory/peak_rss_gib") >= gib("memory/rss_gib"), "{r:?}");
    }
}
