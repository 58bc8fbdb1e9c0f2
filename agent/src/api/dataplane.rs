//! `/shoal/v1/dataplane`: the node's desired overlay state (read, replace) and the BPF
//! programs' counters.

use std::sync::Arc;

use axum::{body::Bytes, extract::State, Json};
use shoal_api::dataplane::{Counter, DataplaneSpec};

use crate::{
    api::{ApiError, Node},
    daemon,
};

/// Largest desired state accepted: a node's whole view of the cluster (10,000 services with
/// a VIP and a published port each is ~3 MiB of JSON).
pub const BODY_LIMIT: usize = 64 << 20;

pub async fn show(State(node): State<Arc<Node>>) -> Json<DataplaneSpec> {
    Json(node.dataplane.lock().await.spec().clone())
}

/// Replaces the whole desired state. Answers only once the kernel matches it and it is on
/// disk, so an acknowledged state survives a restart.
pub async fn replace(State(node): State<Arc<Node>>, body: Bytes) -> Result<Json<DataplaneSpec>, ApiError> {
    let spec: DataplaneSpec =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))?;
    let mut dataplane = node.dataplane.lock().await;
    dataplane.check_new(&spec)?;
    dataplane.replace(spec.clone(), |s| daemon::save_json(&node.dataplane_file, s)).await?;
    Ok(Json(spec))
}

pub async fn stats(State(node): State<Arc<Node>>) -> Result<Json<Vec<Counter>>, ApiError> {
    Ok(Json(node.dataplane.lock().await.counters()?))
}
