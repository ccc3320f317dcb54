//! The relay at its seam: the agent's side is played by Unix-socket clients
//! of the ports, as the VMM connects them; the host ends are socket pairs,
//! FIFOs and files.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use super::*;

/// A host end backed by one side of a socket pair; the test holds the other.
fn socket_end() -> (HostEnd, UnixStream) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    (HostEnd::File(File::from(OwnedFd::from(ours))), theirs)
}

fn connect(uds: &Path, port: u32) -> UnixStream {
    UnixStream::connect(port_path(uds, port)).expect("connect")
}

/// The port sockets left beside `uds`.
fn sockets_left(uds: &Path) -> Vec<String> {
    let dir = uds.parent().expect("parent");
    let prefix = format!("{}_", uds.file_name().expect("name").to_string_lossy());
    std::fs::read_dir(dir)
        .expect("ls")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
}

#[test]
fn pipes_relay_output_in_order_and_input_to_eof() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("vsock.sock");
    let (stdin, mut user_in) = socket_end();
    let (stdout, mut user_out) = socket_end();
    let (stderr, mut user_err) = socket_end();
    let host = HostStdio { stdin: Some(stdin), stdout: Some(stdout), stderr: Some(stderr), drain_closed_output: false };
    let ports = StdioPorts::bind(&uds, host).expect("bind");
    let s = ports.streams();
    assert!(s.stdin_port != 0 && s.stdout_port != 0 && s.stderr_port != 0);
    assert!(s.stdin_port != s.stdout_port && s.stdout_port != s.stderr_port && s.stdin_port != s.stderr_port);
    let mut relay = ports.start();

    let mut g_in = connect(&uds, s.stdin_port);
    let mut g_out = connect(&uds, s.stdout_port);
    let mut g_err = connect(&uds, s.stderr_port);
    user_in.write_all(b"typed").expect("type");
    user_in.shutdown(Shutdown::Write).expect("end of input");
    let mut typed = Vec::new();
    g_in.read_to_end(&mut typed).expect("the process sees EOF");
    assert_eq!(typed, b"typed");

    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        user_out.read_to_end(&mut got).expect("read stdout");
        got
    });
    let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    g_out.write_all(&data).expect("stdout");
    g_err.write_all(b"oops\n").expect("stderr");
    drop((g_out, g_err));
    assert!(relay.finish_output(Duration::from_secs(10)), "outputs did not end");
    assert_eq!(reader.join().expect("reader"), data, "stdout arrives whole and in order, then EOF");
    let mut err = Vec::new();
    user_err.read_to_end(&mut err).expect("stderr");
    assert_eq!(err, b"oops\n");
    assert!(sockets_left(&uds).is_empty(), "{:?}", sockets_left(&uds));
}

#[test]
fn streams_without_a_host_end_are_not_connected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("vsock.sock");
    let (stdout, _user) = socket_end();
    let ports = StdioPorts::bind(&uds, HostStdio { stdout: Some(stdout), ..Default::default() }).expect("bind");
    let s = ports.streams();
    assert_eq!((s.stdin_port, s.stderr_port), (0, 0));
    assert_ne!(s.stdout_port, 0);
    assert_eq!(sockets_left(&uds), vec![format!("vsock.sock_{}", s.stdout_port)]);
    drop(ports);
    assert!(sockets_left(&uds).is_empty(), "unused ports are unbound");
}

#[test]
fn fifos_and_files_relay_both_ways() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("vsock.sock");
    let (stdin, stdout) = (dir.path().join("in"), dir.path().join("out"));
    mkfifo(&stdin);
    mkfifo(&stdout);
    let err_file = dir.path().join("err.log");
    let host = HostStdio {
        stdin: Some(HostEnd::Fifo(stdin.clone())),
        stdout: Some(HostEnd::Fifo(stdout.clone())),
        stderr: Some(HostEnd::Append(err_file.clone())),
        drain_closed_output: true,
    };
    let ports = StdioPorts::bind(&uds, host).expect("bind");
    let s = ports.streams();
    let mut relay = ports.start();

    // containerd's side: a reader on stdout, a writer on stdin.
    let reader = std::thread::spawn(move || std::fs::read(stdout).expect("read stdout"));
    let writer = std::thread::spawn(move || {
        let mut f = OpenOptions::new().write(true).open(stdin).expect("open stdin");
        f.write_all(b"typed").expect("write stdin");
    });
    let mut g_in = connect(&uds, s.stdin_port);
    let mut g_out = connect(&uds, s.stdout_port);
    let mut g_err = connect(&uds, s.stderr_port);
    let mut typed = Vec::new();
    g_in.read_to_end(&mut typed).expect("stdin EOF");
    assert_eq!(typed, b"typed");
    writer.join().expect("writer");
    let data: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();
    g_out.write_all(&data).expect("stdout");
    g_err.write_all(b"oops\n").expect("stderr");
    drop((g_out, g_err));
    assert!(relay.finish_output(Duration::from_secs(10)));
    assert_eq!(reader.join().expect("reader"), data);
    assert_eq!(std::fs::read(&err_file).expect("err"), b"oops\n");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&err_file).expect("stat").permissions().mode() & 0o777, 0o600);
    assert!(sockets_left(&uds).is_empty(), "{:?}", sockets_left(&uds));
}

