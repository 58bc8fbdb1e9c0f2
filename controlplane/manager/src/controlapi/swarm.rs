//! The swarm object: inspect with join tokens, update (spec, token and unlock-key rotation),
//! and the unlock key.

use shoal_api::swarm::{
    JoinTokens, Swarm, SwarmSpec, DEFAULT_HEARTBEAT_PERIOD_NS, DEFAULT_NODE_CERT_EXPIRY_NS, DEFAULT_TASK_HISTORY_LIMIT,
};
use shoal_ca::{JoinToken, UnlockKey};
use shoal_store::Batch;

use crate::{root_ca, Manager, SwarmError};

/// Shortest node certificate lifetime accepted (Docker: 1 hour).
const MIN_CERT_EXPIRY_NS: i64 = 3600 * 1_000_000_000;

/// Fills what the CLI leaves unset with Swarm's defaults.
pub fn with_defaults(mut spec: SwarmSpec) -> SwarmSpec {
    if spec.annotations.name.is_empty() {
        spec.annotations.name = "default".into();
    }
    spec.orchestration.task_history_retention_limit.get_or_insert(DEFAULT_TASK_HISTORY_LIMIT);
    let raft = &mut spec.raft;
    if raft.snapshot_interval == 0 {
        raft.snapshot_interval = 10_000;
    }
    raft.keep_old_snapshots.get_or_insert(0);
    if raft.log_entries_for_slow_followers == 0 {
        raft.log_entries_for_slow_followers = 500;
    }
    if raft.election_tick == 0 {
        raft.election_tick = 10;
    }
    if raft.heartbeat_tick == 0 {
        raft.heartbeat_tick = 1;
    }
    if spec.dispatcher.heartbeat_period == 0 {
        spec.dispatcher.heartbeat_period = DEFAULT_HEARTBEAT_PERIOD_NS;
    }
    if spec.ca_config.node_cert_expiry == 0 {
        spec.ca_config.node_cert_expiry = DEFAULT_NODE_CERT_EXPIRY_NS;
    }
    spec
}

/// `GET /swarm`.
pub fn inspect(manager: &Manager) -> Result<Swarm, SwarmError> {
    manager.store().shared().read(|s| {
        let cluster = s.cluster().ok_or(SwarmError::Unreachable("the swarm is starting".into()))?;
        Ok(Swarm {
            cluster: cluster.info.clone(),
            join_tokens: JoinTokens { worker: cluster.worker_token.clone(), manager: cluster.manager_token.clone() },
        })
    })
}

/// Rotations requested with `POST /swarm/update`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rotate {
    pub worker_token: bool,
    pub manager_token: bool,
    pub unlock_key: bool,
}

/// The spec with Swarm's defaults filled in, if it is one a swarm may have (checked alike at
/// `swarm init` and `swarm update`).
pub fn validated(spec: SwarmSpec) -> Result<SwarmSpec, SwarmError> {
    let mut spec = with_defaults(spec);
    if !spec.ca_config.external_cas.is_empty() {
        return Err(SwarmError::InvalidArgument(
            "external CAs are not supported: shoal's managers sign node certificates themselves".into(),
        ));
    }
    // An operator's root for a rotation is taken by `update`, never kept in the spec.
    spec.ca_config.signing_ca_cert.clear();
    spec.ca_config.signing_ca_key.clear();
    if spec.ca_config.node_cert_expiry < MIN_CERT_EXPIRY_NS {
        return Err(SwarmError::InvalidArgument("minimum certificate expiry time is 1h0m0s".into()));
    }
    if spec.dispatcher.heartbeat_period < 1_000_000_000 {
        return Err(SwarmError::InvalidArgument("heartbeat period must be at least 1s".into()));
    }
    if spec.raft.election_tick <= spec.raft.heartbeat_tick {
        return Err(SwarmError::InvalidArgument("election tick must be greater than heartbeat tick".into()));
    }
    if spec.orchestration.task_history_retention_limit.is_some_and(|l| l < 0) {
        return Err(SwarmError::InvalidArgument("task history retention limit cannot be negative".into()));
    }
    Ok(spec)
}

