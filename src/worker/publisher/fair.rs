//! The publisher's queue, fair between sources (one source per session, so per remote
//! relay). A single FIFO let one relay that floods — valid events or not — fill the queue, and
//! every other relay's events waited behind it: a polite relay's live event took as long as
//! the flood's backlog. Here each source has its own queue, served round-robin one event per
//! turn, so a flooding relay is slowed by its own back-pressure only:
//!
//! - a source may hold at most `per_source` events (beyond that its sender waits: the session
//!   stops reading its relay);
//! - all sources together hold at most `capacity`, except that a source with fewer than
//!   `reserve` queued may always add one: a quiet relay never waits for a loud one's room.
//!
//! So the queue holds at most `capacity + reserve × sources` events.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// Who an event comes from; events of one source keep their order.
pub(super) type SourceKey = usize;

struct Source<T> {
    queue: VecDeque<T>,
    /// Senders of this source waiting for room (woken when this source or, for the global
    /// bound, any source is served).
    space: Arc<Notify>,
    blocked: usize,
}

struct State<T> {
    sources: HashMap<SourceKey, Source<T>>,
    /// Sources with queued events, in serving order.
    ring: VecDeque<SourceKey>,
    /// Sources whose senders wait for room under the global bound, oldest first.
    waiting: VecDeque<SourceKey>,
    total: usize,
    senders: usize,
    receivers: usize,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    items: Notify,
    capacity: usize,
    per_source: usize,
    reserve: usize,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing here panics while holding the lock; a poisoned lock still holds valid data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) struct FairSender<T> {
    shared: Arc<Shared<T>>,
}

pub(super) struct FairReceiver<T> {
    shared: Arc<Shared<T>>,
}

/// A fair queue; `per_source` and `reserve` are at least one.
pub(super) fn channel<T>(
    capacity: usize,
    per_source: usize,
    reserve: usize,
) -> (FairSender<T>, FairReceiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            sources: HashMap::new(),
            ring: VecDeque::new(),
            waiting: VecDeque::new(),
            total: 0,
            senders: 1,
            receivers: 1,
        }),
        items: Notify::new(),
        capacity: capacity.max(1),
        per_source: per_source.max(1),
        reserve: reserve.max(1).min(per_source.max(1)),
    });
    (
        FairSender {
            shared: shared.clone(),
        },
        FairReceiver { shared },
    )
}

/// Undoes a waiting sender's mark, also when its future is dropped.
struct Blocked<'a, T> {
    shared: &'a Shared<T>,
    key: SourceKey,
}

impl<T> Drop for Blocked<'_, T> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if let Some(s) = st.sources.get_mut(&self.key) {
            s.blocked -= 1;
            if s.blocked == 0 && s.queue.is_empty() {
                st.sources.remove(&self.key);
            }
        }
    }
}

impl<T> FairSender<T> {
    /// Queue `item` for `source`, waiting while that source (or, past its reserve, the whole
    /// queue) is full. `Err(item)` once every receiver is gone.
    pub async fn send(&self, source: SourceKey, item: T) -> Result<(), T> {
        let shared = &*self.shared;
        loop {
            let space = {
                let mut st = shared.lock();
                if st.receivers == 0 {
                    return Err(item);
                }
                let total = st.total;
                let src = st.sources.entry(source).or_insert_with(|| Source {
                    queue: VecDeque::new(),
                    space: Arc::new(Notify::new()),
                    blocked: 0,
                });
                let len = src.queue.len();
                let own_room = len < shared.per_source;
                if own_room && (total < shared.capacity || len < shared.reserve) {
                    src.queue.push_back(item);
                    if len == 0 {
                        st.ring.push_back(source);
                    }
                    st.total += 1;
                    drop(st);
                    shared.items.notify_one();
                    return Ok(());
                }
                src.blocked += 1;
                let space = src.space.clone();
                if own_room && !st.waiting.contains(&source) {
                    st.waiting.push_back(source);
                }
                space
            };
            let _blocked = Blocked {
                shared,
                key: source,
            };
            // A wake-up sent before we wait is kept as a permit, so none is lost.
            space.notified().await;
        }
    }
}

