//! The Engine API for swarm objects (`/swarm*`, `/nodes*`), as the docker CLI and docker-py
//! call it: JSON bodies, `{"message"}` errors with dockerd's status codes, `?version=N` on
//! updates, `filters` as JSON in either of the two shapes clients send.

use std::{collections::HashMap, sync::Arc};

use axum::{
    body::Bytes,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::de::DeserializeOwned;
use shoal_api::{
    node::{Node, NodeSpec},
    swarm::{InitRequest, JoinRequest, Swarm as SwarmObject, SwarmSpec, UnlockKeyResponse, UnlockRequest},
    ErrorResponse,
};

use crate::{
    controlapi::{self, node::NodeFilters, swarm::Rotate},
    Swarm, SwarmError,
};

/// Routes to merge into the node's API router.
pub fn routes(swarm: Arc<Swarm>) -> Router {
    Router::new()
        .route("/swarm", get(inspect_swarm))
        .route("/swarm/init", post(init))
        .route("/swarm/join", post(join))
        .route("/swarm/leave", post(leave))
        .route("/swarm/update", post(update_swarm))
        .route("/swarm/unlock", post(unlock))
        .route("/swarm/unlockkey", get(unlock_key))
        .route("/nodes", get(list_nodes))
        .route("/nodes/{id}", get(inspect_node).delete(remove_node))
        .route("/nodes/{id}/update", post(update_node))
        .with_state(swarm)
}

/// An error as dockerd sends it.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl From<SwarmError> for ApiError {
    fn from(e: SwarmError) -> Self {
        ApiError(StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorResponse { message: self.1 })).into_response()
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

/// Parses a JSON body into `T`, answering 400 with the reason (an empty body is `{}`).
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { bytes };
    serde_json::from_slice(bytes).map_err(|e| bad_request(format!("invalid JSON: {e}")))
}

/// Docker's boolean query values: `1`, `true`, `True`, ...
fn flag(query: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match query.get(name).map(|v| v.to_ascii_lowercase()) {
        None => Ok(false),
        Some(v) if v.is_empty() || v == "0" || v == "false" => Ok(false),
        Some(v) if v == "1" || v == "true" => Ok(true),
        Some(v) => Err(bad_request(format!("invalid value for {name}: {v:?}"))),
    }
}

fn version(query: &HashMap<String, String>) -> Result<u64, ApiError> {
    let text = query.get("version").ok_or_else(|| bad_request("version is required"))?;
    text.parse().map_err(|_| bad_request(format!("invalid version: {text:?}")))
}

type Q = Query<HashMap<String, String>>;

async fn inspect_swarm(State(swarm): State<Arc<Swarm>>) -> Result<Json<SwarmObject>, ApiError> {
    let manager = swarm.manager().map_err(not_in_swarm)?;
    Ok(Json(controlapi::swarm::inspect(&manager)?))
}

/// `GET /swarm` on a node outside a swarm says so differently from other manager calls.
fn not_in_swarm(e: SwarmError) -> SwarmError {
    match e {
        SwarmError::NotInSwarmForManagerCall => SwarmError::NotInSwarm,
        other => other,
    }
}

async fn init(State(swarm): State<Arc<Swarm>>, bytes: Bytes) -> Result<Json<String>, ApiError> {
    let req: InitRequest = body(&bytes)?;
    Ok(Json(swarm.init(req).await?))
}

async fn join(State(swarm): State<Arc<Swarm>>, bytes: Bytes) -> Result<StatusCode, ApiError> {
    let req: JoinRequest = body(&bytes)?;
    swarm.join(req).await?;
    Ok(StatusCode::OK)
}

async fn leave(State(swarm): State<Arc<Swarm>>, Query(query): Q) -> Result<StatusCode, ApiError> {
    swarm.leave(flag(&query, "force")?).await?;
    Ok(StatusCode::OK)
}

