//! Spin, then sleep: how a thread waits for bytes it expects soon.
//!
//! A thread that sleeps in `poll` until its peer answers pays for being woken: on loopback,
//! and on virtual machines above all, that wake-up (an idle CPU leaving its halt state, the
//! scheduler running the thread again) can cost more than the whole exchange. A waiter that
//! expects its bytes within a few tens of microseconds therefore first asks, without sleeping,
//! whether they came, yielding the CPU between questions so that any other runnable thread (the
//! peer's, on a small machine) runs meanwhile, and only sleeps once its budget is spent.
//!
//! The budget adapts per waiter: each wait's length feeds a running estimate, and a waiter
//! whose waits are long (a slow callback, an idle peer) stops spinning, so an idle node costs
//! no CPU. One wait in [`PROBE_EVERY`] spins regardless, so that a waiter learns when its waits
//! became short again. `DAFFI_SPIN_US` sets the longest spin in microseconds (0 turns spinning
//! off); the default is [`DEFAULT_SPIN`].

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The longest spin unless `DAFFI_SPIN_US` says otherwise.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(100);
/// A yield that took longer than this ran another thread: the CPU is wanted, stop spinning.
const CONTENDED: Duration = Duration::from_micros(20);
/// One wait in this many spins whatever the estimate.
const PROBE_EVERY: u32 = 16;

/// The longest spin of this process (`DAFFI_SPIN_US`, else [`DEFAULT_SPIN`]).
pub fn max_spin() -> Duration {
    static MAX: OnceLock<Duration> = OnceLock::new();
    *MAX.get_or_init(|| match std::env::var("DAFFI_SPIN_US") {
        Err(_) => DEFAULT_SPIN,
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(us) => Duration::from_micros(us.min(10_000)),
            Err(_) => {
                tracing::warn!(
                    "DAFFI_SPIN_US={v:?} is not a number of microseconds: using the default"
                );
                DEFAULT_SPIN
            }
        },
    })
}

/// One waiter's estimate of how long its waits last. See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Spin {
    /// Running average of recent waits, in nanoseconds (0 until the first).
    estimate: AtomicU64,
    /// Waits so far, for the probes.
    waits: AtomicU32,
    /// Never spins (see [`Spin::set_quiet`]).
    quiet: AtomicBool,
}

impl Spin {
    /// Makes this waiter sleep at once from now on (`true`), or spin again.
    pub(crate) fn set_quiet(&self, quiet: bool) {
        self.quiet.store(quiet, Ordering::Relaxed);
    }

    pub(crate) fn is_quiet(&self) -> bool {
        self.quiet.load(Ordering::Relaxed)
    }

    /// How long the next wait may spin before it sleeps (zero: sleep at once).
    pub(crate) fn budget(&self) -> Duration {
        let max = max_spin();
        if max.is_zero() || self.quiet.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let n = self.waits.fetch_add(1, Ordering::Relaxed);
        let estimate = Duration::from_nanos(self.estimate.load(Ordering::Relaxed));
        if estimate <= max || n % PROBE_EVERY == 0 {
            max
        } else {
            Duration::ZERO
        }
    }

    /// Records how long a wait lasted, whether it spun or slept.
    pub(crate) fn record(&self, waited: Duration) {
        // A long wait counts as a few times the longest spin, so that a few short ones bring
        // the estimate back under it.
        let cap = 4 * max_spin().as_nanos() as u64;
        let sample = waited.as_nanos().min(u128::from(cap)) as u64;
        let old = self.estimate.load(Ordering::Relaxed);
        // An average weighing the newest wait a quarter.
        self.estimate
            .store(old - old / 4 + sample / 4, Ordering::Relaxed);
    }

    /// One whole wait: `check(false)` asks without sleeping, as often as the budget allows
    /// (see [`Spin::spin`]); if nothing came, `check(true)` sleeps (the waiter's blocking
    /// wait, which may give up: `None`). Records how long it all took.
    pub(crate) fn wait<T>(
        &self,
        until: Option<Instant>,
        mut check: impl FnMut(bool) -> Option<T>,
    ) -> Option<T> {
        let started = Instant::now();
        let got = self
            .spin(started, until, || check(false))
            .or_else(|| check(true));
        self.record(started.elapsed());
        got
    }

