//! The Engine API over TCP with mutual TLS, as `docker --tlsverify -H tcp://...` uses it.

use std::process::Command;

use shoal_tests::lab;

/// Makes a CA, a server certificate for `server_ip` and a client certificate with openssl.
fn certificates(dir: &std::path::Path, server_ip: &str) {
    let script = format!(
        r#"set -e
cd {dir}
ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
openssl req -x509 $ec -days 1 -subj /CN=test-ca -keyout ca.key -out ca.pem \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
openssl req $ec -subj /CN=server -keyout server.key -out server.csr
printf 'subjectAltName=IP:{server_ip}\nextendedKeyUsage=serverAuth\n' > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -out server.pem -extfile server.ext
openssl req $ec -subj /CN=client -keyout key.pem -out client.csr
printf 'extendedKeyUsage=clientAuth\n' > client.ext
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -out cert.pem -extfile client.ext
"#,
        dir = dir.display()
    );
    let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn docker_tlsverify_over_tcp_works_and_needs_a_client_certificate() {
    let lab = lab("e2etcp", 1, 1);
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path(), "10.77.1.1");
    let path = |name: &str| dir.path().join(name).display().to_string();
    lab.stop("mgr1").unwrap();
    let flags = [
        "--tls-listen",
        "10.77.1.1:2376",
        "--tlscacert",
        &path("ca.pem"),
        "--tlscert",
        &path("server.pem"),
        "--tlskey",
        &path("server.key"),
    ];
    lab.start_with("mgr1", &flags.map(String::from)).unwrap();

    let docker = |args: &[&str]| {
        let argv: Vec<String> =
            ["docker", "-H", "tcp://10.77.1.1:2376"].iter().chain(args).map(|s| s.to_string()).collect();
        lab.command("wrk1", &argv).unwrap().output().unwrap()
    };
    let ok = docker(&[
        "--tlsverify",
        "--tlscacert",
        &path("ca.pem"),
        "--tlscert",
        &path("cert.pem"),
        "--tlskey",
        &path("key.pem"),
        "node",
        "ls",
        "-q",
    ]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(String::from_utf8_lossy(&ok.stdout).lines().count(), 2);

    let anonymous = docker(&["--tls", "--tlscacert", &path("ca.pem"), "node", "ls"]);
    assert!(!anonymous.status.success(), "the TCP API answered a client without a certificate");
}
