//! Calls in flight: the slot a caller waits on and the table that finds it again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use daffi_proto::Flags;

use crate::notify::Completions;
use crate::payload::Payload;
use crate::spin::Spin;

/// A successful answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub serde: u8,
    pub flags: Flags,
    pub payload: Payload,
}

/// Why a call produced no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The callee raised; the payload is the binding's encoded exception.
    #[error("remote error")]
    Remote(Vec<u8>),
    /// The deadline passed.
    #[error("no response within the timeout")]
    Timeout,
    /// The connection closed (or was never open).
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// This node was replaced by a newer one with the same name.
    #[error("evicted: {0}")]
    Evicted(String),
    /// The call could not be delivered (no such function, too large, ...).
    #[error("{0}")]
    Transmission(String),
}

impl CallError {
    /// The error an `Error` frame with this code and payload means for its call.
    pub(crate) fn from_wire(code: &str, payload: Vec<u8>) -> CallError {
        let msg = || String::from_utf8_lossy(&payload).into_owned();
        match code {
            daffi_proto::frame::error_code::REMOTE => CallError::Remote(payload),
            daffi_proto::frame::error_code::DISCONNECTED => CallError::Disconnected(msg()),
            _ => CallError::Transmission(msg()),
        }
    }
}

/// What a [`Slot`] guards: the answer once it came, and how many threads sleep waiting for it.
#[derive(Debug, Default)]
struct Filled {
    value: Option<Result<Reply, CallError>>,
    /// Threads blocked on the condition variable. A caller that reads its own answer (the
    /// common case) has nobody to wake, and the wake-up, a system call, is then skipped.
    sleepers: usize,
}

/// Where one caller waits for one answer.
#[derive(Debug, Default)]
pub struct Slot {
    state: Mutex<Filled>,
    ready: Condvar,
    /// For a call nobody waits for on a thread: where its answer goes instead, under this id.
    hook: Option<(Arc<Completions>, u64)>,
}

impl Slot {
    /// Whether the answer goes to a [`Completions`] list rather than to a waiting thread.
    pub fn is_hooked(&self) -> bool {
        self.hook.is_some()
    }

    pub fn fill(&self, r: Result<Reply, CallError>) {
        if let Some((done, id)) = &self.hook {
            done.push(*id, r);
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.value.is_none() {
            s.value = Some(r);
        }
        let sleepers = s.sleepers;
        drop(s);
        if sleepers > 0 {
            self.ready.notify_all();
        }
    }

    /// Waits until filled or `deadline`; `None` means timed out. Spins a little first (see
    /// [`crate::spin`]), with an estimate of this thread's waits for answers, unless `quiet`.
    pub fn wait(&self, deadline: Option<Instant>, quiet: bool) -> Option<Result<Reply, CallError>> {
        thread_local! {
            static ANSWER_WAITS: Spin = Spin::default();
        }
        if quiet {
            return self.wait_blocking(deadline);
        }
        ANSWER_WAITS.with(|w| {
            w.wait(deadline, |sleep| {
                if sleep {
                    self.wait_blocking(deadline)
                } else {
                    self.try_take()
                }
            })
        })
    }

    fn wait_blocking(&self, deadline: Option<Instant>) -> Option<Result<Reply, CallError>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = s.value.take() {
                return Some(r);
            }
            let timeout = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return None,
                },
            };
            // Counted under the lock `fill` takes, so it cannot miss this sleeper.
            s.sleepers += 1;
            s = match timeout {
                None => self.ready.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(left) => {
                    self.ready
                        .wait_timeout(s, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
            s.sleepers -= 1;
        }
    }

    /// Whether the answer is there (nobody took it yet).
    pub fn is_filled(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .value
            .is_some()
    }

    /// Takes the value if it is there, without waiting.
    pub fn try_take(&self) -> Option<Result<Reply, CallError>> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .value
            .take()
    }
}

/// The calls a client is waiting for, by call id. Ids are 64-bit and never reused.
#[derive(Debug, Default)]
pub struct CallTable {
    next: AtomicU64,
    pending: Mutex<HashMap<u64, Arc<Slot>>>,
}

impl CallTable {
    /// Registers a new call and returns its id and slot.
    pub fn open(&self) -> (u64, Arc<Slot>) {
        self.open_with(None)
    }

    /// Registers a new call whose answer goes to `done` (see [`Completions`]).
    pub fn open_hooked(&self, done: Arc<Completions>) -> (u64, Arc<Slot>) {
        self.open_with(Some(done))
    }

    fn open_with(&self, done: Option<Arc<Completions>>) -> (u64, Arc<Slot>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = Arc::new(Slot {
            hook: done.map(|d| (d, id)),
            ..Default::default()
        });
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, slot.clone());
        (id, slot)
    }

    /// Completes call `id`; an answer for a call nobody waits for any more is dropped.
    pub fn complete(&self, id: u64, r: Result<Reply, CallError>) -> bool {
        let slot = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        match slot {
            Some(s) => {
                s.fill(r);
                true
            }
            None => false,
        }
    }

    /// Forgets call `id` (its caller gave up).
    pub fn abandon(&self, id: u64) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Fails every pending call.
    pub fn fail_all(&self, e: CallError) {
        let all: Vec<_> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for (_, s) in all {
            s.fill(Err(e.clone()));
        }
    }

    pub fn len(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn late_answers_are_dropped() {
        let t = CallTable::default();
        let (a, sa) = t.open();
        let (b, sb) = t.open();
        assert_ne!(a, b);
        assert_eq!(
            sa.wait(Some(Instant::now() + Duration::from_millis(5)), false),
            None
        );
        t.abandon(a);
        assert!(!t.complete(a, Err(CallError::Timeout)));
        let reply = Reply {
            serde: 0,
            flags: Flags(0),
            payload: Payload::Inline(b"x".to_vec()),
        };
        assert!(t.complete(b, Ok(reply)));
        let got = sb.wait(None, true).unwrap().unwrap();
        assert_eq!(got.payload.as_slice(), b"x");
        assert!(t.is_empty());
    }

    #[test]
    fn an_answer_wakes_a_caller_asleep_on_its_slot() {
        // `fill` skips the wake-up when nobody sleeps on the slot; a caller that is asleep
        // (past any spinning) must still be woken, every time.
        for _ in 0..50 {
            let slot = Arc::new(Slot::default());
            let waiter = {
                let slot = slot.clone();
                std::thread::spawn(move || {
                    let t = Instant::now();
                    let got = slot.wait_blocking(Some(t + Duration::from_secs(10)));
                    (got, t.elapsed())
                })
            };
            std::thread::sleep(Duration::from_micros(200));
            slot.fill(Err(CallError::Timeout));
            let (got, waited) = waiter.join().unwrap();
            assert_eq!(got, Some(Err(CallError::Timeout)));
            // Not woken, it would find the answer only at its 10 s deadline.
            assert!(waited < Duration::from_secs(5), "woken by the answer");
        }
        // Filled before anyone waits: taken at once.
        let slot = Slot::default();
        slot.fill(Err(CallError::Timeout));
        assert!(slot.is_filled());
        assert_eq!(slot.wait_blocking(None), Some(Err(CallError::Timeout)));
    }
}
