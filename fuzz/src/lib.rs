//! Harnesses behind the fuzz targets, callable two ways:
//!
//! - as libFuzzer targets (`fuzz_targets/*.rs`, `cargo fuzz run <name>`,
//!   feature `libfuzzer`);
//! - from `tests/random_inputs.rs`, a bounded random-input loop that runs
//!   under plain `cargo test` (no sanitizer, no coverage feedback) where
//!   cargo-fuzz cannot be used.
//!
//! Every harness must return normally for any input: a panic (or an abort,
//! a hang, an out-of-memory) is a finding.

use protobuf::Message;

pub use carapace_vmm::fuzzing::{fuse_request, virtio_queue, vsock_packets};

use carapace_protocol::{agent, health};

/// Decodes `bytes` as `M`; if that works, the message must survive an
/// encode/decode round trip unchanged (what the agent and the runtime do
/// with every message they pass on).
fn decode<M: Message + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    let Ok(msg) = M::parse_from_bytes(bytes) else { return };
    let again = msg.write_to_bytes().expect("a decoded message encodes");
    let back = M::parse_from_bytes(&again).expect("an encoded message decodes");
    assert_eq!(back, msg, "round trip changed the message");
}

/// The agent protocol decoder: the first byte picks a message of the agent
/// and health APIs (requests, which the agent decodes, and responses,
/// which the host runtime decodes from a guest it does not trust); the
/// rest is its protobuf encoding.
pub fn agent_protocol(data: &[u8]) {
    let Some((&which, bytes)) = data.split_first() else { return };
    macro_rules! pick {
        ($($m:ty),* $(,)?) => {{
            let table: &[fn(&[u8])] = &[$(decode::<$m>),*];
            table[usize::from(which) % table.len()](bytes)
        }};
    }
    pick!(
        agent::CreateSandboxRequest,
        agent::CreateSandboxResponse,
        agent::DestroySandboxRequest,
        agent::CreateContainerRequest,
        agent::CreateContainerResponse,
        agent::StartContainerRequest,
        agent::ExecProcessRequest,
        agent::ExecProcessResponse,
        agent::SignalProcessRequest,
        agent::WaitProcessRequest,
        agent::WaitProcessResponse,
        agent::ResizeTtyRequest,
        agent::CloseStdinRequest,
        agent::StatsContainerRequest,
        agent::StatsContainerResponse,
        agent::ListProcessesRequest,
        agent::ListProcessesResponse,
        agent::UpdateContainerRequest,
        agent::PauseContainerRequest,
        agent::ResumeContainerRequest,
        agent::RemoveContainerRequest,
        agent::ShutdownRequest,
        health::CheckRequest,
        health::CheckResponse,
        health::VersionRequest,
        health::VersionResponse,
    );
}
