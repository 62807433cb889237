//! Reusable host buffers for the fused kernel.
//!
//! A fine-grained MoE call needs tens of megabytes of temporaries. Allocating them afresh maps,
//! faults in, zeroes and unmaps memory on every call, which cost about a quarter of the E64
//! forward pass (measured with `perf`). Large buffers are therefore recycled through a small
//! global pool, and per-task buffers live in a thread-local scratch area.

use std::cell::RefCell;
use std::sync::Mutex;

/// Buffers kept for reuse; beyond this the smallest is freed.
const MAX_POOLED: usize = 8;

static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A buffer of `len` initialised floats with unspecified contents (recycled or zero).
pub fn take(len: usize) -> Vec<f32> {
    let recycled = {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        // The smallest buffer that fits, else the largest (grown below).
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .or_else(|| pool.iter().enumerate().max_by_key(|(_, v)| v.capacity()))
            .map(|(i, _)| i);
        best.map(|i| pool.swap_remove(i))
    };
    match recycled {
        Some(mut v) => {
            v.resize(len, 0.0);
            v
        }
        None => vec![0.0; len],
    }
}

/// Returns a buffer to the pool.
pub fn give(v: Vec<f32>) {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    pool.push(v);
    if pool.len() > MAX_POOLED
        && let Some(i) = pool
            .iter()
            .enumerate()
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i)
    {
        pool.swap_remove(i);
    }
}

thread_local! {
    static LOCAL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch split into buffers of the given lengths.
pub fn with_local<const N: usize, R>(lens: [usize; N], f: impl FnOnce([&mut [f32]; N]) -> R) -> R {
    LOCAL.with(|cell| {
        let mut buf = cell.borrow_mut();
        let total: usize = lens.iter().sum();
        if buf.len() < total {
            buf.resize(total, 0.0);
        }
        let mut rest: &mut [f32] = &mut buf[..total];
        let parts = lens.map(|len| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            head
        });
        f(parts)
    })
}
