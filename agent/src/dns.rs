//! The embedded DNS server of a node (Swarm's service discovery): a workload asks its network's
//! gateway on port 53 (the node DNATs that to this server) and gets, for its own network only,
//! a service's VIP, `tasks.<service>`'s task addresses, or a DNS-round-robin service's task
//! addresses; any other name is forwarded to the node's upstream resolver.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{rdata::A, RData, Record, RecordType},
};
use ipnet::Ipv4Net;
use shoal_api::dataplane::{DataplaneSpec, OverlayNetwork, ServiceVip};
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

/// Answers are short-lived: task addresses change as tasks come and go (stale DNS is one of
/// Swarm's known pains).
const TTL: u32 = 5;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// Names per network, kept with each applied change.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Names {
    networks: HashMap<String, (Ipv4Net, HashMap<String, Vec<Ipv4Addr>>)>,
}

impl Names {
    pub fn from_spec(spec: &DataplaneSpec) -> Names {
        let mut names = Names::default();
        for net in &spec.networks {
            names.set_network(net);
        }
        for svc in &spec.services {
            names.set_service(svc);
        }
        names
    }

    /// Declares `net` (its names stay if it was declared).
    pub fn set_network(&mut self, net: &OverlayNetwork) {
        self.networks.entry(net.name.clone()).or_default().0 = net.subnet;
    }

    pub fn remove_network(&mut self, name: &str) {
        self.networks.remove(name);
    }

    /// Gives `svc`'s names on its network: the VIP (or the tasks, for dnsrr) and
    /// `tasks.<name>`.
    pub fn set_service(&mut self, svc: &ServiceVip) {
        let Some((_, names)) = self.networks.get_mut(&svc.network) else { return };
        let name = svc.name.to_ascii_lowercase();
        let tasks = svc.backends.clone();
        names.insert(format!("tasks.{name}"), tasks.clone());
        names.insert(name, if svc.dnsrr { tasks } else { vec![svc.vip] });
    }

    pub fn remove_service(&mut self, network: &str, name: &str) {
        let Some((_, names)) = self.networks.get_mut(network) else { return };
        let name = name.to_ascii_lowercase();
        names.remove(&format!("tasks.{name}"));
        names.remove(&name);
    }

    /// The addresses of `name` for a client at `client`, if the client's network has it.
    pub fn resolve(&self, client: Ipv4Addr, name: &str) -> Option<&[Ipv4Addr]> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.networks
            .values()
            .filter(|(subnet, _)| subnet.contains(&client))
            .find_map(|(_, names)| names.get(&name).map(Vec::as_slice))
    }
}

/// Serves DNS on `socket` until the task is dropped.
pub async fn serve(socket: UdpSocket, names: Arc<RwLock<Names>>, upstream: Option<SocketAddr>) {
    info!(addr = ?socket.local_addr().ok(), ?upstream, "DNS listening");
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((len, from)) = socket.recv_from(&mut buf).await else { continue };
        let query = buf[..len].to_vec();
        let (socket, names) = (socket.clone(), names.clone());
        tokio::spawn(async move {
            if let Some(reply) = answer(&query, from, &names, upstream).await {
                let _ = socket.send_to(&reply, from).await;
            }
        });
    }
}

async fn answer(
    query: &[u8],
    from: SocketAddr,
    names: &RwLock<Names>,
    upstream: Option<SocketAddr>,
) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let question = request.queries().first()?.clone();
    let client = match from {
        SocketAddr::V4(v4) => *v4.ip(),
        SocketAddr::V6(_) => return None,
    };
    let local =
        names.read().unwrap_or_else(|p| p.into_inner()).resolve(client, &question.name().to_ascii()).map(<[_]>::to_vec);
    let Some(addrs) = local else {
        return forward(query, upstream).await.or_else(|| refuse(&request, ResponseCode::NXDomain));
    };
    debug!(%client, name = %question.name(), ?addrs, "answered");
    let mut reply = reply_to(&request);
    reply.set_recursion_available(true).set_authoritative(true);
    if matches!(question.query_type(), RecordType::A | RecordType::ANY) {
        for addr in addrs {
            reply.add_answer(Record::from_rdata(question.name().clone(), TTL, RData::A(A(addr))));
        }
    }
    reply.to_vec().ok()
}

/// Relays the query to the upstream resolver and returns its answer as is.
async fn forward(query: &[u8], upstream: Option<SocketAddr>) -> Option<Vec<u8>> {
    let upstream = upstream?;
    let socket = UdpSocket::bind("0.0.0.0:0").await.ok()?;
    socket.send_to(query, upstream).await.ok()?;
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(UPSTREAM_TIMEOUT, socket.recv_from(&mut buf)).await {
        Ok(Ok((len, _))) => Some(buf[..len].to_vec()),
        _ => {
            warn!(%upstream, "upstream resolver did not answer");
            None
        }
    }
}

fn refuse(request: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut reply = reply_to(request);
    reply.set_response_code(code);
    reply.to_vec().ok()
}

/// A response to `request`: its ID, opcode, flags and questions.
fn reply_to(request: &Message) -> Message {
    let mut reply = Message::new();
    reply
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired());
    for q in request.queries() {
        reply.add_query(q.clone());
    }
    reply
}

/// The first nameserver in `/etc/resolv.conf`, port 53.
pub fn system_upstream() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .find_map(|ip| ip.trim().parse::<Ipv4Addr>().ok())
        .map(|ip| SocketAddr::from((ip, 53)))
}

#[cfg(test)]
mod tests {
    use shoal_api::dataplane::{Protocol, ServicePort};

    use super::*;

    #[test]
    fn names_resolve_per_network_for_all_three_record_kinds() {
        let net = |name: &str, subnet: &str| {
            OverlayNetwork::new(name, if name == "blue" { 1 } else { 2 }, subnet.parse().unwrap())
        };
        let svc = |name: &str, network: &str, dnsrr: bool| ServiceVip {
            name: name.into(),
            network: network.into(),
            vip: "10.78.0.100".parse().unwrap(),
            ports: vec![ServicePort { protocol: Protocol::Tcp, port: 80, target_port: 80 }],
            backends: vec!["10.78.0.11".parse().unwrap(), "10.78.0.12".parse().unwrap()],
            draining: vec![],
            dnsrr,
            published: vec![],
        };
        let spec = DataplaneSpec {
            networks: vec![net("blue", "10.78.0.0/24"), net("red", "10.79.0.0/24")],
            endpoints: vec![],
            services: vec![svc("web", "blue", false), svc("db", "blue", true)],
            nodes: vec![],
        };
        let names = Names::from_spec(&spec);
        let client: Ipv4Addr = "10.78.0.2".parse().unwrap();
        assert_eq!(names.resolve(client, "web."), Some(&["10.78.0.100".parse().unwrap()][..]));
        assert_eq!(names.resolve(client, "tasks.web").unwrap().len(), 2);
        assert_eq!(names.resolve(client, "DB").unwrap().len(), 2, "dnsrr gives the tasks");
        assert_eq!(names.resolve("10.79.0.2".parse().unwrap(), "web"), None, "another network's service");
        let mut names = names;
        names.remove_service("blue", "web");
        assert_eq!(names.resolve(client, "web"), None);
        assert_eq!(names.resolve(client, "tasks.web"), None);
    }
}
