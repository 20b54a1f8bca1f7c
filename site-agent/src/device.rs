//! Where the engine runs: `--device auto|cpu|cuda[:N]` parsed, checked against this build and
//! this machine, and described for logs and the agent's Hello.
//!
//! `auto` takes the first CUDA GPU when the build has CUDA (`cuda` feature) and the driver
//! shows one, else the CPU, and says which and why. Asking for `cuda` in a CPU build, or on a
//! machine whose driver shows no GPU, is an error that says what to do, never a silent CPU run.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// What was asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The first GPU when the build and the machine have one, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// CUDA GPU by ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" => return Ok(Self::Auto),
            "cpu" => return Ok(Self::Cpu),
            "cuda" | "gpu" => return Ok(Self::Cuda(0)),
            _ => {}
        }
        if let Some(n) = t.strip_prefix("cuda:").or_else(|| t.strip_prefix("gpu:"))
            && let Ok(n) = n.parse::<usize>()
        {
            return Ok(Self::Cuda(n));
        }
        Err(DeviceError::Parse(s.to_owned()))
    }
}

/// Why a device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device \"{0}\" is not one of auto, cpu, cuda, cuda:N (N = the GPU's index, from 0)")]
    Parse(String),
    #[error(
        "device {0} needs a build with CUDA, and this one trains on the CPU only: build with \
         `cargo build --release --features cuda -p site-agent` (bench/cuda-env.sh sets up the \
         CUDA toolchain), or use --device cpu (or auto)"
    )]
    NotBuilt(DeviceChoice),
    #[error(
        "device {asked}: no CUDA GPU is visible ({reason}); check that `nvidia-smi` lists one \
         and that CUDA_VISIBLE_DEVICES does not hide it, or use --device cpu (or auto)"
    )]
    NoGpu { asked: DeviceChoice, reason: String },
    #[error(
        "device cuda:{ordinal}: this machine shows {count} CUDA GPU(s), numbered from 0; use \
         cuda:0 to cuda:{last}",
        last = count.saturating_sub(1)
    )]
    NoSuchGpu { ordinal: usize, count: usize },
    #[error("device {asked}: the GPU could not be opened: {reason}")]
    Open { asked: DeviceChoice, reason: String },
}

/// What a selected device is, for logs and the agent's Hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `cpu` or `cuda`.
    pub kind: &'static str,
    /// The GPU's index (`None` on the CPU).
    pub ordinal: Option<usize>,
    /// The GPU's name, or the CPU's model name where the system says it.
    pub name: String,
    /// The GPU's memory, or the machine's, in bytes (0 where unknown).
    pub memory_bytes: u64,
    /// Why `auto` chose what it chose (empty for an explicit choice).
    pub note: String,
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gib = self.memory_bytes as f64 / (1u64 << 30) as f64;
        match self.ordinal {
            Some(n) => write!(f, "cuda:{n} ({}, {gib:.1} GiB)", self.name)?,
            None if self.name.is_empty() => f.write_str("cpu")?,
            None => write!(f, "cpu ({})", self.name)?,
        }
        if !self.note.is_empty() {
            write!(f, "; {}", self.note)?;
        }
        Ok(())
    }
}

/// A device to build tensors on, with its description.
#[derive(Clone, Debug)]
pub struct Selected {
    pub device: Device,
    pub info: DeviceInfo,
}

/// Whether this build can train on CUDA GPUs.
pub const fn cuda_built() -> bool {
    cfg!(feature = "cuda")
}

impl DeviceChoice {
    /// Opens the device, or says why not.
    pub fn select(self) -> Result<Selected, DeviceError> {
        match self {
            Self::Cpu => Ok(cpu(String::new())),
            Self::Cuda(_) if !cuda_built() => Err(DeviceError::NotBuilt(self)),
            Self::Cuda(n) => gpu::open(self, n),
            Self::Auto if !cuda_built() => Ok(cpu("auto: this build has no CUDA".into())),
            Self::Auto => match gpu::count() {
                Ok(0) => Ok(cpu("auto: no CUDA GPU is visible".into())),
                Ok(_) => {
                    let mut s = gpu::open(self, 0)?;
                    s.info.note = "auto: the first CUDA GPU".into();
                    Ok(s)
                }
                Err(reason) => Ok(cpu(format!("auto: no CUDA GPU is visible ({reason})"))),
            },
        }
    }
}

fn cpu(note: String) -> Selected {
    Selected {
        device: Device::Cpu,
        info: DeviceInfo {
            kind: "cpu",
            ordinal: None,
            name: cpu_name().unwrap_or_default(),
            memory_bytes: host_memory_bytes().unwrap_or(0),
            note,
        },
    }
}

/// The CPU's model name from /proc/cpuinfo (Linux).
fn cpu_name() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_owned())
}

/// The machine's memory from /proc/meminfo (Linux).
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Free memory on `device` in bytes: the GPU's free memory, `None` on the CPU.
pub fn free_memory_bytes(device: &Device) -> Option<u64> {
    gpu::mem_info(device).map(|(free, _)| free)
}

