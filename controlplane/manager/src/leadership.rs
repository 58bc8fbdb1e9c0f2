//! Leader-only roles (swarmkit's `becomeLeader`): the roles that decide for the whole
//! cluster — node liveness today; the orchestrators, scheduler and allocator next — run on
//! the manager that leads and only there. Each is built from the store (`new(store, ..)`),
//! driven by `run(cancel)` from the store's watch stream and clock, and decides in pure
//! functions that return the mutations to commit. This module starts them when this
//! manager becomes leader and cancels them (and waits for them) when it stops leading, so
//! two managers never run the same role at once for longer than a leadership change takes.

use std::{future::Future, pin::Pin, sync::Arc};

use shoal_store::ClusterStore;
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// A role's body, started with the token that ends it.
pub type RoleFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Builds one role for a new term of leadership.
pub type RoleStarter = Box<dyn Fn(CancellationToken) -> RoleFuture + Send + Sync>;

/// A leader-only role.
pub trait LeaderRole: Send + 'static {
    /// For logs.
    const NAME: &'static str;
    /// Runs until `cancel` fires; a role returns promptly then.
    fn run(self, cancel: CancellationToken) -> impl Future<Output = ()> + Send;
}

/// A starter for a role built afresh by `build` each time this manager becomes leader (no
/// state carries over from an earlier term: the store is the only memory).
pub fn starter<R: LeaderRole>(build: impl Fn() -> R + Send + Sync + 'static) -> RoleStarter {
    Box::new(move |cancel| {
        let role = build();
        Box::pin(async move {
            info!(role = R::NAME, "leader role started");
            role.run(cancel).await;
            info!(role = R::NAME, "leader role stopped");
        })
    })
}

/// Runs `roles` while this replica leads, until `stopped` turns true.
pub async fn run_while_leader(store: Arc<ClusterStore>, roles: Vec<RoleStarter>, stopped: watch::Receiver<bool>) {
    let mut metrics = store.raft().metrics();
    let stop = crate::manager::until(stopped);
    tokio::pin!(stop);
    let mut term: Option<(CancellationToken, Vec<JoinHandle<()>>)> = None;
    loop {
        let leading = store.is_leader();
        match (&term, leading) {
            (None, true) => {
                let cancel = CancellationToken::new();
                let tasks = roles.iter().map(|start| tokio::spawn(start(cancel.clone()))).collect();
                term = Some((cancel, tasks));
            }
            (Some(_), false) => end(term.take()).await,
            _ => {}
        }
        tokio::select! {
            _ = &mut stop => break,
            changed = metrics.changed() => if changed.is_err() { break },
        }
    }
    end(term).await;
}

async fn end(term: Option<(CancellationToken, Vec<JoinHandle<()>>)>) {
    let Some((cancel, tasks)) = term else { return };
    cancel.cancel();
    for task in tasks {
        let _ = task.await;
    }
}
