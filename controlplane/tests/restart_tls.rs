//! Restart on the same database, TLS with `certs init` output, health and reflection,
//! and the admin socket's permissions.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use wirefence_control::certs;
use wirefence_control::server::TlsIdentity;
use wirefence_proto::v1::agent_service_client::AgentServiceClient;
use wirefence_proto::v1::{GetPolicyRequest, ListNodesRequest};

#[tokio::test]
async fn a_restarted_control_plane_keeps_nodes_policy_and_versions() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let laptop = cp.enroll("laptop", 1, &[]).await;
    let db1 = cp.enroll("db1", 2, &[]).await;
    let v_policy = cp.apply(POLICY).await.unwrap();
    let key = cp.bound_key("web1", &["web"]).await;
    let before = cp.admin.list_nodes(ListNodesRequest::default()).await.unwrap().into_inner().nodes;
    let mut stream = watch(&cp, &laptop.credential, 0).await.unwrap();
    let v_before = next(&mut stream).await.unwrap().version;
    assert_eq!(v_before, v_policy);
    let Cp { handle, admin, .. } = cp;
    drop(admin);
    handle.shutdown().await.unwrap();
    // The open stream ends with Unavailable when the control plane stops.
    assert_eq!(next(&mut stream).await.unwrap_err().code(), tonic::Code::Unavailable);

    let mut cp = start(dir.path()).await;
    let after = cp.admin.list_nodes(ListNodesRequest::default()).await.unwrap().into_inner().nodes;
    let ids = |v: &[wirefence_proto::v1::Node]| {
        v.iter().map(|n| (n.node_id.clone(), n.hostname.clone(), n.addresses.clone())).collect::<Vec<_>>()
    };
    assert_eq!(ids(&after), ids(&before));
    let p = cp.admin.get_policy(GetPolicyRequest {}).await.unwrap().into_inner();
    assert_eq!((p.version, p.source.as_str(), p.file_name.as_str()), (v_policy, POLICY, "policy.toml"));

    // Credentials still work; resuming at the version applied before sends nothing, and a
    // fresh watch gets the same view at the same version.
    let mut s = watch(&cp, &db1.credential, v_before).await.unwrap();
    silent(&mut s, 200).await;
    let mut s2 = watch(&cp, &laptop.credential, 0).await.unwrap();
    let u = next(&mut s2).await.unwrap();
    assert_eq!(u.version, v_before);
    assert_eq!(peer_names(snapshot(&u)), ["db1"]);

    // Versions keep increasing; the single-use key is still unused, then used.
    let v_next = cp.apply(POLICY_PG).await.unwrap();
    assert!(v_next > v_before);
    let mut agent = cp.agent().await;
    let web = agent.register(cp.enroll_req("web1", 3, &key).await).await.unwrap().into_inner();
    assert_eq!(web.addresses[0].addr, vec![10, 77, 0, 3]);
    assert_code(
        agent.register(cp.enroll_req("web9", 9, &key).await).await,
        tonic::Code::PermissionDenied,
        "no uses left",
    );
    // The "pg" rule had no source until web1 (tag web) joined: db1 now peers with it.
    let u = next(&mut s).await.unwrap();
    assert!(u.version > v_next);
    assert_eq!(delta(&u).base_version, v_before);
    assert_eq!(delta(&u).upsert_peers[0].name, "web1");
}

