//! A persistent, spin-synchronised worker pool for the short parallel regions of a decode step.
//!
//! A decode step at batch 1 is some forty parallel regions of 50–500 µs each (q/k/v, o_proj,
//! router, experts' gate/up, experts' down, per layer). A general work-stealing pool entered
//! from outside (rayon, called from the engine's thread) parks the caller and wakes its
//! workers through the kernel on every region; on a small VM a wake-up can cost tens of
//! microseconds, and the caller's core sits idle for the region. Here the caller works on its
//! own region and the helpers spin between regions (yielding the core now and then), so a
//! region starts within a cache-line transfer and ends when the last item does.
//!
//! Invariants:
//! - [`for_each`] returns only after every item has run, and no helper holds a reference to
//!   the region afterwards: a helper announces itself (`entered`) before it reads the region
//!   and the caller withdraws the region before it waits for `entered` to drain.
//! - Each index is claimed exactly once (one `fetch_add` per claim), whatever the number of
//!   helpers that join; the caller alone can finish a region, so a descheduled helper never
//!   holds one up.
//! - One region at a time: a second caller (another engine in the process, or a region
//!   started inside a region) runs its items through rayon instead of waiting.
//! - Helpers that have spun `SPIN` without work sleep on a condition variable and are woken
//!   by the next region; the pool never costs a core while the process is idle.

use rayon::prelude::*;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it sleeps.
const SPIN: Duration = Duration::from_millis(2);

/// One region: `n` indices, each run once through `f`.
struct Region<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    /// Set when an item panicked on a helper (the caller panics in its place).
    panicked: AtomicBool,
}

impl Region<'_> {
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= self.n {
                return;
            }
            (self.f)(i);
        }
    }
}

struct Shared {
    /// The open region (a `*const Region` with its lifetime erased), or null.
    region: AtomicPtr<()>,
    /// Bumped for each region opened.
    epoch: AtomicU64,
    /// Helpers between announcing themselves and leaving a region.
    entered: AtomicUsize,
    /// Helpers asleep (or about to be) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

struct Pool {
    shared: &'static Shared,
    helpers: usize,
    /// Held by the one caller whose region is open.
    busy: Mutex<()>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            region: AtomicPtr::new(ptr::null_mut()),
            epoch: AtomicU64::new(0),
            entered: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }));
        let helpers = rayon::current_num_threads().saturating_sub(1);
        for i in 0..helpers {
            std::thread::Builder::new()
                .name(format!("switchyard-pool-{i}"))
                .spawn(move || helper(shared))
                .expect("spawn a pool helper");
        }
        Pool {
            shared,
            helpers,
            busy: Mutex::new(()),
        }
    })
}

fn helper(s: &'static Shared) {
    let mut seen = s.epoch.load(SeqCst);
    loop {
        // Wait for a new region: spin, then sleep.
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.epoch.load(SeqCst) != seen {
                break;
            }
            spins = spins.wrapping_add(1);
            if spins % 64 != 0 {
                std::hint::spin_loop();
                continue;
            }
            if start.elapsed() < SPIN {
                // Let another runnable thread have the core now and then.
                if spins % 4096 == 0 {
                    std::thread::yield_now();
                }
                continue;
            }
            let g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, SeqCst);
            let mut g = g;
            while s.epoch.load(SeqCst) == seen {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, SeqCst);
            break;
        }
        seen = s.epoch.load(SeqCst);
        s.entered.fetch_add(1, SeqCst);
        let p = s.region.load(SeqCst) as *const Region<'static>;
        if !p.is_null() {
            // SAFETY: the caller withdraws the region (stores null) before it waits for
            // `entered` to reach zero, and we announced ourselves before loading the pointer
            // (all SeqCst): either we saw null, or the caller will wait for our decrement
            // below before the region goes out of scope.
            let region = unsafe { &*p };
            if catch_unwind(AssertUnwindSafe(|| region.work())).is_err() {
                region.panicked.store(true, SeqCst);
            }
        }
        s.entered.fetch_sub(1, SeqCst);
    }
}

