//! The log and state machine stores pass openraft's own storage conformance suite.

use std::sync::Arc;

use openraft::{
    testing::{StoreBuilder, Suite},
    StorageError,
};
use shoal_ca::DataKey;

use crate::{db::Db, log::LogStore, state_machine::StateMachineStore, types::RaftId};

struct Builder;

impl StoreBuilder<crate::TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<RaftId>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Db::open(&dir.path().join("raft.db"), DataKey::generate().expect("key")).expect("db");
        let db = Arc::new(db);
        let state_machine = StateMachineStore::open(db.clone()).expect("state machine");
        Ok((dir, LogStore::new(db), state_machine))
    }
}

#[test]
fn log_and_state_machine_pass_openraft_suite() {
    Suite::test_all(Builder).unwrap();
}
