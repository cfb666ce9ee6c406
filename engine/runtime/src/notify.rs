//! Readiness for event loops that must not block a thread per wait (asyncio): a node can be
//! *watched* through a [`Notifier`], whose descriptor becomes readable when a call to run, a
//! membership event or the answer to a call started with [`crate::Client::start_async`] is
//! ready. The loop then clears the notifier and takes everything that is ready, without
//! waiting.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use daffi_driver::ReadySignal;

use crate::call::{CallError, Reply};

/// See the module documentation.
#[derive(Debug)]
pub struct Notifier {
    signal: ReadySignal,
    /// The signal was raised and not cleared since: more notifications cost nothing.
    raised: AtomicBool,
}

impl Notifier {
    pub fn new() -> io::Result<Arc<Notifier>> {
        Ok(Arc::new(Notifier {
            signal: ReadySignal::new()?,
            raised: AtomicBool::new(false),
        }))
    }

    /// The descriptor to watch for readability.
    pub fn fd(&self) -> RawFd {
        self.signal.fd()
    }

    pub(crate) fn notify(&self) {
        if !self.raised.swap(true, Ordering::AcqRel) {
            self.signal.raise();
        }
    }

    /// Runs `f` without making the descriptor readable for what it makes ready: for the event
    /// loop's own thread, which takes everything that is ready right after. (A notification
    /// from another thread meanwhile is for something pushed before it, taken then too.)
    pub(crate) fn quiet<R>(&self, f: impl FnOnce() -> R) -> R {
        let was = self.raised.swap(true, Ordering::AcqRel);
        let r = f();
        if !was {
            self.raised.store(false, Ordering::SeqCst);
        }
        r
    }

    /// Makes the descriptor unreadable until the next notification. Call it before taking what
    /// is ready, so that nothing made ready meanwhile goes unnoticed.
    pub fn clear(&self) {
        // Drain first: a notification that comes after the flag is reset must leave the
        // descriptor readable, and draining after the reset could swallow it.
        self.signal.drain();
        self.raised.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(n: &Notifier) -> bool {
        n.signal.is_raised()
    }

    #[test]
    fn a_notification_after_a_clear_is_never_lost() {
        let n = Notifier::new().unwrap();
        n.notify();
        n.notify();
        assert!(readable(&n));
        n.clear();
        assert!(!readable(&n));
        n.notify();
        assert!(readable(&n));
        // Notifications racing with clears: one that the clear did not see must leave the
        // descriptor readable, or at least leave the next notification able to raise it.
        for _ in 0..10000 {
            let n2 = n.clone();
            let t = std::thread::spawn(move || n2.notify());
            n.clear();
            t.join().unwrap();
            // The notification came before or after the clear; if after, it must show.
            if !readable(&n) {
                n.notify();
                assert!(readable(&n), "a notification after a clear was swallowed");
            }
            n.clear();
        }
    }
}

/// Answers of calls started with [`crate::Client::start_async`], by call id.
#[derive(Debug)]
pub struct Completions {
    notifier: Arc<Notifier>,
    done: Mutex<Vec<(u64, Result<Reply, CallError>)>>,
}

impl Completions {
    pub(crate) fn new(notifier: Arc<Notifier>) -> Arc<Completions> {
        Arc::new(Completions {
            notifier,
            done: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn push(&self, id: u64, r: Result<Reply, CallError>) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, r));
        self.notifier.notify();
    }

    /// Every answer that arrived since the last call, in arrival order.
    pub fn take(&self) -> Vec<(u64, Result<Reply, CallError>)> {
        std::mem::take(&mut *self.done.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