/// Runs `f(i)` for every `i < n`, on the calling thread and the pool's helpers.
pub fn run(n: usize, f: &(dyn Fn(usize) + Sync)) {
    if n == 0 {
        return;
    }
    let p = pool();
    if n == 1 || p.helpers == 0 {
        return (0..n).for_each(f);
    }
    let _busy = match p.busy.try_lock() {
        Ok(g) => g,
        // A region whose item panicked released the lock poisoned; the pool is intact.
        Err(TryLockError::Poisoned(e)) => e.into_inner(),
        Err(TryLockError::WouldBlock) => return (0..n).into_par_iter().for_each(f),
    };
    let s = p.shared;
    let region = Region {
        f,
        n,
        next: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
    };
    /// Withdraws the region and waits for the helpers inside it, also when an item panics
    /// on this thread (the region lives on this stack frame).
    struct Close(&'static Shared);
    impl Drop for Close {
        fn drop(&mut self) {
            self.0.region.store(ptr::null_mut(), SeqCst);
            while self.0.entered.load(SeqCst) != 0 {
                std::hint::spin_loop();
            }
        }
    }
    s.region
        .store(&region as *const Region<'_> as *mut (), SeqCst);
    let close = Close(s);
    s.epoch.fetch_add(1, SeqCst);
    if s.sleepers.load(SeqCst) > 0 {
        let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
        s.wake.notify_all();
    }
    region.work();
    drop(close);
    if region.panicked.load(SeqCst) {
        panic!("a parallel item panicked on a pool helper");
    }
}

/// Runs `f` on each item, on the calling thread and the pool's helpers (each item once).
pub fn for_each<T: Send>(items: Vec<T>, f: impl Fn(T) + Sync) {
    struct Slots<T>(Vec<UnsafeCell<Option<T>>>);
    // SAFETY: slot `i` is taken only by the one thread that claimed index `i`.
    unsafe impl<T: Send> Sync for Slots<T> {}
    let slots = Slots(
        items
            .into_iter()
            .map(|t| UnsafeCell::new(Some(t)))
            .collect(),
    );
    let n = slots.0.len();
    let slots = &slots;
    run(n, &|i| {
        // SAFETY: `run` hands each index to exactly one call.
        let item = unsafe { (*slots.0[i].get()).take() }.expect("each slot taken once");
        f(item)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_whatever_the_contention() {
        // Several callers at once: one gets the pool, the others fall back to rayon; every
        // item of every region runs exactly once.
        let hits: Vec<AtomicUsize> = (0..4 * 1000).map(|_| AtomicUsize::new(0)).collect();
        std::thread::scope(|sc| {
            for c in 0..4 {
                let hits = &hits;
                sc.spawn(move || {
                    for round in 0..50 {
                        let items: Vec<usize> = (0..1000).filter(|i| i % 50 == round).collect();
                        for_each(items, |i| {
                            hits[c * 1000 + i].fetch_add(1, SeqCst);
                        });
                    }
                });
            }
        });
        assert!(hits.iter().all(|h| h.load(SeqCst) == 1));
    }

    #[test]
    fn a_panicking_item_panics_the_caller_and_the_pool_goes_on() {
        for bad in [0, 63] {
            let r = catch_unwind(|| {
                run(64, &|i| {
                    if i == bad {
                        panic!("item {i}");
                    }
                })
            });
            assert!(r.is_err());
            let total = AtomicUsize::new(0);
            run(100, &|_| {
                total.fetch_add(1, SeqCst);
            });
            assert_eq!(total.load(SeqCst), 100);
        }
    }

    #[test]
    fn nested_regions_complete() {
        let total = AtomicUsize::new(0);
        run(8, &|_| {
            run(8, &|_| {
                total.fetch_add(1, SeqCst);
            })
        });
        assert_eq!(total.load(SeqCst), 64);
    }
}
