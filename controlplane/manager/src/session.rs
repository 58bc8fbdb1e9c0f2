//! A node's session with the managers (workers and managers alike): a heartbeat every
//! period to the leader, failing over between the managers it knows; following role changes
//! the swarm decided (promote/demote); renewing its certificate before it expires.

use std::{
    sync::{Arc, Weak},
    time::{Duration, SystemTime},
};

use shoal_api::{node::NodeRole, swarm::DEFAULT_HEARTBEAT_PERIOD_NS};
use shoal_ca::tls::TlsMaterial;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    root_ca,
    wire::{ErrorReply, HeartbeatCall, HeartbeatReply},
    Swarm, SwarmError,
};

/// Renew when less than this share of the certificate's lifetime is left (Swarm renews at a
/// random point between 50% and 80% of it).
const RENEW_AT_REMAINING: f64 = 0.4;

pub async fn run(swarm: Weak<Swarm>, stopped: watch::Receiver<bool>) {
    let stop = crate::manager::until(stopped);
    tokio::pin!(stop);
    let mut period = Duration::from_nanos(DEFAULT_HEARTBEAT_PERIOD_NS as u64);
    let mut client: Option<(String, reqwest::Client)> = None;
    let mut target = 0usize;
    loop {
        let Some(swarm) = swarm.upgrade() else { return };
        match beat(&swarm, &mut client, &mut target).await {
            Ok(reply) => {
                period = Duration::from_nanos(u64::try_from(reply.period_ns).unwrap_or(5_000_000_000))
                    .max(Duration::from_millis(100));
                if let Err(e) = follow(&swarm, &reply).await {
                    warn!(error = %e, "following the swarm's decision failed");
                }
            }
            Err(e) => {
                debug!(error = %e, "heartbeat failed; trying the next manager");
                target += 1;
            }
        }
        drop(swarm);
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// One heartbeat, following a redirect to the leader once.
async fn beat(
    swarm: &Swarm,
    client: &mut Option<(String, reqwest::Client)>,
    target: &mut usize,
) -> Result<HeartbeatReply, SwarmError> {
    let (membership, tls) = swarm.session_context()?;
    // A new client for a renewed certificate or new roots.
    let material = format!("{}{}", tls.cert_pem, tls.root_pem);
    if client.as_ref().is_none_or(|(made_from, _)| *made_from != material) {
        let fresh = shoal_store::transport::client(&tls).map_err(|e| SwarmError::Internal(e.to_string()))?;
        *client = Some((material, fresh));
    }
    let http = &client.as_ref().expect("set above").1;
    if membership.managers.is_empty() {
        return Err(SwarmError::Unreachable("no manager known".into()));
    }
    let mut description = swarm.description();
    description.tls_info = root_ca::node_tls_info(&tls.cert_pem, &tls.root_pem);
    let call = HeartbeatCall { addr: membership.advertise_addr.clone(), description: Some(description) };
    let mut addr = membership.managers[*target % membership.managers.len()].clone();
    for _ in 0..2 {
        let reply = post::<_, HeartbeatReply>(http, &addr, "heartbeat", &call).await?;
        if reply.accepted {
            // A worker follows the swarm's incarnation (a manager's changes only with its own
            // raft: a join or --force-new-cluster).
            let generation = (membership.role == NodeRole::Worker
                && !reply.generation.is_empty()
                && reply.generation != membership.generation)
                .then(|| reply.generation.clone());
            if (reply.managers != membership.managers && !reply.managers.is_empty()) || generation.is_some() {
                let managers =
                    if reply.managers.is_empty() { membership.managers.clone() } else { reply.managers.clone() };
                swarm.update_from_leader(managers, generation)?;
            }
            return Ok(reply);
        }
        match &reply.leader {
            Some(leader) => addr = leader.clone(),
            None => return Err(SwarmError::Write(shoal_store::WriteError::NoLeader)),
        }
    }
    Err(SwarmError::Unreachable("the leader kept moving".into()))
}

/// Acts on what the managers want: a role change, or a certificate about to expire.
async fn follow(swarm: &Arc<Swarm>, reply: &HeartbeatReply) -> Result<(), SwarmError> {
    let (membership, tls) = swarm.session_context()?;
    let in_raft = reply.voter;
    match (membership.role, reply.role) {
        // Demoted: a worker only once the leader has taken this node out of raft, so it
        // never drops a replica that still counts towards the quorum.
        (NodeRole::Manager, NodeRole::Worker) if in_raft => {
            info!("demoted: waiting to be taken out of raft");
            return Ok(());
        }
        (from, to) if from != to => {
            info!(?from, ?to, "the swarm changed this node's role");
            return swarm.change_role(to).await;
        }
        // A promotion (or join) cut short before raft took this node in: ask again, until
        // it is a voter or no longer meant to be a manager.
        (NodeRole::Manager, NodeRole::Manager) if !in_raft && reply.accepted => {
            info!("a manager not in raft yet: asking to join again");
            return swarm.rejoin_raft().await;
        }
        _ => {}
    }
    // A root rotation: trust what the swarm trusts, then hold a certificate of its issuer.
    if !reply.trust_root.is_empty() && reply.trust_root != tls.root_pem {
        info!("the swarm's trusted roots changed");
        swarm.set_trust_root(&reply.trust_root).await?;
    }
    let issued_by_another = !reply.cert_issuer_public_key.is_empty()
        && shoal_ca::IssuerInfo::of_leaf(&tls.cert_pem, &tls.root_pem)
            .is_ok_and(|issuer| issuer.public_key != reply.cert_issuer_public_key);
    if issued_by_another {
        info!("the swarm's root changed: renewing this node's certificate");
        swarm.renew_certificate().await?;
    } else if needs_renewal(&tls) {
        info!("renewing this node's certificate");
        swarm.renew_certificate().await?;
    }
    Ok(())
}

fn needs_renewal(tls: &TlsMaterial) -> bool {
    let Ok(not_after) = shoal_ca::node::not_after(&tls.cert_pem) else { return true };
    let Ok(not_before) = not_before(&tls.cert_pem) else { return true };
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let left = not_after.duration_since(SystemTime::now()).unwrap_or_default();
    left.as_secs_f64() < lifetime.as_secs_f64() * RENEW_AT_REMAINING
}

fn not_before(pem: &str) -> Result<SystemTime, SwarmError> {
    // Issued certificates are backdated by the CA's clock-skew allowance; the lifetime we
    // compare against is what the CA granted, so read both ends from the certificate.
    shoal_ca::node::not_before(pem).map_err(|e| SwarmError::Internal(e.to_string()))
}

/// POSTs `body` to `https://addr/path` and decodes the reply or the error.
pub async fn post<B: serde::Serialize, R: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    addr: &str,
    path: &str,
    body: &B,
) -> Result<R, SwarmError> {
    let response =
        client.post(format!("https://{addr}/{path}")).json(body).send().await.map_err(|e| {
            SwarmError::Unreachable(format!("could not reach the manager at {addr}: {}", error_chain(&e)))
        })?;
    let status = response.status();
    if status.is_success() {
        return response.json().await.map_err(|e| SwarmError::Internal(format!("reply from {addr}: {e}")));
    }
    let message = response.json::<ErrorReply>().await.map(|e| e.message).unwrap_or_else(|_| status.to_string());
    Err(match status.as_u16() {
        400 => SwarmError::InvalidArgument(message),
        401 | 403 => SwarmError::InvalidArgument(message),
        404 => SwarmError::NotFound(message),
        409 => SwarmError::Conflict(message),
        _ => SwarmError::Unreachable(message),
    })
}

/// `e` and its causes, so "connection refused" or a certificate mismatch shows.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shoal_ca::{NodeIdentity, NodeKey, RootCa};

    use super::*;

    fn material(lifetime: Duration) -> TlsMaterial {
        let root = RootCa::generate().unwrap();
        let key = NodeKey::generate().unwrap();
        let who = NodeIdentity { node_id: "n".into(), role: NodeRole::Worker, cluster_id: "c".into() };
        TlsMaterial {
            root_pem: root.cert_pem().into(),
            cert_pem: root.issue(&key.csr_pem().unwrap(), &who, lifetime).unwrap(),
            key_pem: key.to_pem().to_string(),
        }
    }

    #[test]
    fn renews_only_when_little_of_the_lifetime_is_left() {
        assert!(!needs_renewal(&material(Duration::from_secs(90 * 24 * 3600))), "a fresh certificate");
        assert!(needs_renewal(&material(Duration::from_secs(100))), "minutes left of hours");
    }
}
