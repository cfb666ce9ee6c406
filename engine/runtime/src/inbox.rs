//! A blocking multi-producer, multi-consumer queue that can be closed.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
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
    /// Each item with its weight (see [`Inbox::push_weighed`]).
    items: VecDeque<(T, usize)>,
    closed: bool,
    /// The items' total weight.
    load: usize,
    /// Set by [`Inbox::throttle`] when the load was too high; cleared, and the hook called,
    /// once it is down to half the limit.
    throttled: bool,
    /// Wake-ups from [`Inbox::wake_one`] not yet consumed by a waiter.
    wakes: usize,
    /// Threads blocked on the condition variable: with none (the consumer is busy, or reads
    /// its socket itself), a push skips the wake-up, a system call.
    sleepers: usize,
}

/// Called when a throttled inbox has room again.
pub(crate) type DrainHook = Box<dyn Fn() + Send + Sync>;

/// Items handed from the engine thread to the binding's threads (or to an event loop watching
/// a [`Notifier`]).
pub struct Inbox<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    notifier: Mutex<Option<Arc<Notifier>>>,
    /// The load above which [`Inbox::throttle`] says stop (0: never).
    limit: usize,
    on_drain: OnceLock<DrainHook>,
}

impl<T: std::fmt::Debug> std::fmt::Debug for Inbox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("state", &self.state)
            .field("limit", &self.limit)
            .finish()
    }
}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        Inbox::with_limit(0)
    }
}

