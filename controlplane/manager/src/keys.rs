//! Autolock on a running manager: when the cluster's unlock key appears, changes or goes,
//! this manager re-stores its data key wrapped by the new key (or plain).

use std::sync::Arc;

use shoal_ca::{DataKey, UnlockKey};
use shoal_store::Change;
use tokio::sync::{broadcast::error::RecvError, watch};
use tracing::{info, warn};

use crate::{Manager, SwarmDir};

pub async fn follow_autolock(manager: Arc<Manager>, dir: SwarmDir, data_key: DataKey, stopped: watch::Receiver<bool>) {
    let mut changes = manager.store().shared().subscribe();
    let stop = crate::manager::until(stopped);
    tokio::pin!(stop);
    let mut current: Option<Option<String>> = None;
    loop {
        let wanted = manager.store().shared().read(|s| s.cluster.as_ref().map(|c| c.unlock_key.clone()));
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
                Ok(Change::Cluster | Change::All) | Err(RecvError::Lagged(_)) => {}
                Ok(Change::Node(_)) => continue,
                Err(RecvError::Closed) => return,
            },
        }
    }
}

fn rewrap(dir: &SwarmDir, data_key: &DataKey, unlock: Option<&str>) -> Result<(), crate::SwarmError> {
    let kek =
        unlock.map(|k| k.parse::<UnlockKey>()).transpose().map_err(|e| crate::SwarmError::Internal(e.to_string()))?;
    dir.save_data_key(data_key, kek.as_ref())
}
