//! Services: unique names.

use std::sync::Arc;

use shoal_api::{service::Service, swarm::Meta};

use super::{unique_name, Object, Rules, StoredObject};
use crate::{state::ClusterState, table::Table, CommandError, Kind};

impl StoredObject for Service {
    const KIND: Kind = Kind::Service;
    fn id(&self) -> &str {
        &self.id
    }
    fn meta(&self) -> &Meta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut Meta {
        &mut self.meta
    }
    fn name(&self) -> &str {
        &self.spec.annotations.name
    }
    fn wrap(object: Arc<Self>) -> Object {
        Object::Service(object)
    }
    fn table(state: &ClusterState) -> &Table<Self> {
        &state.services
    }
    fn table_mut(state: &mut ClusterState) -> &mut Table<Self> {
        &mut state.services
    }
}

impl Rules for Service {
    fn check_create(state: &ClusterState, new: &Self) -> Result<(), CommandError> {
        unique_name(state, new)
    }
    fn check_update(state: &ClusterState, _old: &Self, new: &Self) -> Result<(), CommandError> {
        unique_name(state, new)
    }
}
