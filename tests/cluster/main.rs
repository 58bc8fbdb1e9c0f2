//! End-to-end tests: each brings up a lab of its own (hosts as network namespaces running the
//! real shoald with the real BPF programs) and tears it down afterwards, pass or fail.
//! They need root.
#![forbid(unsafe_code)]

mod api_input;
mod api_tls;
mod big_packets;
mod changes;
mod dns;
mod ingress;
mod outbound;
mod overlay;
mod shoal_cli;
mod swarm_api;
mod swarm_ha;
mod swarm_restore;
mod swarm_security;
mod vip;