impl<T> Inbox<T> {
    /// An inbox whose [`Inbox::throttle`] says stop above `limit` of load (0: never).
    pub fn with_limit(limit: usize) -> Self {
        Inbox {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
                load: 0,
                throttled: false,
                wakes: 0,
                sleepers: 0,
            }),
            ready: Condvar::new(),
            notifier: Mutex::new(None),
            limit,
            on_drain: OnceLock::new(),
        }
    }

    /// Adds an item and wakes one waiter. Items pushed after [`Inbox::close`] are dropped.
    pub fn push(&self, item: T) {
        self.push_weighed(item, 0);
    }

    /// Adds an item that counts `weight` towards the load [`Inbox::throttle`] watches.
    pub fn push_weighed(&self, item: T, weight: usize) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.closed {
            return;
        }
        s.items.push_back((item, weight));
        s.load += weight;
        let sleepers = s.sleepers;
        drop(s);
        if sleepers > 0 {
            self.ready.notify_one();
        }
        self.notify();
    }

    /// How many items wait, and their total weight.
    pub fn backlog(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.items.len(), s.load)
    }

    /// Whether the load is over the limit (what [`Inbox::throttle`] would say), without
    /// arming the drain hook.
    pub(crate) fn over_limit(&self) -> bool {
        if self.limit == 0 {
            return false;
        }
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.load > self.limit && !s.closed
    }

    /// What to call once a throttled inbox has room again (set once).
    pub(crate) fn on_drain(&self, hook: DrainHook) {
        let _ = self.on_drain.set(hook);
    }

    /// For the producer: true when the load is over the limit, in which case the drain hook
    /// runs once it is down to half the limit (or the inbox closes).
    pub(crate) fn throttle(&self) -> bool {
        if self.limit == 0 {
            return false;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.load > self.limit && !s.closed {
            s.throttled = true;
            true
        } else {
            false
        }
    }

    /// Takes the front item, and says whether the inbox just came back under its low mark.
    fn take_front(&self, s: &mut State<T>) -> Option<(T, bool)> {
        let (item, weight) = s.items.pop_front()?;
        s.load -= weight;
        let drained = s.throttled && s.load <= self.limit / 2;
        if drained {
            s.throttled = false;
        }
        Some((item, drained))
    }

    fn drained(&self) {
        if let Some(hook) = self.on_drain.get() {
            hook();
        }
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
        let mut out = Vec::with_capacity(n);
        let mut drained = false;
        for _ in 0..n {
            let Some((item, d)) = self.take_front(&mut s) else {
                break;
            };
            drained |= d;
            out.push(item);
        }
        drop(s);
        if drained {
            self.drained();
        }
        Some(out)
    }

    /// Waits for the next item, at most `timeout` (`None`: no limit).
    pub fn pop(&self, timeout: Option<Duration>) -> Next<T> {
        self.wait(timeout, false)
            .expect("a wait that ignores wake-ups always ends with an outcome")
    }

    /// Wakes one waiter of [`Inbox::pop_or_wake`] (something else than an item may be there
    /// for it).
    pub(crate) fn wake_one(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // One pending wake-up is enough: only one waiter can take the turn it announces.
        s.wakes = 1;
        let sleepers = s.sleepers;
        drop(s);
        if sleepers > 0 {
            self.ready.notify_one();
        }
    }

    /// Like [`Inbox::pop`], but also returns `None` when woken by [`Inbox::wake_one`].
    pub(crate) fn pop_or_wake(&self, timeout: Option<Duration>) -> Option<Next<T>> {
        self.wait(timeout, true)
    }

    /// Waits for the next item, at most `timeout`; with `wakes`, also ends (`None`) at a
    /// wake-up from [`Inbox::wake_one`].
    fn wait(&self, timeout: Option<Duration>, wakes: bool) -> Option<Next<T>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some((item, drained)) = self.take_front(&mut s) {
                drop(s);
                if drained {
                    self.drained();
                }
                return Some(Next::Item(item));
            }
            if s.closed {
                return Some(Next::Closed);
            }
            if wakes && s.wakes > 0 {
                s.wakes -= 1;
                return None;
            }
            let timeout = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Some(Next::Timeout),
                },
            };
            // Counted under the lock every push takes, so no push can miss this sleeper.
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

    /// Wakes every waiter; they drain what is left, then see [`Next::Closed`].
    pub fn close(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.closed = true;
        let drained = std::mem::take(&mut s.throttled);
        drop(s);
        self.ready.notify_all();
        self.notify();
        if drained {
            self.drained();
        }
    }

    /// Opens a closed inbox again (a client reconnecting), dropping stale items.
    pub fn reopen(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.closed = false;
        s.items.clear();
        s.load = 0;
        s.throttled = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn throttle_above_the_limit_until_down_to_half() {
        let inbox = Inbox::with_limit(100);
        let drained = Arc::new(AtomicUsize::new(0));
        let d = drained.clone();
        inbox.on_drain(Box::new(move || {
            d.fetch_add(1, Ordering::SeqCst);
        }));
        for i in 0..4 {
            inbox.push_weighed(i, 30);
        }
        assert_eq!(inbox.backlog(), (4, 120));
        assert!(inbox.throttle());
        assert_eq!(inbox.pop(None), Next::Item(0));
        assert_eq!(inbox.take(1), Some(vec![1]));
        // 60 left: still above half the limit, no call yet.
        assert_eq!(drained.load(Ordering::SeqCst), 0);
        assert!(!inbox.throttle(), "under the limit again");
        assert_eq!(inbox.pop(None), Next::Item(2));
        assert_eq!(drained.load(Ordering::SeqCst), 1);
        assert_eq!(inbox.pop(None), Next::Item(3));
        assert_eq!(
            drained.load(Ordering::SeqCst),
            1,
            "called once per throttle"
        );
        assert_eq!(inbox.backlog(), (0, 0));
        // Closing a throttled inbox calls it too (its producer must not wait for ever).
        inbox.push_weighed(4, 200);
        assert!(inbox.throttle());
        inbox.close();
        assert_eq!(drained.load(Ordering::SeqCst), 2);
        // Unlimited inboxes never throttle.
        let free: Inbox<u8> = Inbox::default();
        free.push_weighed(1, usize::MAX / 2);
        assert!(!free.throttle());
    }

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

    #[test]
    fn sleeping_consumers_get_every_item_and_wake_up() {
        // Pushes skip the wake-up when nobody sleeps: racing producers and consumers that
        // sleep and wake all the time must still see every item, and none may hang.
        let inbox = Arc::new(Inbox::default());
        let consumers: Vec<_> = (0..3)
            .map(|_| {
                let inbox = inbox.clone();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    while let Next::Item(i) = inbox.pop(Some(Duration::from_secs(10))) {
                        got.push(i);
                    }
                    got
                })
            })
            .collect();
        let producers: Vec<_> = (0..2)
            .map(|p| {
                let inbox = inbox.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u32 {
                        inbox.push(p * 20_000 + i);
                        if i % 64 == 0 {
                            std::thread::sleep(Duration::from_micros(50));
                        }
                    }
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        // The sleeping consumers must have been woken for the items: nothing else wakes them
        // before the close below (their pops wait up to 10 s).
        let t = Instant::now();
        while inbox.backlog().0 > 0 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "items left with the consumers asleep"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        inbox.close();
        let mut all: Vec<u32> = consumers
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..40_000).collect::<Vec<_>>());
    }

    #[test]
    fn a_wake_reaches_a_sleeping_waiter() {
        let inbox: Arc<Inbox<u8>> = Arc::new(Inbox::default());
        let waiter = {
            let inbox = inbox.clone();
            std::thread::spawn(move || inbox.pop_or_wake(Some(Duration::from_secs(10))))
        };
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        inbox.wake_one();
        assert_eq!(waiter.join().unwrap(), None);
        assert!(t.elapsed() < Duration::from_secs(5), "woken, not timed out");
    }
}
