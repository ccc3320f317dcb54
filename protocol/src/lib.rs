//! The Carapace agent API, shared by the host runtime (client) and the guest
//! agent (server).
//!
//! The messages and services are generated at build time from
//! `protos/health.proto` and `protos/agent.proto` (rust-protobuf messages and
//! sync ttrpc services, no `protoc` needed):
//!
//! - [`health`] / [`health_ttrpc`]: `carapace.health.v1.Health` (`Check`,
//!   `Version`), answered as soon as the agent listens.
//! - [`agent`] / [`agent_ttrpc`]: `carapace.agent.v1.Agent`, the sandbox,
//!   container and process calls.
//!
//! [`client`] holds the host-side helpers that open a connection (a Unix
//! socket, or the VMM's hybrid vsock socket) and make a ttrpc client of it.

include!(concat!(env!("OUT_DIR"), "/generated.rs"));

pub mod client;

pub use agent_ttrpc::{create_agent, Agent, AgentClient};
pub use health_ttrpc::{create_health, Health, HealthClient};

/// The vsock port the agent listens on in the guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The ttrpc address the agent binds in the guest: any CID, port
/// [`AGENT_VSOCK_PORT`].
pub const AGENT_VSOCK_ADDRESS: &str = "vsock://-1:1024";

/// The vsock CID of the host, to which the agent connects for stdio streams.
pub const VSOCK_HOST_CID: u32 = 2;

/// The version of this API, answered by `Health.Version`. Raised when a
/// peer needs to know that calls or fields were added; fields are only ever
/// added, so a higher version still understands a lower one.
pub const API_VERSION: u32 = 1;

/// A ttrpc error carrying `code` and `message`, as a service returns it.
pub fn rpc_error(code: ttrpc::Code, message: impl Into<String>) -> ttrpc::Error {
    let message: String = message.into();
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

/// The status code of an error a ttrpc call returned, if the peer answered
/// with a status (rather than the transport failing).
pub fn rpc_code(error: &ttrpc::Error) -> Option<ttrpc::Code> {
    match error {
        ttrpc::Error::RpcStatus(status) => Some(status.code()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message;

    fn round_trip<M: Message + PartialEq + std::fmt::Debug>(msg: &M) {
        let bytes = msg.write_to_bytes().expect("encode");
        let back = M::parse_from_bytes(&bytes).expect("decode");
        assert_eq!(&back, msg);
    }

    #[test]
    fn health_messages_round_trip() {
        let mut resp = health::CheckResponse::new();
        resp.status = health::check_response::ServingStatus::SERVING.into();
        round_trip(&resp);

        let mut version = health::VersionResponse::new();
        version.agent_version = "0.1.0".into();
        version.api_version = API_VERSION;
        round_trip(&version);
    }

    #[test]
    fn agent_messages_round_trip() {
        let mut sandbox = agent::CreateSandboxRequest::new();
        sandbox.sandbox_id = "sb".into();
        sandbox.hostname = "pod".into();
        sandbox.resolv_conf = b"nameserver 10.0.0.1\n".to_vec();
        sandbox.hosts = b"127.0.0.1 localhost\n".to_vec();
        let mut fs = agent::SharedFs::new();
        fs.tag = "carapace".into();
        fs.mount_point = "/run/carapace/shared".into();
        fs.options = vec!["ro".into(), "nodev".into()];
        sandbox.shared_fs.push(fs);
        let settings = sandbox.settings.mut_or_insert_default();
        settings.sysctls.insert("net.ipv4.ip_forward".into(), "1".into());
        settings.wall_clock_unix_nano = 1_700_000_000_000_000_000;
        settings.shared_pid_namespace = true;
        sandbox.entropy = vec![7; 64];
        sandbox.host_time_unix_ns = 1_700_000_000_123_456_789;
        let mut iface = agent::Interface::new();
        iface.mac = "02:00:00:00:00:02".into();
        iface.device_mac = "02:00:00:00:00:01".into();
        sandbox.interfaces.push(iface);
        round_trip(&sandbox);

        let mut create = agent::CreateContainerRequest::new();
        create.container_id = "c1".into();
        create.oci_spec_json = br#"{"ociVersion":"1.2.0"}"#.to_vec();
        create.rootfs_path = "/run/carapace/shared/c1/rootfs".into();
        let stdio = create.stdio.mut_or_insert_default();
        stdio.stdin_port = 0;
        stdio.stdout_port = 5001;
        stdio.stderr_port = 5002;
        create.join_namespaces.insert("ipc".into(), "pause".into());
        create.join_namespaces.insert("pid".into(), "pause".into());
        round_trip(&create);

        let mut wait = agent::WaitProcessResponse::new();
        wait.exit_code = 137;
        wait.signal = 9;
        wait.oom_killed = true;
        wait.exited_at_unix_nano = 42;
        wait.pid = 7;
        round_trip(&wait);

        let mut stats = agent::StatsContainerResponse::new();
        let cgroup = stats.cgroup.mut_or_insert_default();
        cgroup.cpu.mut_or_insert_default().usage_usec = 1234;
        let memory = cgroup.memory.mut_or_insert_default();
        memory.limit = u64::MAX;
        memory.stat.insert("anon".into(), 4096);
        let mut dev = agent::IoDeviceStats::new();
        dev.major = 254;
        dev.rbytes = 1 << 40;
        cgroup.io.mut_or_insert_default().devices.push(dev);
        round_trip(&stats);
    }

    #[test]
    fn unknown_fields_from_a_newer_peer_are_skipped() {
        let mut wait = agent::WaitProcessRequest::new();
        wait.container_id = "c1".into();
        let mut bytes = wait.write_to_bytes().expect("encode");
        // Field 1000, varint 5, and field 1001, a length-delimited "xyz":
        // what a later version might add.
        bytes.extend_from_slice(&[0xc0, 0x3e, 0x05, 0xca, 0x3e, 0x03, b'x', b'y', b'z']);
        let back = agent::WaitProcessRequest::parse_from_bytes(&bytes).expect("decode");
        assert_eq!(back.container_id, "c1");
        assert!(back.exec_id.is_empty());
    }

    #[test]
    fn default_messages_encode_to_nothing() {
        let bytes = agent::ShutdownRequest::new().write_to_bytes().expect("encode");
        assert!(bytes.is_empty());
    }

    #[test]
    fn rpc_error_carries_its_code() {
        let err = rpc_error(ttrpc::Code::UNIMPLEMENTED, "later");
        assert_eq!(rpc_code(&err), Some(ttrpc::Code::UNIMPLEMENTED));
        assert_eq!(rpc_code(&ttrpc::Error::Others("x".into())), None);
    }

    #[test]
    fn vsock_address_matches_port() {
        assert_eq!(AGENT_VSOCK_ADDRESS, format!("vsock://-1:{AGENT_VSOCK_PORT}"));
    }
}
