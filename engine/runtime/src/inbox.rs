//! A blocking multi-producer, multi-consumer queue that can be closed.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::notify::Notifier;

/// What a wait on an [`Inbox`] produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<T> {
    Item(T),
    Timeout,
    /// The inbox was closed and is empty.
    Closed,
}

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

/// Items handed from the engine thread to the binding's threads (or to an event loop watching
/// a [`Notifier`]).
#[derive(Debug)]
pub struct Inbox<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    notifier: Mutex<Option<Arc<Notifier>>>,
}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        Inbox {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            notifier: Mutex::new(None),
        }
    }
}

impl<T> Inbox<T> {
    /// Adds an item and wakes one waiter. Items pushed after [`Inbox::close`] are dropped.
    pub fn push(&self, item: T) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.closed {
            return;
        }
        s.items.push_back(item);
        drop(s);
        self.ready.notify_one();
        self.notify();
    }

    fn notify(&self) {
        if let Some(n) = &*self.notifier.lock().unwrap_or_else(|e| e.into_inner()) {
            n.notify();
        }
    }

    /// From now on, every push (and the close) also notifies `n`.
    pub fn watch(&self, n: Arc<Notifier>) {
        *self.notifier.lock().unwrap_or_else(|e| e.into_inner()) = Some(n);
    }

    /// Takes up to `max` items without waiting; `None` once closed and empty.
    pub fn take(&self, max: usize) -> Option<Vec<T>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.items.is_empty() && s.closed {
            return None;
        }
        let n = s.items.len().min(max);
        Some(s.items.drain(..n).collect())
    }

    /// Waits for the next item, at most `timeout` (`None`: no limit).
    pub fn pop(&self, timeout: Option<Duration>) -> Next<T> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(item) = s.items.pop_front() {
                return Next::Item(item);
            }
            if s.closed {
                return Next::Closed;
            }
            s = match deadline {
                None => self.ready.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Next::Timeout;
                    }
                    self.ready
                        .wait_timeout(s, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// Wakes every waiter; they drain what is left, then see [`Next::Closed`].
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.ready.notify_all();
        self.notify();
    }

    /// Opens a closed inbox again (a client reconnecting), dropping stale items.
    pub fn reopen(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.closed = false;
        s.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn fifo_timeout_close() {
        let inbox = Arc::new(Inbox::default());
        inbox.push(1);
        inbox.push(2);
        assert_eq!(inbox.pop(None), Next::Item(1));
        assert_eq!(inbox.pop(Some(Duration::ZERO)), Next::Item(2));
        assert_eq!(inbox.pop(Some(Duration::from_millis(10))), Next::Timeout);
        let waiter = {
            let inbox = inbox.clone();
            std::thread::spawn(move || inbox.pop(None))
        };
        std::thread::sleep(Duration::from_millis(20));
        inbox.close();
        assert_eq!(waiter.join().unwrap(), Next::Closed);
        inbox.push(3);
        assert_eq!(inbox.pop(None), Next::Closed);
    }
}