/// Writes to the agent's end of an output until a write fails or `total`
/// bytes went; returns how many went.
fn write_until_error(stream: &mut UnixStream, total: usize) -> usize {
    let chunk = [7u8; 64 * 1024];
    let mut sent = 0;
    while sent < total {
        match stream.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    sent
}

#[test]
fn a_closed_output_is_drained_or_dropped_as_asked() {
    const TOTAL: usize = 64 << 20;
    for drain in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let uds = dir.path().join("vsock.sock");
        let (stdout, user) = socket_end();
        let ports =
            StdioPorts::bind(&uds, HostStdio { stdout: Some(stdout), drain_closed_output: drain, ..Default::default() }).expect("bind");
        let port = ports.streams().stdout_port;
        let mut relay = ports.start();
        drop(user);
        let mut g_out = connect(&uds, port);
        g_out.set_write_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let sent = write_until_error(&mut g_out, TOTAL);
        if drain {
            assert_eq!(sent, TOTAL, "a drained output takes everything the process writes");
        } else {
            assert!(sent < TOTAL, "a dropped output fails the process's writes (sent {sent})");
        }
        drop(g_out);
        assert!(relay.finish_output(Duration::from_secs(10)));
    }
}

#[test]
fn close_stdin_without_a_writer_and_cancel_without_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("vsock.sock");
    let stdin = dir.path().join("in");
    mkfifo(&stdin);
    let ports = StdioPorts::bind(&uds, HostStdio { stdin: Some(HostEnd::Fifo(stdin)), ..Default::default() }).expect("bind");
    let port = ports.streams().stdin_port;
    let mut relay = ports.start();
    let mut g_in = connect(&uds, port);
    // Nobody ever opens the FIFO for writing; CloseIO must still end it.
    relay.close_stdin(Duration::from_millis(100));
    let mut rest = Vec::new();
    g_in.read_to_end(&mut rest).expect("EOF");
    assert!(rest.is_empty());

    let never = HostEnd::Fifo(dir.path().join("never"));
    let mut relay = StdioPorts::bind(&uds, HostStdio { stdout: Some(never), ..Default::default() }).expect("bind").start();
    relay.cancel();
    assert!(relay.finish_output(Duration::from_secs(10)), "the output thread did not end");
    assert!(sockets_left(&uds).is_empty(), "{:?}", sockets_left(&uds));
}

#[test]
fn ports_in_use_are_skipped_and_running_out_names_the_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("vsock.sock");
    let taken = bind_first(&uds, [FIRST_PORT]).expect("bind");
    let next = bind_first(&uds, [FIRST_PORT, FIRST_PORT + 1]).expect("bind");
    assert_eq!((taken.port, next.port), (FIRST_PORT, FIRST_PORT + 1));
    let e = bind_first(&uds, [FIRST_PORT, FIRST_PORT + 1]).expect_err("all taken");
    assert!(matches!(e, RelayError::NoPort(ref p) if *p == uds), "{e}");
    assert!(e.to_string().contains("vsock.sock"), "{e}");
    let e = bind_first(&dir.path().join("missing/vsock.sock"), [FIRST_PORT]).expect_err("no directory");
    assert!(e.to_string().contains("missing/vsock.sock_10000"), "{e}");
}

#[test]
fn one_process_walks_the_range_without_reusing_ports() {
    let ports: Vec<u32> = candidates().take(3).chain(candidates().take(3)).collect();
    for p in &ports {
        assert!((FIRST_PORT..FIRST_PORT + PORT_SPAN).contains(p), "{p}");
    }
    let mut unique = ports.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ports.len(), "{ports:?}");
}