impl<T> FairReceiver<T> {
    /// The next event, taking turns between sources; `None` once every sender is gone and
    /// the queue is empty. Cancel-safe: an event is taken only when it is returned.
    pub async fn recv(&self) -> Option<T> {
        let shared = &*self.shared;
        loop {
            let notified = shared.items.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = shared.lock();
                if let Some(item) = pop(shared, &mut st) {
                    return Some(item);
                }
                if st.senders == 0 {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// No sender is left (nothing more will be queued).
    pub fn is_closed(&self) -> bool {
        self.shared.lock().senders == 0
    }

    pub fn is_empty(&self) -> bool {
        self.shared.lock().total == 0
    }

    pub fn len(&self) -> usize {
        self.shared.lock().total
    }
}

fn pop<T>(shared: &Shared<T>, st: &mut State<T>) -> Option<T> {
    let key = st.ring.pop_front()?;
    let src = st.sources.get_mut(&key)?;
    let item = src.queue.pop_front()?;
    st.total -= 1;
    if src.queue.is_empty() {
        if src.blocked == 0 {
            st.sources.remove(&key);
        }
    } else {
        st.ring.push_back(key);
    }
    // This source has room again; under the global bound, so may the longest waiter.
    if let Some(s) = st.sources.get(&key)
        && s.blocked > 0
    {
        s.space.notify_one();
    }
    if st.total < shared.capacity {
        while let Some(w) = st.waiting.pop_front() {
            if let Some(s) = st.sources.get(&w)
                && s.blocked > 0
            {
                s.space.notify_one();
                break;
            }
        }
    }
    Some(item)
}

impl<T> Clone for FairSender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        FairSender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for FairSender<T> {
    fn drop(&mut self) {
        let last = {
            let mut st = self.shared.lock();
            st.senders -= 1;
            st.senders == 0
        };
        if last {
            // Receivers waiting for an event learn that none will come.
            self.shared.items.notify_waiters();
        }
    }
}

impl<T> Clone for FairReceiver<T> {
    fn clone(&self) -> Self {
        self.shared.lock().receivers += 1;
        FairReceiver {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for FairReceiver<T> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.receivers -= 1;
        if st.receivers == 0 {
            // Waiting senders learn that nobody will take their events.
            for s in st.sources.values() {
                s.space.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn sources_take_turns_and_keep_their_own_order() {
        let (tx, rx) = channel(100, 100, 4);
        for i in 0..5 {
            tx.send(1, ("flood", i)).await.unwrap();
        }
        tx.send(2, ("polite", 0)).await.unwrap();
        tx.send(2, ("polite", 1)).await.unwrap();
        let mut got = Vec::new();
        while !rx.is_empty() {
            got.push(rx.recv().await.unwrap());
        }
        assert_eq!(
            got,
            [
                ("flood", 0),
                ("polite", 0),
                ("flood", 1),
                ("polite", 1),
                ("flood", 2),
                ("flood", 3),
                ("flood", 4)
            ]
        );
    }

    #[tokio::test]
    async fn a_full_source_waits_while_others_still_get_in() {
        let (tx, rx) = channel(6, 3, 2);
        for i in 0..3 {
            tx.send(1, i).await.unwrap();
        }
        // Source 1 is at its own bound.
        let blocked = tokio::time::timeout(Duration::from_millis(50), tx.send(1, 3)).await;
        assert!(blocked.is_err(), "a source over its bound was let in");
        // Others fill the rest; past the global bound a source still has its reserve.
        for i in 0..3 {
            tx.send(2, 10 + i).await.unwrap();
        }
        assert_eq!(rx.len(), 6);
        tx.send(3, 20).await.unwrap();
        tx.send(3, 21).await.unwrap();
        let over = tokio::time::timeout(Duration::from_millis(50), tx.send(3, 22)).await;
        assert!(
            over.is_err(),
            "past the global bound only the reserve is free"
        );
        assert_eq!(rx.len(), 8);
        // Once served, source 1 has room of its own; it gets in when the total is under the
        // bound again (its reserve is in use): one turn of each source.
        let tx2 = tx.clone();
        let waiter = tokio::spawn(async move { tx2.send(1, 3).await });
        assert_eq!(rx.recv().await, Some(0));
        assert_eq!(rx.recv().await, Some(10));
        assert_eq!(rx.recv().await, Some(20));
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap()
            .unwrap();
        assert_eq!(rx.len(), 6);
    }

    #[tokio::test]
    async fn a_sender_waiting_on_the_global_bound_is_woken_by_any_turn() {
        let (tx, rx) = channel(2, 2, 1);
        tx.send(1, 0).await.unwrap();
        tx.send(1, 1).await.unwrap();
        tx.send(2, 10).await.unwrap(); // reserve
        let tx2 = tx.clone();
        let waiter = tokio::spawn(async move { tx2.send(2, 11).await });
        tokio::task::yield_now().await;
        // Serving source 1 twice brings the total under the bound.
        assert_eq!(rx.recv().await, Some(0));
        assert_eq!(rx.recv().await, Some(10));
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap()
            .unwrap();
        assert_eq!(rx.len(), 2);
    }

    #[tokio::test]
    async fn closing_either_side_ends_the_other() {
        let (tx, rx) = channel::<u32>(4, 4, 1);
        let rx2 = rx.clone();
        tx.send(7, 1).await.unwrap();
        drop(tx);
        assert!(rx.is_closed());
        assert_eq!(rx.recv().await, Some(1), "what was queued is still served");
        assert_eq!(rx2.recv().await, None);
        let (tx, rx) = channel::<u32>(1, 1, 1);
        tx.send(1, 1).await.unwrap();
        let tx2 = tx.clone();
        let waiter = tokio::spawn(async move { tx2.send(1, 2).await });
        tokio::task::yield_now().await;
        drop(rx);
        let r = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(r, Err(2));
    }

    #[tokio::test]
    async fn idle_sources_leave_nothing_behind() {
        let (tx, rx) = channel(10, 10, 2);
        for key in 0..100 {
            tx.send(key, key).await.unwrap();
            assert_eq!(rx.recv().await, Some(key));
        }
        assert!(tx.shared.lock().sources.is_empty());
    }
}
