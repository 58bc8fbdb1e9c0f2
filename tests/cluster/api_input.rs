//! Bad input to the agent's API gets Docker's status codes and JSON messages and changes
//! nothing.

use shoal_api::{
    dataplane::{DataplaneSpec, Protocol, PublishMode, PublishedPort, ServiceVip},
    ErrorResponse,
};
use shoal_tests::{overlay_spec, plain_lab, workload};

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn bad_requests_are_refused_and_change_nothing() {
    let lab = plain_lab("e2einput", 1, 0);
    let host = lab.host("mgr1").unwrap();
    let api = host.api();
    let w = workload(&lab, "mgr1", "w", "10.78.0.2");
    let mut good = overlay_spec("blue", 4097, "10.78.0.0/24", &[&w]).unwrap();
    good.nodes = vec![host.addr];
    lab.apply_dataplane(&good).unwrap();

    let mut unknown_network = good.clone();
    unknown_network.endpoints[0].network = "red".into();
    let mut missing_interface = good.clone();
    missing_interface.endpoints[0].interface = Some("shw-nope".into());
    let mut bad_vni = good.clone();
    bad_vni.networks[0].vni = 1 << 24;
    let publishing = |port: u16, protocol: Protocol| {
        let mut spec = good.clone();
        spec.services.push(ServiceVip {
            name: "web".into(),
            network: "blue".into(),
            vip: "10.78.0.100".parse().unwrap(),
            ports: vec![],
            backends: vec![w.addr],
            draining: vec![],
            dnsrr: false,
            published: vec![PublishedPort {
                protocol,
                published_port: port,
                target_port: 80,
                publish_mode: PublishMode::Ingress,
            }],
        });
        spec
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("malformed JSON", b"{\"Networks\": [".to_vec(), "invalid JSON"),
        ("wrong type", br#"{"Networks": 3}"#.to_vec(), "invalid JSON"),
        ("unknown network", serde_json::to_vec(&unknown_network).unwrap(), "not declared"),
        ("missing interface", serde_json::to_vec(&missing_interface).unwrap(), "no such interface"),
        ("VNI out of range", serde_json::to_vec(&bad_vni).unwrap(), "VNI"),
        ("the data path port", serde_json::to_vec(&publishing(4789, Protocol::Udp)).unwrap(), "data path (VXLAN)"),
        ("the cluster port", serde_json::to_vec(&publishing(2377, Protocol::Tcp)).unwrap(), "cluster port"),
        ("the DNS port", serde_json::to_vec(&publishing(53, Protocol::Udp)).unwrap(), "DNS server"),
    ];
    for (what, body, expected) in cases {
        let response = api.request("PUT", "/shoal/v1/dataplane", Some(&body)).unwrap();
        assert_eq!(response.status, 400, "{what}: {}", response.text());
        let error: ErrorResponse = response.json().unwrap();
        assert!(error.message.contains(expected), "{what}: message {:?}", error.message);
        let now: DataplaneSpec = api.get("/shoal/v1/dataplane").unwrap().json().unwrap();
        assert_eq!(now, good, "{what} changed the state");
    }

    // A published port is kept out of the node's ephemeral range while published, so the
    // node's own connections never use it (their replies would go to a backend).
    let reserved = || {
        let argv = ["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"].map(String::from);
        let out = shoal_lab::netns_command(&host.netns, &argv).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    lab.apply_dataplane(&publishing(8080, Protocol::Tcp)).unwrap();
    assert_eq!(reserved(), "8080");
    lab.apply_dataplane(&good).unwrap();
    assert_eq!(reserved(), "");

    let not_found = api.get("/v1.51/no/such/thing").unwrap();
    assert_eq!(not_found.status, 404);
    assert!(not_found.json::<ErrorResponse>().is_ok());
    let too_new = api.get("/v1.99/version").unwrap();
    assert_eq!(too_new.status, 400);
    assert!(too_new.text().contains("too new"));
    let ping = api.get("/v1.24/_ping").unwrap();
    assert_eq!((ping.status, ping.text().as_str()), (200, "OK"));
}
