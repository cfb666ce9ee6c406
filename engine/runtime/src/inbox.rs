//! A blocking multi-producer, multi-consumer queue that can be closed.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

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

/// Items handed from the engine thread to the binding's threads.
#[derive(Debug)]
pub struct Inbox<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        Inbox {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
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
