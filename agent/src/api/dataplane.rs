//! `/shoal/v1/dataplane`: the node's desired overlay state (read, replace whole, change one
//! object at a time) and the BPF programs' counters.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Query, State},
    Json,
};
use serde::Deserialize;
use shoal_api::dataplane::{ChangeBatch, ChangeReport, Counter, DataplaneSpec, Sequence};

use crate::{
    api::{ApiError, Node},
    net::NetError,
};

/// Largest desired state accepted: a node's whole view of the cluster (10,000 services with
/// a VIP and a published port each is ~3 MiB of JSON).
pub const BODY_LIMIT: usize = 64 << 20;

pub async fn show(State(node): State<Arc<Node>>) -> Json<DataplaneSpec> {
    Json(node.dataplane.lock().await.spec())
}

#[derive(Debug, Deserialize)]
pub struct ReplaceQuery {
    /// The source's sequence number this state is at (kept across restarts).
    sequence: Option<u64>,
}

/// Replaces the whole desired state. Answers only once the kernel matches it and it is on
/// disk, so an acknowledged state survives a restart.
pub async fn replace(
    State(node): State<Arc<Node>>,
    Query(query): Query<ReplaceQuery>,
    body: Bytes,
) -> Result<Json<DataplaneSpec>, ApiError> {
    let spec: DataplaneSpec = parse(&body)?;
    let given = spec.clone();
    to_the_end(async move { node.dataplane.lock().await.replace(given, query.sequence).await }).await?;
    Ok(Json(spec))
}

/// Applies a batch of changes; each one's outcome is in the report (a refused change is
/// reported there, not by the status, since the others applied).
pub async fn change(State(node): State<Arc<Node>>, body: Bytes) -> Result<Json<ChangeReport>, ApiError> {
    let batch: ChangeBatch = parse(&body)?;
    Ok(Json(to_the_end(async move { node.dataplane.lock().await.apply_batch(batch).await }).await?))
}

/// The last batch applied: a source resumes after it.
pub async fn sequence(State(node): State<Arc<Node>>) -> Json<Sequence> {
    let dataplane = node.dataplane.lock().await;
    Json(Sequence { sequence: dataplane.sequence(), left_out: dataplane.left_out().to_vec() })
}

pub async fn stats(State(node): State<Arc<Node>>) -> Result<Json<Vec<Counter>>, ApiError> {
    Ok(Json(node.dataplane.lock().await.counters()?))
}

/// Runs a change of the dataplane to its end on a task of its own: a client that hangs up
/// drops the handler, and a change dropped half-way would leave the kernel, the state and
/// the journal disagreeing.
async fn to_the_end<T: Send + 'static>(
    change: impl std::future::Future<Output = Result<T, NetError>> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::spawn(change).await {
        Ok(result) => Ok(result?),
        Err(e) => Err(ApiError::Internal(format!("the change did not finish: {e}"))),
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))
}
