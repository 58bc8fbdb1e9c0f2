//! One table of the store: the objects of one kind by ID, plus the secondary indexes their
//! kind declares, kept in step on every insert and remove. Lookups by ID, ID prefix and any
//! index are O(log n + matches); nothing the roles do per event scans a table.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use crate::objects::{Index, StoredObject};

#[derive(Debug)]
pub struct Table<T> {
    by_id: BTreeMap<String, Arc<T>>,
    /// `(index, key, id)`: a range over `(index, key, ..)` lists the matching IDs in order.
    index: BTreeSet<(Index, String, String)>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table { by_id: BTreeMap::new(), index: BTreeSet::new() }
    }
}

impl<T> Clone for Table<T> {
    fn clone(&self) -> Self {
        Table { by_id: self.by_id.clone(), index: self.index.clone() }
    }
}

impl<T: PartialEq> PartialEq for Table<T> {
    fn eq(&self, other: &Self) -> bool {
        // The indexes follow from the objects.
        self.by_id == other.by_id
    }
}

/// Why a reference (ID, name or ID prefix) named no single object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("{kind} {reference} not found")]
    NotFound { kind: &'static str, reference: String },
    #[error("{kind} {reference} is ambiguous ({matches} matches found)")]
    Ambiguous { kind: &'static str, reference: String, matches: usize },
}

impl<T: StoredObject> Table<T> {
    pub fn get(&self, id: &str) -> Option<&Arc<T>> {
        self.by_id.get(id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Every object, in ID order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<T>> {
        self.by_id.values()
    }

    /// Objects whose ID starts with `prefix`.
    pub fn by_id_prefix<'a>(&'a self, prefix: &str) -> impl Iterator<Item = &'a Arc<T>> + 'a {
        let prefix = prefix.to_owned();
        self.by_id.range(prefix.clone()..).take_while(move |(id, _)| id.starts_with(&prefix)).map(|(_, o)| o)
    }

    /// Objects whose `index` has the key `key`, in ID order.
    pub fn find<'a>(&'a self, index: Index, key: &str) -> impl Iterator<Item = &'a Arc<T>> + 'a {
        let key = key.to_owned();
        self.index
            .range((index, key.clone(), String::new())..)
            .take_while(move |(i, k, _)| *i == index && *k == key)
            .filter_map(|(_, _, id)| self.by_id.get(id))
    }

    pub fn count(&self, index: Index, key: &str) -> usize {
        self.find(index, key).count()
    }

    /// Docker's lookup order for a reference: full ID, then name, then a unique ID prefix.
    pub fn resolve(&self, reference: &str) -> Result<&Arc<T>, ResolveError> {
        if let Some(object) = self.get(reference) {
            return Ok(object);
        }
        let mut by_name = self.find(Index::Name, reference);
        if let (Some(object), None) = (by_name.next(), by_name.next()) {
            return Ok(object);
        }
        let kind = T::KIND.as_str();
        if reference.is_empty() {
            return Err(ResolveError::NotFound { kind, reference: String::new() });
        }
        let mut matches = self.by_id_prefix(reference);
        match (matches.next(), matches.count()) {
            (Some(object), 0) => Ok(object),
            (None, _) => Err(ResolveError::NotFound { kind, reference: reference.to_owned() }),
            (Some(_), more) => {
                Err(ResolveError::Ambiguous { kind, reference: reference.to_owned(), matches: more + 1 })
            }
        }
    }

    /// Puts `object` in (replacing the one with its ID); returns the replaced one.
    pub fn insert(&mut self, object: Arc<T>) -> Option<Arc<T>> {
        let id = object.id().to_owned();
        let old = self.remove(&id);
        for (index, key) in keys_of(&*object) {
            self.index.insert((index, key, id.clone()));
        }
        self.by_id.insert(id, object);
        old
    }

    pub fn remove(&mut self, id: &str) -> Option<Arc<T>> {
        let old = self.by_id.remove(id)?;
        for (index, key) in keys_of(&*old) {
            self.index.remove(&(index, key, id.to_owned()));
        }
        Some(old)
    }
}

impl<T: StoredObject> FromIterator<Arc<T>> for Table<T> {
    fn from_iter<I: IntoIterator<Item = Arc<T>>>(objects: I) -> Self {
        let mut table = Table::default();
        for object in objects {
            table.insert(object);
        }
        table
    }
}

fn keys_of<T: StoredObject>(object: &T) -> Vec<(Index, String)> {
    let mut keys = Vec::new();
    if !object.name().is_empty() {
        keys.push((Index::Name, object.name().to_owned()));
    }
    object.index_keys(&mut keys);
    keys
}

#[cfg(test)]
mod tests {
    use shoal_api::task::{Task, TaskState};

    use super::*;

    fn task(id: &str, service: &str, slot: u64, node: &str) -> Arc<Task> {
        Arc::new(Task {
            id: id.into(),
            service_id: service.into(),
            slot,
            node_id: node.into(),
            desired_state: TaskState::Running,
            ..Default::default()
        })
    }

    #[test]
    fn indexes_follow_inserts_replacements_and_removals() {
        let mut tasks: Table<Task> =
            [task("t1", "s1", 1, "n1"), task("t2", "s1", 2, "n2"), task("t3", "s2", 1, "n1")].into_iter().collect();
        let ids = |it: Vec<&Arc<Task>>| it.into_iter().map(|t| t.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(tasks.find(Index::Service, "s1").collect()), ["t1", "t2"]);
        assert_eq!(ids(tasks.find(Index::Node, "n1").collect()), ["t1", "t3"]);
        assert_eq!(ids(tasks.find(Index::Slot, "s1/2").collect()), ["t2"]);

        // Moving t1 to another node moves it in the node index, and only there.
        tasks.insert(task("t1", "s1", 1, "n2"));
        assert_eq!(ids(tasks.find(Index::Node, "n1").collect()), ["t3"]);
        assert_eq!(ids(tasks.find(Index::Node, "n2").collect()), ["t1", "t2"]);
        assert_eq!(tasks.count(Index::DesiredState, "running"), 3);

        tasks.remove("t2");
        assert_eq!(ids(tasks.find(Index::Service, "s1").collect()), ["t1"]);
        assert_eq!(tasks.count(Index::Node, "n2"), 1);
        assert!(
            tasks.index.iter().all(|(_, _, id)| tasks.by_id.contains_key(id)),
            "no index entry outlives its object"
        );
    }

    #[test]
    fn references_resolve_by_id_then_name_then_unique_prefix() {
        let mut named = Task { id: "abc1".into(), ..Default::default() };
        named.annotations.name = "web.1".into();
        let tasks: Table<Task> = [Arc::new(named), task("abd2", "s", 1, "n")].into_iter().collect();
        assert_eq!(tasks.resolve("abc1").unwrap().id, "abc1");
        assert_eq!(tasks.resolve("web.1").unwrap().id, "abc1");
        assert_eq!(tasks.resolve("abd").unwrap().id, "abd2");
        assert!(matches!(tasks.resolve("ab"), Err(ResolveError::Ambiguous { matches: 2, .. })));
        assert!(matches!(tasks.resolve("zz"), Err(ResolveError::NotFound { .. })));
        assert!(matches!(tasks.resolve(""), Err(ResolveError::NotFound { .. })));
    }
}