#[tokio::test]
async fn tls_with_certs_init_output_health_and_reflection() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let sans = ["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let files = certs::init(&pki, &sans).unwrap();
    for key in [&files.server_key, &files.ca_key] {
        assert_eq!(std::fs::metadata(key).unwrap().permissions().mode() & 0o777, 0o600);
    }
    assert!(matches!(certs::init(&pki, &sans), Err(wirefence_control::Error::Exists(_))));
    let pem = std::fs::read(&files.server_cert).unwrap();
    let (_, der) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = der.parse_x509().unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap().value.general_names.len();
    assert_eq!(san, 3);

    let tls = TlsIdentity::from_files(&files.server_cert, &files.server_key).unwrap();
    let mut cp = start_with(dir.path(), |c| {
        c.tls = Some(tls);
        c.listen = vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
    })
    .await;
    let ca = Certificate::from_pem(std::fs::read(&files.ca_cert).unwrap());
    let key = cp.key(false, 0, &[]).await;
    for (i, addr) in cp.handle.agent_addrs.clone().into_iter().enumerate() {
        let host = if addr.is_ipv4() { "127.0.0.1".to_string() } else { "[::1]".to_string() };
        let channel = Endpoint::from_shared(format!("https://{host}:{}", addr.port()))
            .unwrap()
            .tls_config(ClientTlsConfig::new().ca_certificate(ca.clone()).domain_name("localhost"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut agent = AgentServiceClient::new(channel.clone());
        let n = u8::try_from(i + 1).unwrap();
        let req = prove(&mut agent, register_req(&format!("tls{n}"), n, &key), &[n; 32]).await;
        let r = agent.register(req).await.unwrap().into_inner();
        assert_eq!(r.addresses.len(), 2);
        check_health(channel).await;
    }

    // Plaintext to the TLS port fails; so does TLS without the CA.
    let plain = AgentServiceClient::connect(format!("http://{}", cp.addr())).await;
    let refused = match plain {
        Err(_) => true,
        Ok(mut c) => c.register(register_req("x", 9, &key)).await.is_err(),
    };
    assert!(refused);
    let untrusted = Endpoint::from_shared(format!("https://127.0.0.1:{}", cp.addr().port()))
        .unwrap()
        .tls_config(ClientTlsConfig::new().domain_name("localhost"))
        .unwrap()
        .connect()
        .await;
    assert!(untrusted.is_err());
}

#[tokio::test]
async fn reflection_answers_v1alpha_for_older_clients() {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;

    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path()).await;
    let channel = Endpoint::from_shared(format!("http://{}", cp.addr())).unwrap().connect().await.unwrap();
    let mut refl = ServerReflectionClient::new(channel);
    let ask = |m: MessageRequest| ServerReflectionRequest { host: String::new(), message_request: Some(m) };
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol("wirefence.v1.AgentService".into())),
    ];
    let mut replies = refl.server_reflection_info(tokio_stream::iter(requests)).await.unwrap().into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else { panic!("{reply:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"wirefence.v1.AgentService".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.reflection.v1alpha.ServerReflection".to_string()), "{names:?}");
    assert!(!names.contains(&"wirefence.v1.AdminService".to_string()), "admin is never on the agent listener");
    let reply = replies.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = reply.message_response else { panic!("{reply:?}") };
    assert!(!files.file_descriptor_proto.is_empty());
}

async fn check_health(channel: Channel) {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};
    let mut health = HealthClient::new(channel);
    let r = health.check(HealthCheckRequest { service: "wirefence.v1.AgentService".into() }).await.unwrap();
    assert_eq!(r.into_inner().status, ServingStatus::Serving as i32);
}

#[tokio::test]
async fn reflection_lists_the_agent_service_and_the_admin_socket_is_private() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path()).await;
    let mode = std::fs::metadata(&cp.handle.admin_socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(std::fs::metadata(dir.path().join("control.db")).unwrap().permissions().mode() & 0o777, 0o600);

    let channel = Endpoint::from_shared(format!("http://{}", cp.addr())).unwrap().connect().await.unwrap();
    check_health(channel.clone()).await;
    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = refl.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else { panic!("{reply:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"wirefence.v1.AgentService".to_string()), "{names:?}");
    assert!(!names.contains(&"wirefence.v1.AdminService".to_string()), "admin is never on the agent listener");

    // A second control plane cannot take over a live admin socket.
    let second = wirefence_control::server::serve(wirefence_control::server::ServeConfig::new(
        dir.path().join("other.db"),
        &cp.handle.admin_socket,
    ))
    .await;
    assert!(matches!(second, Err(wirefence_control::Error::AdminSocketInUse(_))));
}

#[tokio::test]
async fn the_admin_socket_is_refused_in_a_directory_others_can_write() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [0o777, 0o1777, 0o770] {
        let shared = dir.path().join(format!("shared-{mode:o}"));
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(mode)).unwrap();
        let cfg = wirefence_control::server::ServeConfig::new(dir.path().join("c.db"), shared.join("admin.sock"));
        let err = wirefence_control::server::serve(cfg).await.err().expect("refused");
        assert!(matches!(err, wirefence_control::Error::AdminSocketDir { .. }), "{err}");
        assert!(err.to_string().contains("writable by group or others"), "{err}");
        assert!(std::fs::read_dir(&shared).unwrap().next().is_none(), "no socket was created");
    }
}
