//! The swarm's own record: what `GET /swarm` shows (`ClusterInfo`, the view) plus the secrets
//! only managers hold. There is at most one.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shoal_api::swarm::{ClusterInfo, Meta};

use super::{Object, Rules, StoredObject};
use crate::{state::ClusterState, table::Table, CommandError, Kind};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub info: ClusterInfo,
    /// PEM of the root CA key (the whole store is sealed at rest; never in `info`).
    pub root_key_pem: String,
    pub worker_token: String,
    pub manager_token: String,
    /// `SWMKEY-1-...` while autolock is on.
    pub unlock_key: Option<String>,
}

impl StoredObject for Cluster {
    const KIND: Kind = Kind::Cluster;
    fn id(&self) -> &str {
        &self.info.id
    }
    fn meta(&self) -> &Meta {
        &self.info.meta
    }
    fn meta_mut(&mut self) -> &mut Meta {
        &mut self.info.meta
    }
    fn name(&self) -> &str {
        &self.info.spec.annotations.name
    }
    fn wrap(object: Arc<Self>) -> Object {
        Object::Cluster(object)
    }
    fn table(state: &ClusterState) -> &Table<Self> {
        &state.clusters
    }
    fn table_mut(state: &mut ClusterState) -> &mut Table<Self> {
        &mut state.clusters
    }
}

impl Rules for Cluster {
    fn check_create(state: &ClusterState, _new: &Self) -> Result<(), CommandError> {
        if !state.clusters.is_empty() {
            return Err(CommandError::Conflict("this node is already part of a swarm".into()));
        }
        Ok(())
    }

    fn check_update(_state: &ClusterState, old: &Self, new: &Self) -> Result<(), CommandError> {
        if old.info.id != new.info.id {
            return Err(CommandError::Invalid("the cluster ID cannot change".into()));
        }
        Ok(())
    }

    fn check_delete(_state: &ClusterState, _old: &Self) -> Result<(), CommandError> {
        Err(CommandError::FailedPrecondition("the cluster record cannot be deleted".into()))
    }
}
