//! Services: unique names.

use shoal_api::service::Service;

use super::{unique_name, Rules};
use crate::{state::ClusterState, CommandError};

stored_object!(Service in services, id: id, meta: meta, name: spec.annotations.name);

impl Rules for Service {
    fn check_create(state: &ClusterState, new: &Self) -> Result<(), CommandError> {
        unique_name(state, new)
    }
    fn check_update(state: &ClusterState, _old: &Self, new: &Self) -> Result<(), CommandError> {
        unique_name(state, new)
    }
}
