//! Where a model runs, from a command-line spec: `cpu`, `cuda` or `cuda:N`. A
//! tensor-parallel model takes one device per rank (rank r on GPU N + r).

use crate::error::{EngineError, Result};
use candle_core::Device;

/// The devices of `ranks` ranks for `spec`, or an error that says what is wrong with it
/// (including a binary built without the `cuda` feature).
pub fn devices(spec: &str, ranks: usize) -> Result<Vec<Device>> {
    if ranks == 0 {
        return Err(EngineError::invalid(
            "tensor-parallel size must be at least 1",
        ));
    }
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("cpu") {
        return Ok(vec![Device::Cpu; ranks]);
    }
    let first = match spec.to_ascii_lowercase().as_str() {
        "cuda" => 0,
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(EngineError::invalid(format!(
                    "device {spec:?}: expected cpu, cuda or cuda:N"
                )));
            }
        },
    };
    if !cfg!(feature = "cuda") {
        return Err(EngineError::invalid(format!(
            "device {spec:?}: this binary was built without CUDA (build with --features cuda, \
             or use the CUDA image)"
        )));
    }
    (first..first + ranks)
        .map(|i| {
            Device::new_cuda(i)
                .map_err(|e| EngineError::invalid(format!("device cuda:{i} (for {spec:?}): {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_give_a_device_per_rank_or_a_clear_error() {
        let d = devices("cpu", 3).unwrap();
        assert_eq!(d.len(), 3);
        assert!(d.iter().all(Device::is_cpu));
        assert!(devices(" CPU ", 1).unwrap()[0].is_cpu());
        for bad in ["tpu", "cuda:", "cuda:x", "cuda0", ""] {
            let e = devices(bad, 1).unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        assert!(devices("cpu", 0).is_err());
        if !cfg!(feature = "cuda") {
            for spec in ["cuda", "cuda:1"] {
                let e = devices(spec, 2).unwrap_err().to_string();
                assert!(e.contains("--features cuda"), "{spec}: {e}");
            }
        }
    }
}
