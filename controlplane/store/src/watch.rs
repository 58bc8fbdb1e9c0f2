//! The event stream: every applied entry yields one event per mutation,
//! `(index, kind, id, action, old, new)`, delivered to each watcher whose filter matches.
//!
//! Events are handed out while the state's write lock is held, and `view_and_watch`
//! registers a watcher while holding its read lock, so a role reads a consistent state and
//! then sees exactly the changes after it — none missed, none counted twice. Delivery never
//! blocks the applier: a watcher whose buffer is full is cut off and told to resync (read
//! the state again with a new watch) rather than silently losing events.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, Mutex,
};

use tokio::sync::mpsc;

use crate::objects::{Kind, Object};

/// Events a watcher may fall behind by before it must resync.
pub const WATCH_BUFFER: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Update,
    Delete,
}

/// One change: the object before (`None` for a create) and after (`None` for a delete).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The raft index of the entry that made the change (the object's new version).
    pub index: u64,
    pub action: Action,
    pub old: Option<Object>,
    pub new: Option<Object>,
}

impl Event {
    /// The object as it is now, or as it was before its deletion.
    pub fn object(&self) -> &Object {
        self.new.as_ref().or(self.old.as_ref()).expect("an event has an object before or after")
    }

    pub fn kind(&self) -> Kind {
        self.object().kind()
    }

    pub fn id(&self) -> &str {
        self.object().id()
    }
}

/// Which events a watcher wants.
#[derive(Clone)]
pub struct Filter(Arc<dyn Fn(&Event) -> bool + Send + Sync>);

impl Filter {
    pub fn all() -> Self {
        Filter(Arc::new(|_| true))
    }

    pub fn kinds(kinds: &[Kind]) -> Self {
        let kinds = kinds.to_vec();
        Filter(Arc::new(move |e| kinds.contains(&e.kind())))
    }

    /// Any test on the event (e.g. tasks of one service).
    pub fn custom(test: impl Fn(&Event) -> bool + Send + Sync + 'static) -> Self {
        Filter(Arc::new(test))
    }

    fn matches(&self, event: &Event) -> bool {
        (self.0)(event)
    }
}

/// Why a watcher's stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    /// Events were lost (the watcher lagged, or the whole state was replaced by a snapshot
    /// or a restore): read the state again with `view_and_watch`.
    #[error("the watcher fell behind or the state was replaced: resync")]
    Resync,
    /// The store closed.
    #[error("the store closed")]
    Closed,
}

/// A stream of the events after a view.
pub struct Watcher {
    events: mpsc::Receiver<Arc<Event>>,
    cut_off: Arc<AtomicBool>,
    after: u64,
}

impl Watcher {
    /// The raft index the view was taken at: every event has a higher one.
    pub fn after(&self) -> u64 {
        self.after
    }

    /// The next event. After an error the watcher is spent.
    pub async fn recv(&mut self) -> Result<Arc<Event>, WatchError> {
        match self.events.recv().await {
            Some(event) => Ok(event),
            None if self.cut_off.load(Ordering::Acquire) => Err(WatchError::Resync),
            None => Err(WatchError::Closed),
        }
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<Result<Arc<Event>, WatchError>> {
        match self.events.try_recv() {
            Ok(event) => Some(Ok(event)),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) if self.cut_off.load(Ordering::Acquire) => {
                Some(Err(WatchError::Resync))
            }
            Err(mpsc::error::TryRecvError::Disconnected) => Some(Err(WatchError::Closed)),
        }
    }
}

struct Subscriber {
    filter: Filter,
    events: mpsc::Sender<Arc<Event>>,
    cut_off: Arc<AtomicBool>,
}

/// The watchers of one replica.
#[derive(Default)]
pub(crate) struct Hub {
    subscribers: Mutex<Vec<Subscriber>>,
}

impl Hub {
    /// Registers a watcher; the caller holds the state's read lock (see the module doc).
    pub(crate) fn subscribe(&self, filter: Filter, after: u64, buffer: usize) -> Watcher {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let cut_off = Arc::new(AtomicBool::new(false));
        let subscriber = Subscriber { filter, events: tx, cut_off: cut_off.clone() };
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).push(subscriber);
        Watcher { events: rx, cut_off, after }
    }

    /// Delivers one entry's events; the caller holds the state's write lock.
    pub(crate) fn publish(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let events: Vec<Arc<Event>> = events.into_iter().map(Arc::new).collect();
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subscribers.retain(|s| {
            // A dropped watcher whose filter matches nothing here would otherwise stay forever.
            if s.events.is_closed() {
                return false;
            }
            for event in events.iter().filter(|e| s.filter.matches(e)) {
                match s.events.try_send(event.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        s.cut_off.store(true, Ordering::Release);
                        return false;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
            }
            true
        });
    }

    /// The whole state was replaced: every watcher must read it again.
    pub(crate) fn resync_all(&self) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        for s in subscribers.drain(..) {
            s.cut_off.store(true, Ordering::Release);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.subscribers.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use shoal_api::node::Node;

    use super::*;

    fn created(index: u64, id: &str) -> Event {
        let node = Node { id: id.into(), ..Default::default() };
        Event { index, action: Action::Create, old: None, new: Some(node.into()) }
    }

    #[tokio::test]
    async fn watchers_get_what_their_filter_matches_in_order() {
        let hub = Hub::default();
        let mut nodes = hub.subscribe(Filter::kinds(&[Kind::Node]), 0, 16);
        let mut tasks = hub.subscribe(Filter::kinds(&[Kind::Task]), 0, 16);
        hub.publish(vec![created(5, "a"), created(5, "b")]);
        hub.publish(vec![created(6, "c")]);
        let ids: Vec<(u64, String)> =
            [(); 3].iter().map(|_| nodes.try_recv().unwrap().unwrap()).map(|e| (e.index, e.id().to_owned())).collect();
        assert_eq!(ids, [(5, "a".into()), (5, "b".into()), (6, "c".into())]);
        assert!(tasks.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_watcher_that_lags_is_told_to_resync_and_others_go_on() {
        let hub = Hub::default();
        let mut slow = hub.subscribe(Filter::all(), 0, 2);
        let mut fast = hub.subscribe(Filter::all(), 0, 16);
        for i in 1..=3 {
            hub.publish(vec![created(i, "x")]);
        }
        assert_eq!(hub.len(), 1, "the slow watcher was cut off");
        assert!(slow.recv().await.is_ok() && slow.recv().await.is_ok());
        assert_eq!(slow.recv().await, Err(WatchError::Resync), "never a silent gap");
        for _ in 0..3 {
            fast.recv().await.unwrap();
        }
        hub.resync_all();
        assert_eq!(fast.recv().await, Err(WatchError::Resync));
    }

    #[tokio::test]
    async fn a_dropped_watcher_is_forgotten() {
        let hub = Hub::default();
        drop(hub.subscribe(Filter::all(), 0, 4));
        hub.publish(vec![created(1, "x")]);
        assert_eq!(hub.len(), 0);
    }
}
