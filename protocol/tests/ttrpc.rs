//! A ttrpc client and a fake agent (this file's Health and Agent services)
//! talking over a Unix socket: the generated services, client helpers and
//! status codes work end to end.

use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use carapace_protocol::{
    agent, client, create_agent, create_health, health, rpc_code, rpc_error, Agent, AgentClient, Health, HealthClient, API_VERSION,
};
use ttrpc::context;

struct FakeHealth;

impl Health for FakeHealth {
    fn check(&self, _ctx: &ttrpc::TtrpcContext, _req: health::CheckRequest) -> ttrpc::Result<health::CheckResponse> {
        let mut resp = health::CheckResponse::new();
        resp.status = health::check_response::ServingStatus::SERVING.into();
        Ok(resp)
    }

    fn version(&self, _ctx: &ttrpc::TtrpcContext, req: health::VersionRequest) -> ttrpc::Result<health::VersionResponse> {
        let mut resp = health::VersionResponse::new();
        resp.agent_version = format!("fake (client said {})", req.client_version);
        resp.api_version = API_VERSION;
        Ok(resp)
    }
}

struct FakeAgent;

impl Agent for FakeAgent {
    fn create_container(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        req: agent::CreateContainerRequest,
    ) -> ttrpc::Result<agent::CreateContainerResponse> {
        if req.container_id.is_empty() {
            return Err(rpc_error(ttrpc::Code::INVALID_ARGUMENT, "empty container id"));
        }
        let mut resp = agent::CreateContainerResponse::new();
        resp.pid = u32::try_from(req.oci_spec_json.len()).unwrap_or(u32::MAX);
        Ok(resp)
    }

    fn wait_process(&self, _ctx: &ttrpc::TtrpcContext, req: agent::WaitProcessRequest) -> ttrpc::Result<agent::WaitProcessResponse> {
        let mut resp = agent::WaitProcessResponse::new();
        resp.exit_code = if req.exec_id.is_empty() { 0 } else { 137 };
        resp.signal = if req.exec_id.is_empty() { 0 } else { 9 };
        Ok(resp)
    }
}

fn ctx() -> context::Context {
    context::with_timeout(10_000_000_000)
}

fn serve(path: &std::path::Path) -> ttrpc::Server {
    let mut server = ttrpc::Server::new()
        .bind(&format!("unix://{}", path.display()))
        .expect("bind")
        .register_service(create_health(Arc::new(FakeHealth)))
        .register_service(create_agent(Arc::new(FakeAgent)));
    server.start().expect("start");
    server
}

#[test]
fn client_and_fake_agent_talk_over_a_unix_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.sock");
    let server = serve(&path);

    let conn = client::connect_unix(&path).expect("connect");
    let health = HealthClient::new(conn.clone());
    let agent = AgentClient::new(conn);

    let status = health.check(ctx(), &health::CheckRequest::new()).expect("check");
    assert_eq!(status.status.enum_value(), Ok(health::check_response::ServingStatus::SERVING));

    let mut vreq = health::VersionRequest::new();
    vreq.client_version = "test".into();
    let version = health.version(ctx(), &vreq).expect("version");
    assert_eq!(version.agent_version, "fake (client said test)");
    assert_eq!(version.api_version, API_VERSION);

    let mut creq = agent::CreateContainerRequest::new();
    creq.container_id = "c1".into();
    creq.oci_spec_json = b"{}".to_vec();
    assert_eq!(agent.create_container(ctx(), &creq).expect("create").pid, 2);

    // A status from the service comes back with its code.
    creq.container_id.clear();
    let err = agent.create_container(ctx(), &creq).expect_err("invalid");
    assert_eq!(rpc_code(&err), Some(ttrpc::Code::INVALID_ARGUMENT));

    // A call the fake does not implement: the generated default answers.
    let err = agent.start_container(ctx(), &agent::StartContainerRequest::new()).expect_err("not implemented by the fake");
    assert!(rpc_code(&err).is_some(), "{err:?}");

    let mut wreq = agent::WaitProcessRequest::new();
    wreq.container_id = "c1".into();
    wreq.exec_id = "e1".into();
    let wait = agent.wait_process(ctx(), &wreq).expect("wait");
    assert_eq!((wait.exit_code, wait.signal), (137, 9));

    // Still serving after errors.
    health.check(ctx(), &health::CheckRequest::new()).expect("check again");
    server.shutdown();
}

/// The full host path as the runtime uses it: a fake VMM socket that
/// answers the hybrid vsock handshake and then splices bytes to the fake
/// agent, as the VMM does to the guest.
#[test]
fn client_reaches_fake_agent_through_hybrid_vsock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent_path = dir.path().join("agent.sock");
    let vmm_path = dir.path().join("vm.sock");
    let server = serve(&agent_path);

    let listener = UnixListener::bind(&vmm_path).expect("bind vmm");
    let agent_path2 = agent_path.clone();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut host, _) = listener.accept().expect("accept");
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while host.read(&mut byte).expect("read") == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        assert_eq!(line, b"CONNECT 1024");
        let guest = std::os::unix::net::UnixStream::connect(&agent_path2).expect("connect agent");
        host.write_all(b"OK 1073741824\n").expect("answer");
        let (mut h2, mut g2) = (host.try_clone().expect("clone"), guest.try_clone().expect("clone"));
        std::thread::spawn(move || std::io::copy(&mut g2, &mut h2));
        let (mut h, mut g) = (host, guest);
        let _ = std::io::copy(&mut h, &mut g);
    });

    let conn = client::wait_for_agent(&vmm_path, Duration::from_secs(10)).expect("agent ready");
    let health = HealthClient::new(conn);
    let version = health.version(ctx(), &health::VersionRequest::new()).expect("version");
    assert_eq!(version.api_version, API_VERSION);
    server.shutdown();
}