    /// Spins until `ready` says the wait is over (`Some`) or the budget is spent (`None`),
    /// yielding the CPU between questions. `until` cuts the spin short.
    pub(crate) fn spin<T>(
        &self,
        started: Instant,
        until: Option<Instant>,
        mut ready: impl FnMut() -> Option<T>,
    ) -> Option<T> {
        let budget = self.budget();
        if budget.is_zero() {
            return None;
        }
        let _turn = Spinning::enter()?;
        let end = started + budget;
        let end = until.map_or(end, |u| u.min(end));
        // Asked first, before any yield: for the engine, asking also submits what it queued.
        loop {
            if let Some(v) = ready() {
                return Some(v);
            }
            let before = Instant::now();
            if before >= end {
                return None;
            }
            std::thread::yield_now();
            // A slow yield means another thread had work for this CPU: sleeping, to be woken
            // (and preferred by the scheduler) when the bytes come, serves both better.
            if before.elapsed() > CONTENDED {
                return ready();
            }
        }
    }
}

/// Whether a client connected through a Router spins while it waits for its socket. A routed
/// call keeps three processes busy in turn (caller, Router, worker), and the Router, a pure
/// forwarder, spins between its two hops; if the caller and the worker spun as well, three
/// spinners would share fewer than three CPUs, and each hop would wait for a spinner to give
/// its CPU up. With fewer than four CPUs the clients therefore sleep at once and leave the
/// spinning to the Router (measured on 2 CPUs: 30% more sequential calls through a Router).
/// An explicit `DAFFI_SPIN_US` applies to routed clients too (`0`: nobody spins).
pub(crate) fn routed_clients_spin() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var_os("DAFFI_SPIN_US").is_some()
            || std::thread::available_parallelism().map_or(1, |n| n.get()) >= 4
    })
}

/// Threads of this process spinning right now.
static SPINNING: AtomicU32 = AtomicU32::new(0);

/// The most threads of one process that spin at once: half the CPUs, at least one. More
/// spinners than that would take the CPUs their peers (and the rest of the process) need to
/// produce what they wait for.
fn max_spinning() -> u32 {
    static MAX: OnceLock<u32> = OnceLock::new();
    *MAX.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cpus / 2).max(1) as u32
    })
}

/// One thread's turn at spinning, while it lives.
struct Spinning(());

impl Spinning {
    fn enter() -> Option<Spinning> {
        let max = max_spinning();
        SPINNING
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Spinning(()))
    }
}

impl Drop for Spinning {
    fn drop(&mut self) {
        SPINNING.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_waits_stop_the_spinning_and_short_ones_bring_it_back() {
        let s = Spin::default();
        let max = max_spin();
        if max.is_zero() {
            return;
        }
        assert_eq!(s.budget(), max, "a new waiter spins");
        for _ in 0..8 {
            s.record(Duration::from_millis(50));
        }
        let spins = (0..PROBE_EVERY).filter(|_| !s.budget().is_zero()).count();
        assert_eq!(spins, 1, "after long waits only the probes spin");
        for _ in 0..8 {
            s.record(Duration::from_micros(1));
        }
        assert_eq!(s.budget(), max, "short waits bring the spinning back");
    }

    #[test]
    fn a_quiet_waiter_never_spins() {
        let s = Spin::default();
        s.set_quiet(true);
        assert!((0..2 * PROBE_EVERY).all(|_| s.budget().is_zero()));
        assert_eq!(s.spin(Instant::now(), None, || Some(1)), None);
        s.set_quiet(false);
        assert_eq!(s.budget(), max_spin());
    }

    #[test]
    fn a_spin_returns_what_became_ready_or_gives_up() {
        let s = Spin::default();
        if max_spin().is_zero() {
            return;
        }
        // Another test's spin may hold this process's only turn for a moment: try again.
        let got = (0..1000).find_map(|_| s.spin(Instant::now(), None, || Some(7)));
        assert_eq!(got, Some(7));
        let past = Instant::now() - Duration::from_secs(1);
        assert_eq!(
            s.spin(past, None, || None::<()>),
            None,
            "a spent budget gives up"
        );
    }
}
