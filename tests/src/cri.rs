//! A small CRI client for the end-to-end tests (Debian has no `crictl`):
//! the CRI's gRPC API (the `k8s-cri` crate's generated client, tonic over
//! containerd's Unix socket) driven from blocking code, and `exec -it`
//! through the CRI stream server's WebSocket protocol (`v4.channel.k8s.io`),
//! as `kubectl exec -it` reaches the kubelet's.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

/// The CRI's RuntimeService and ImageService on one connection.
#[derive(Debug)]
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    channel: Channel,
}

impl CriClient {
    /// Connects to containerd's CRI at `socket`.
    pub fn connect(socket: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                // The URI is required and ignored: the connector dials the socket.
                tonic::transport::Endpoint::try_from("http://[::]:0")
                    .expect("endpoint")
                    .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                        let path: PathBuf = path.clone();
                        async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
                    }))
                    .await
            })
            .unwrap_or_else(|e| panic!("connecting to the CRI at {}: {e}", socket.display()));
        Self { rt, channel }
    }

    /// The RuntimeService (clients are cheap clones of the channel).
    pub fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    /// The ImageService.
    pub fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
    }

    /// Runs one call to completion: its answer, or the gRPC status.
    pub fn call<T>(&self, f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>) -> Result<T, tonic::Status> {
        self.rt.block_on(f).map(tonic::Response::into_inner)
    }

    /// Whether the image service knows `image` (the CRI resolves pods' and
    /// containers' images against it, and pulls nothing here).
    pub fn has_image(&self, image: &str) -> bool {
        let req = cri::ImageStatusRequest { image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }), verbose: false };
        self.call(self.images().image_status(req)).is_ok_and(|r| r.image.is_some())
    }

    /// ExecSync: (exit code, stdout, stderr), or the CRI's error.
    pub fn exec_sync(&self, container_id: &str, cmd: &[&str], timeout: Duration) -> Result<(i32, String, String), tonic::Status> {
        let req = cri::ExecSyncRequest {
            container_id: container_id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        };
        self.call(self.runtime().exec_sync(req))
            .map(|r| (r.exit_code, String::from_utf8_lossy(&r.stdout).into_owned(), String::from_utf8_lossy(&r.stderr).into_owned()))
    }
}

/// What an interactive exec gave back: the terminal's output and the
/// stream server's final status (a JSON `Status`: `"Success"`, or
/// `"Failure"` with the exit code in `details.causes`).
#[derive(Debug, Default)]
pub struct TtyExec {
    pub output: String,
    pub status: String,
}

impl TtyExec {
    /// The exit code the status reports (0 for success).
    pub fn exit_code(&self) -> Option<i32> {
        let v: serde_json::Value = serde_json::from_str(&self.status).ok()?;
        if v["status"] == "Success" {
            return Some(0);
        }
        let causes = v["details"]["causes"].as_array()?;
        causes.iter().find(|c| c["reason"] == "ExitCode").and_then(|c| c["message"].as_str()).and_then(|m| m.parse().ok())
    }
}

/// `kubectl exec -it`: connects to the stream server URL the CRI's Exec
/// answered (in the network namespace of process `netns_pid`, where the
/// server listens), types `input` on the terminal and reads until the
/// server closes the stream, at most `timeout`.
pub fn exec_tty(netns_pid: u32, url: &str, input: &str, timeout: Duration) -> Result<TtyExec, String> {
    use tungstenite::client::IntoClientRequest;
    use tungstenite::Message;
    let url = url.to_string();
    let input = input.to_string();
    // A thread of its own: it enters the server's network namespace.
    let worker = std::thread::spawn(move || -> Result<TtyExec, String> {
        let ns = std::fs::File::open(format!("/proc/{netns_pid}/ns/net")).map_err(|e| format!("netns of {netns_pid}: {e}"))?;
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}"))?;
        let rest = url.strip_prefix("http://").ok_or_else(|| format!("not an http URL: {url}"))?;
        let host = rest.split('/').next().unwrap_or_default();
        let stream = TcpStream::connect(host).map_err(|e| format!("connect {host}: {e}"))?;
        stream.set_read_timeout(Some(Duration::from_millis(500))).map_err(|e| e.to_string())?;
        let mut req = format!("ws://{rest}").into_client_request().map_err(|e| e.to_string())?;
        req.headers_mut().insert("Sec-WebSocket-Protocol", "v4.channel.k8s.io".parse().map_err(|_| "header")?);
        let (mut ws, _) = tungstenite::client(req, stream).map_err(|e| format!("WebSocket handshake with {url}: {e}"))?;
        // Channel 0 is stdin, 1 stdout, 3 the final status.
        let mut msg = vec![0u8];
        msg.extend_from_slice(input.as_bytes());
        ws.send(Message::Binary(msg.into())).map_err(|e| format!("send: {e}"))?;
        let mut out = TtyExec::default();
        let end = Instant::now() + timeout;
        loop {
            if Instant::now() > end {
                return Err(format!("no end of the stream within {timeout:?}; so far: {out:?}"));
            }
            match ws.read() {
                Ok(Message::Binary(b)) if !b.is_empty() => {
                    let text = String::from_utf8_lossy(&b[1..]).into_owned();
                    match b[0] {
                        1 | 2 => out.output.push_str(&text),
                        3 => out.status.push_str(&text),
                        _ => {}
                    }
                }
                Ok(Message::Close(_)) => break,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => break,
                Err(e) => return Err(format!("read: {e}; so far: {out:?}")),
            }
        }
        Ok(out)
    });
    worker.join().map_err(|_| "the exec thread panicked".to_string())?
}
