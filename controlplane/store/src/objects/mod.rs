//! The kinds of object the store keeps, one file each (swarmkit's `manager/state/store`):
//! how each is identified and indexed, and the invariants the store checks when a
//! transaction creates, updates or deletes one. The objects themselves are `shoal-api`'s
//! types (one definition from API to store to agent); where a stored object holds more than
//! clients may see (the cluster's secrets), its file defines the stored shape and the API
//! type is a view of it.

/// The parts of `StoredObject` every kind writes alike: its kind, its table, and where its
/// ID, `Meta` and name are (and, for kinds with more indexes, the function giving their keys).
macro_rules! stored_object {
    ($ty:ident in $table:ident, id: $($id:ident).+, meta: $($meta:ident).+, name: $($name:ident).+ $(, keys: $keys:path)?) => {
        impl $crate::objects::StoredObject for $ty {
            const KIND: $crate::objects::Kind = $crate::objects::Kind::$ty;
            fn id(&self) -> &str {
                &self.$($id).+
            }
            fn meta(&self) -> &shoal_api::swarm::Meta {
                &self.$($meta).+
            }
            fn meta_mut(&mut self) -> &mut shoal_api::swarm::Meta {
                &mut self.$($meta).+
            }
            fn name(&self) -> &str {
                &self.$($name).+
            }
            $(fn index_keys(&self, keys: &mut Vec<($crate::objects::Index, String)>) {
                $keys(self, keys)
            })?
            fn wrap(object: std::sync::Arc<Self>) -> $crate::objects::Object {
                $crate::objects::Object::$ty(object)
            }
            fn table(state: &$crate::state::ClusterState) -> &$crate::table::Table<Self> {
                &state.$table
            }
            fn table_mut(state: &mut $crate::state::ClusterState) -> &mut $crate::table::Table<Self> {
                &mut state.$table
            }
        }
    };
}

mod cluster;
mod network;
mod node;
mod service;
mod task;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shoal_api::{network::Network, node::Node, service::Service, swarm::Meta, task::Task};

pub use cluster::{Cluster, RootRotation};
pub use node::replaceable as node_replaceable;
pub use task::slot_key;

use crate::{state::ClusterState, table::Table, CommandError};

/// A kind of stored object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Cluster,
    Node,
    Service,
    Task,
    Network,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Cluster => "cluster",
            Kind::Node => "node",
            Kind::Service => "service",
            Kind::Task => "task",
            Kind::Network => "network",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A secondary index of a table. Every kind has `Name`; the others belong to one kind each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Index {
    /// The object's name (a node's hostname).
    Name,
    /// Nodes by role (`manager` / `worker`).
    Role,
    /// Tasks by service ID.
    Service,
    /// Tasks by node ID.
    Node,
    /// Tasks by `<service ID>/<slot>` (`<service ID>/<node ID>` for global tasks).
    Slot,
    /// Tasks by desired state (`running`, `shutdown`, ...).
    DesiredState,
}

/// What the store needs of an object kind.
pub trait StoredObject: Clone + Send + Sync + 'static {
    const KIND: Kind;
    fn id(&self) -> &str;
    fn meta(&self) -> &Meta;
    fn meta_mut(&mut self) -> &mut Meta;
    /// The key of the `Name` index; empty for an unnamed object.
    fn name(&self) -> &str;
    /// The object's keys in its kind's other indexes.
    fn index_keys(&self, _keys: &mut Vec<(Index, String)>) {}
    fn wrap(object: Arc<Self>) -> Object;
    fn table(state: &ClusterState) -> &Table<Self>;
    fn table_mut(state: &mut ClusterState) -> &mut Table<Self>;
}

/// The invariants of a kind, checked at apply time against the state as the transaction has
/// changed it so far (so a batch that deletes a node and creates its replacement passes).
pub(crate) trait Rules: StoredObject {
    fn check_create(_state: &ClusterState, _new: &Self) -> Result<(), CommandError> {
        Ok(())
    }
    fn check_update(_state: &ClusterState, _old: &Self, _new: &Self) -> Result<(), CommandError> {
        Ok(())
    }
    fn check_delete(_state: &ClusterState, _old: &Self) -> Result<(), CommandError> {
        Ok(())
    }
}

/// Any stored object; what transactions carry and events show. Cloning is cheap (shared).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Object {
    Cluster(Arc<Cluster>),
    Node(Arc<Node>),
    Service(Arc<Service>),
    Task(Arc<Task>),
    Network(Arc<Network>),
}

/// Runs `$body` with `$o` bound to the `Arc<T>` inside an `Object`, whatever its kind.
macro_rules! with_object {
    ($object:expr, $o:ident => $body:expr) => {
        match $object {
            $crate::objects::Object::Cluster($o) => $body,
            $crate::objects::Object::Node($o) => $body,
            $crate::objects::Object::Service($o) => $body,
            $crate::objects::Object::Task($o) => $body,
            $crate::objects::Object::Network($o) => $body,
        }
    };
}
pub(crate) use with_object;

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Cluster(_) => Kind::Cluster,
            Object::Node(_) => Kind::Node,
            Object::Service(_) => Kind::Service,
            Object::Task(_) => Kind::Task,
            Object::Network(_) => Kind::Network,
        }
    }

    pub fn id(&self) -> &str {
        with_object!(self, o => o.id())
    }

    pub fn meta(&self) -> &Meta {
        with_object!(self, o => o.meta())
    }

    pub fn as_node(&self) -> Option<&Arc<Node>> {
        match self {
            Object::Node(n) => Some(n),
            _ => None,
        }
    }
}

macro_rules! from_object {
    ($($ty:ty => $variant:ident),*) => {$(
        impl From<$ty> for Object {
            fn from(object: $ty) -> Self {
                Object::$variant(Arc::new(object))
            }
        }
    )*};
}
from_object!(Cluster => Cluster, Node => Node, Service => Service, Task => Task, Network => Network);

/// A name another object of the same kind already has: Docker's 409 wording.
pub(crate) fn unique_name<T: StoredObject>(state: &ClusterState, object: &T) -> Result<(), CommandError> {
    if object.name().is_empty() {
        return Ok(());
    }
    let taken = T::table(state).find(Index::Name, object.name()).any(|other| other.id() != object.id());
    if taken {
        return Err(CommandError::Conflict(format!("{} {} already exists", T::KIND, object.name())));
    }
    Ok(())
}