/// The pool overlay networks' subnets are carved from, as `swarm init` gives it (dockerd's
/// defaults: 10.0.0.0/8 in /24s).
pub fn address_pool(pool: &[String], subnet_size: u32) -> Result<(Vec<String>, u32), SwarmError> {
    let subnet_size = if subnet_size == 0 { 24 } else { subnet_size };
    if pool.is_empty() {
        return Ok((vec!["10.0.0.0/8".into()], subnet_size));
    }
    for cidr in pool {
        let net: ipnet::Ipv4Net =
            cidr.parse().map_err(|_| SwarmError::InvalidArgument(format!("invalid base pool {cidr:?}")))?;
        if net.trunc() != net {
            return Err(SwarmError::InvalidArgument(format!("invalid base pool {cidr:?}: host bits set")));
        }
        if subnet_size < u32::from(net.prefix_len()) || subnet_size > 29 {
            return Err(SwarmError::InvalidArgument(format!(
                "invalid subnet size {subnet_size} for base pool {cidr}: it must be between /{} and /29",
                net.prefix_len()
            )));
        }
    }
    Ok((pool.to_vec(), subnet_size))
}

/// The VXLAN port overlays use (dockerd: 4789 when unset, else within 1024-49151).
pub fn data_path_port(port: u32) -> Result<u32, SwarmError> {
    match port {
        0 => Ok(u32::from(shoal_api::swarm::DEFAULT_DATA_PATH_PORT)),
        1024..=49151 => Ok(port),
        _ => Err(SwarmError::InvalidArgument(format!("data path port {port} is out of the valid range 1024-49151"))),
    }
}

/// `POST /swarm/update?version=N`: replaces the spec (as read at `version`) and rotates what
/// was asked. Turning autolock on makes an unlock key; off drops it. A new `ForceRotate`, or
/// an operator's root in `SigningCACert`/`SigningCAKey`, starts a root rotation.
pub async fn update(manager: &Manager, version: u64, spec: SwarmSpec, rotate: Rotate) -> Result<(), SwarmError> {
    let requested = spec.ca_config.clone();
    let operator_root = match (requested.signing_ca_cert.as_str(), requested.signing_ca_key.as_str()) {
        ("", "") => None,
        (_, "") => {
            return Err(SwarmError::InvalidArgument(
                "a CA certificate needs its key (--ca-key): external CAs are not supported".into(),
            ))
        }
        ("", _) => return Err(SwarmError::InvalidArgument("a CA key needs its certificate (--ca-cert)".into())),
        (cert, key) => Some((cert, key)),
    };
    let spec = validated(spec)?;
    let mut cluster = manager
        .store()
        .shared()
        .read(|s| s.cluster().map(|c| shoal_store::Cluster::clone(c)))
        .ok_or(SwarmError::Unreachable("the swarm is starting".into()))?;
    let internal = |e: shoal_ca::CaError| SwarmError::Internal(e.to_string());
    let digest = shoal_ca::root::digest_of_pem(&cluster.info.tls_info.trust_root).map_err(internal)?;
    if rotate.worker_token {
        cluster.worker_token = JoinToken::generate(&digest).map_err(internal)?.to_string();
    }
    if rotate.manager_token {
        cluster.manager_token = JoinToken::generate(&digest).map_err(internal)?.to_string();
    }
    // Mid-rotation, the tokens that take over at its end are rotated too.
    if let Some(rotation) = &mut cluster.root_rotation {
        let next = shoal_ca::root::digest_of_pem(&rotation.cert_pem).map_err(internal)?;
        if rotate.worker_token {
            rotation.worker_token = JoinToken::generate(&next).map_err(internal)?.to_string();
        }
        if rotate.manager_token {
            rotation.manager_token = JoinToken::generate(&next).map_err(internal)?.to_string();
        }
    }
    let autolock = spec.encryption_config.auto_lock_managers;
    cluster.unlock_key = match (autolock, cluster.unlock_key.take()) {
        (false, _) => None,
        (true, Some(key)) if !rotate.unlock_key => Some(key),
        (true, _) => Some(UnlockKey::generate().map_err(internal)?.to_string()),
    };
    if operator_root.is_some() || spec.ca_config.force_rotate != cluster.info.spec.ca_config.force_rotate {
        root_ca::start_rotation(&mut cluster, operator_root)?;
    }
    cluster.info.spec = spec;
    manager.store().write(Batch::new().update(cluster, version)).await?;
    Ok(())
}

/// `GET /swarm/unlockkey`: the key, or an empty one when autolock is off (as dockerd).
pub fn unlock_key(manager: &Manager) -> Result<String, SwarmError> {
    manager.store().shared().read(|s| {
        let cluster = s.cluster().ok_or(SwarmError::Unreachable("the swarm is starting".into()))?;
        Ok(cluster.unlock_key.clone().unwrap_or_default())
    })
}
