//! Autolock on a running manager: when the cluster's unlock key appears, changes or goes,
//! this manager re-stores its data key wrapped by the new key (or plain).

use std::sync::Arc;

use shoal_ca::{DataKey, UnlockKey};
use shoal_store::{Filter, Kind, WatchError};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{Manager, SwarmDir};

pub async fn follow_autolock(manager: Arc<Manager>, dir: SwarmDir, data_key: DataKey, stopped: watch::Receiver<bool>) {
    let stop = crate::manager::until(stopped);
    tokio::pin!(stop);
    let mut current: Option<Option<String>> = None;
    loop {
        let (wanted, mut changes) = manager
            .store()
            .shared()
            .view_and_watch(Filter::kinds(&[Kind::Cluster]), |s| s.cluster().map(|c| c.unlock_key.clone()));
        if let Some(wanted) = wanted {
            if current.as_ref() != Some(&wanted) {
                match rewrap(&dir, &data_key, wanted.as_deref()) {
                    Ok(()) => {
                        info!(autolock = wanted.is_some(), "data key stored for the current autolock setting");
                        current = Some(wanted);
                    }
                    Err(e) => warn!(error = %e, "re-storing the data key failed"),
                }
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            change = changes.recv() => match change {
                // Any change to the cluster (or a resync) is a reason to look again.
                Ok(_) | Err(WatchError::Resync) => {}
                Err(WatchError::Closed) => return,
            },
        }
    }
}

fn rewrap(dir: &SwarmDir, data_key: &DataKey, unlock: Option<&str>) -> Result<(), crate::SwarmError> {
    let kek =
        unlock.map(|k| k.parse::<UnlockKey>()).transpose().map_err(|e| crate::SwarmError::Internal(e.to_string()))?;
    dir.save_data_key(data_key, kek.as_ref())
}