async fn update_swarm(State(swarm): State<Arc<Swarm>>, Query(query): Q, bytes: Bytes) -> Result<StatusCode, ApiError> {
    let version = version(&query)?;
    let rotate = Rotate {
        worker_token: flag(&query, "rotateWorkerToken")?,
        manager_token: flag(&query, "rotateManagerToken")?,
        unlock_key: flag(&query, "rotateManagerUnlockKey")?,
    };
    let spec: SwarmSpec = body(&bytes)?;
    let manager = swarm.serving_manager()?;
    controlapi::swarm::update(&manager, version, spec, rotate).await?;
    Ok(StatusCode::OK)
}

async fn unlock(State(swarm): State<Arc<Swarm>>, bytes: Bytes) -> Result<StatusCode, ApiError> {
    let req: UnlockRequest = body(&bytes)?;
    swarm.unlock(&req.unlock_key).await?;
    Ok(StatusCode::OK)
}

async fn unlock_key(State(swarm): State<Arc<Swarm>>) -> Result<Json<UnlockKeyResponse>, ApiError> {
    let manager = swarm.serving_manager()?;
    Ok(Json(UnlockKeyResponse { unlock_key: controlapi::swarm::unlock_key(&manager)? }))
}

async fn list_nodes(State(swarm): State<Arc<Swarm>>, Query(query): Q) -> Result<Json<Vec<Node>>, ApiError> {
    let filters = parse_filters(query.get("filters").map(String::as_str).unwrap_or(""))?;
    let filters = NodeFilters::from_query(&filters).map_err(bad_request)?;
    let manager = swarm.serving_manager()?;
    Ok(Json(controlapi::node::list(&manager, &filters)))
}

async fn inspect_node(State(swarm): State<Arc<Swarm>>, Path(id): Path<String>) -> Result<Json<Node>, ApiError> {
    let manager = swarm.serving_manager()?;
    Ok(Json(controlapi::node::inspect(&manager, &id)?))
}

async fn update_node(
    State(swarm): State<Arc<Swarm>>,
    Path(id): Path<String>,
    Query(query): Q,
    bytes: Bytes,
) -> Result<StatusCode, ApiError> {
    let version = version(&query)?;
    let spec: NodeSpec = body(&bytes)?;
    let manager = swarm.serving_manager()?;
    controlapi::node::update(&manager, &id, version, spec).await?;
    Ok(StatusCode::OK)
}

async fn remove_node(
    State(swarm): State<Arc<Swarm>>,
    Path(id): Path<String>,
    Query(query): Q,
) -> Result<StatusCode, ApiError> {
    let force = flag(&query, "force")?;
    let manager = swarm.serving_manager()?;
    controlapi::node::remove(&manager, &id, force).await?;
    Ok(StatusCode::OK)
}

/// `filters` JSON: the CLI's `{"k":{"v":true}}` or docker-py's `{"k":["v"]}`.
pub fn parse_filters(text: &str) -> Result<HashMap<String, Vec<String>>, ApiError> {
    if text.is_empty() {
        return Ok(HashMap::new());
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad_request(format!("invalid filters: {e}")))?;
    let object = value.as_object().ok_or_else(|| bad_request("invalid filters: not an object"))?;
    let mut out = HashMap::new();
    for (key, values) in object {
        let list: Vec<String> = match values {
            serde_json::Value::Array(items) => items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
            serde_json::Value::Object(map) => {
                map.iter().filter(|(_, on)| on.as_bool() != Some(false)).map(|(k, _)| k.clone()).collect()
            }
            serde_json::Value::String(s) => vec![s.clone()],
            _ => return Err(bad_request(format!("invalid filters: bad value for {key}"))),
        };
        out.insert(key.clone(), list);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::parse_filters;

    #[test]
    fn accepts_both_filter_shapes() {
        let cli = parse_filters(r#"{"role":{"manager":true}}"#).unwrap();
        assert_eq!(cli["role"], ["manager"]);
        let py = parse_filters(r#"{"name":["mgr1","mgr2"]}"#).unwrap();
        assert_eq!(py["name"], ["mgr1", "mgr2"]);
        assert!(parse_filters("{").is_err());
    }
}
