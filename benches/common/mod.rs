//! Helpers shared by the benchmarks (each bench includes this file as `mod common`).

#![allow(dead_code)]

use std::time::{Duration, Instant};

/// Mean seconds per call of `f` over at least `min` and `min_iters` calls, after one
/// warm-up call.
pub fn timed(min: Duration, min_iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let (mut n, start) = (0, Instant::now());
    while n < min_iters || start.elapsed() < min {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() / n as f64
}

/// Median seconds per call of `f` over at least `min` and `min_iters` calls, after one
/// warm-up call: a latency, which a busy neighbour's occasional slow call does not move
/// as it moves the mean.
pub fn timed_median(min: Duration, min_iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let (mut times, start) = (Vec::new(), Instant::now());
    while times.len() < min_iters.max(1) || start.elapsed() < min {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// The Python that runs the peers (`MAGPIE_BENCH_PYTHON`, default `python3`; `none` skips
/// them where a bench allows it).
pub fn python() -> String {
    std::env::var("MAGPIE_BENCH_PYTHON").unwrap_or_else(|_| "python3".into())
}
