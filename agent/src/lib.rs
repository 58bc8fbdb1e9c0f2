//! The shoal node agent: the library behind `shoald`.
//!
//! - `net`: the node's network — BPF programs and maps (`net::bpf`), devices (`net::link`),
//!   and the pure translation of desired overlay state into map entries (`net::overlay`).
//! - `api`: the HTTP API on the node's unix socket (Engine API subset plus `/shoal/v1/...`).
//! - `daemon`: wiring, start-up and orderly shutdown.
//!
//! Only `net::bpf` touches BPF and only `net::link` touches netlink; everything else works on
//! plain values, so it is tested without privileges.
#![forbid(unsafe_code)]

pub mod api;
pub mod daemon;
pub mod dns;
pub mod net;
