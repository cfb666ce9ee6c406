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

/// Where one caller waits for one answer.
#[derive(Debug, Default)]
pub struct Slot {
    value: Mutex<Option<Result<Reply, CallError>>>,
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
        let mut v = self.value.lock().unwrap_or_else(|e| e.into_inner());
        if v.is_none() {
            *v = Some(r);
        }
        drop(v);
        self.ready.notify_all();
    }

    /// Waits until filled or `deadline`; `None` means timed out. Spins a little first (see
    /// [`crate::spin`]), with an estimate of this thread's waits for answers.
    pub fn wait(&self, deadline: Option<Instant>) -> Option<Result<Reply, CallError>> {
        thread_local! {
            static ANSWER_WAITS: Spin = Spin::default();
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
        let mut v = self.value.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = v.take() {
                return Some(r);
            }
            v = match deadline {
                None => self.ready.wait(v).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    self.ready
                        .wait_timeout(v, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// Whether the answer is there (nobody took it yet).
    pub fn is_filled(&self) -> bool {
        self.value
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Takes the value if it is there, without waiting.
    pub fn try_take(&self) -> Option<Result<Reply, CallError>> {
        self.value.lock().unwrap_or_else(|e| e.into_inner()).take()
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
            sa.wait(Some(Instant::now() + Duration::from_millis(5))),
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
        let got = sb.wait(None).unwrap().unwrap();
        assert_eq!(got.payload.as_slice(), b"x");
        assert!(t.is_empty());
    }
}