/// The GPU's memory in bytes, `None` on the CPU.
pub fn total_memory_bytes(device: &Device) -> Option<u64> {
    gpu::mem_info(device).map(|(_, total)| total)
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::{DeviceChoice, DeviceError, DeviceInfo, Selected};
    use candle_core::Device;
    use candle_core::cuda_backend::cudarc::driver::CudaContext;

    pub(super) fn count() -> Result<usize, String> {
        CudaContext::device_count().map(|n| n.max(0) as usize).map_err(|e| e.to_string())
    }

    pub(super) fn open(asked: DeviceChoice, ordinal: usize) -> Result<Selected, DeviceError> {
        let n = count().map_err(|reason| DeviceError::NoGpu { asked, reason })?;
        if n == 0 {
            return Err(DeviceError::NoGpu { asked, reason: "the driver lists none".into() });
        }
        if ordinal >= n {
            return Err(DeviceError::NoSuchGpu { ordinal, count: n });
        }
        let open_err = |reason: String| DeviceError::Open { asked, reason };
        let device = Device::new_cuda(ordinal).map_err(|e| open_err(e.to_string()))?;
        let ctx = device
            .as_cuda_device()
            .map_err(|e| open_err(e.to_string()))?
            .cuda_stream()
            .context()
            .clone();
        let name = ctx.name().map_err(|e| open_err(e.to_string()))?;
        let memory_bytes = ctx.total_mem().map_err(|e| open_err(e.to_string()))? as u64;
        Ok(Selected {
            device,
            info: DeviceInfo {
                kind: "cuda",
                ordinal: Some(ordinal),
                name,
                memory_bytes,
                note: String::new(),
            },
        })
    }

    pub(super) fn mem_info(device: &Device) -> Option<(u64, u64)> {
        let ctx = device.as_cuda_device().ok()?.cuda_stream().context().clone();
        ctx.mem_get_info().ok().map(|(free, total)| (free as u64, total as u64))
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    use super::{DeviceChoice, DeviceError, Selected};
    use candle_core::Device;

    pub(super) fn count() -> Result<usize, String> {
        Ok(0)
    }

    pub(super) fn open(asked: DeviceChoice, _ordinal: usize) -> Result<Selected, DeviceError> {
        Err(DeviceError::NotBuilt(asked))
    }

    pub(super) fn mem_info(_device: &Device) -> Option<(u64, u64)> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_and_refuses_others() {
        for (s, want) in [
            ("auto", DeviceChoice::Auto),
            ("CPU", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("gpu", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
            (" cuda:0 ", DeviceChoice::Cuda(0)),
        ] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap(), want, "{s}");
        }
        for bad in ["", "cuda:", "cuda:-1", "cuda:x", "metal", "cuda0", "tpu"] {
            let e = bad.parse::<DeviceChoice>().unwrap_err().to_string();
            assert!(e.contains("auto, cpu, cuda, cuda:N"), "{bad}: {e}");
        }
        for c in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda(2)] {
            assert_eq!(c.to_string().parse::<DeviceChoice>().unwrap(), c);
        }
    }

    #[test]
    fn cpu_and_auto_select_a_working_device() {
        let s = DeviceChoice::Cpu.select().unwrap();
        assert!(s.device.is_cpu());
        assert_eq!((s.info.kind, s.info.ordinal), ("cpu", None));
        let a = DeviceChoice::Auto.select().unwrap();
        if !cuda_built() {
            assert!(a.device.is_cpu());
            assert_eq!(a.info.note, "auto: this build has no CUDA");
            assert!(a.info.to_string().ends_with("; auto: this build has no CUDA"), "{}", a.info);
        } else if a.device.is_cpu() {
            assert!(a.info.note.starts_with("auto: no CUDA GPU is visible"), "{}", a.info);
        } else {
            assert_eq!((a.info.kind, a.info.ordinal), ("cuda", Some(0)));
            assert!(a.info.memory_bytes > 0);
        }
    }

    #[test]
    fn cuda_on_a_cpu_build_or_without_a_gpu_says_what_to_do() {
        match DeviceChoice::Cuda(0).select() {
            Err(DeviceError::NotBuilt(_)) => {
                assert!(!cuda_built());
                let e = DeviceChoice::Cuda(0).select().unwrap_err().to_string();
                assert!(e.contains("--features cuda"), "{e}");
                assert!(e.contains("--device cpu"), "{e}");
            }
            Err(DeviceError::NoGpu { reason, .. }) => {
                assert!(cuda_built());
                assert!(!reason.is_empty());
            }
            Ok(s) => assert!(cuda_built() && !s.device.is_cpu()),
            Err(e) => panic!("unexpected: {e}"),
        }
        if cuda_built()
            && let Ok(n) = gpu::count()
        {
            let e = DeviceChoice::Cuda(n + 1).select().unwrap_err();
            assert!(matches!(e, DeviceError::NoSuchGpu { .. } | DeviceError::NoGpu { .. }), "{e}");
        }
    }
}
