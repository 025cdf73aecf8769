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

/// Sizes the CPU worker pools (candle's and rayon's) to the CPUs this process may use,
/// when that is fewer than the machine has: a process pinned with `taskset`, or a
/// container given a CPU limit. Left alone, candle counts the machine's cores and starts
/// a spinning worker per core, so a process allowed one core runs several workers on it
/// and every matmul waits on the ones not running (measured: a one-core target service
/// at 4 tok/s instead of ~11). `RAYON_NUM_THREADS` or `CANDLE_NUM_THREADS`, when set, win.
/// Returns the size set, if any.
///
/// Call it first thing in `main`, before the process starts any other thread: it sets
/// `RAYON_NUM_THREADS`, which candle reads when it starts its pool.
pub fn size_cpu_pools() -> Option<usize> {
    if std::env::var_os("RAYON_NUM_THREADS").is_some()
        || std::env::var_os("CANDLE_NUM_THREADS").is_some()
    {
        return None;
    }
    let allowed = std::thread::available_parallelism().ok()?.get();
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| count_cpu_list(&s))?;
    if allowed >= online {
        return None;
    }
    // SAFETY: called at the start of `main`, before any other thread exists, so nothing
    // reads the environment while it changes.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", allowed.to_string()) };
    Some(allowed)
}

/// The number of CPUs in a kernel CPU list such as `0-3,8,10-11`.
fn count_cpu_list(list: &str) -> Option<usize> {
    let mut n = 0;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let number = |s: &str| s.trim().parse::<usize>().ok();
        n += match part.split_once('-') {
            Some((a, b)) => number(b)?.checked_sub(number(a)?)? + 1,
            None => number(part).map(|_| 1)?,
        };
    }
    (n > 0).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpu_list("5"), Some(1));
        for bad in ["", "x", "3-1", "0-"] {
            assert_eq!(count_cpu_list(bad), None, "{bad:?}");
        }
    }

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
