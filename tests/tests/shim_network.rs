//! Issue 6, networking end to end: a pod whose network namespace was set up
//! the way a CNI bridge plugin does it (a host bridge, a veth pair, the
//! pod's end named eth0 with an address and a default route) runs under
//! `containerd-shim-carapace-v2`; the VM takes over eth0 through a tap and
//! a TC redirect, and the pod answers on its address. One VM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use carapace_tests::containerd::{assert_clean, ctr_run, task_status, vmms, Containerd, IMAGE};
use carapace_tests::netns::{PodNetns, HOST_IP, POD_IP};
use carapace_tests::{kvm_available, Assets, BOOT_DEADLINE};

const RUNTIME: &str = "io.containerd.carapace.v2";
/// GET / from `addr`, retried until `deadline` (the VM is still booting).
fn http_get(addr: &str, deadline: Instant) -> Result<String, String> {
    let mut last = String::new();
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&addr.parse().expect("addr"), Duration::from_secs(5)) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                let req = format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n");
                let mut body = String::new();
                match s.write_all(req.as_bytes()).and_then(|()| s.read_to_string(&mut body)) {
                    Ok(_) if body.contains("200") => return Ok(body),
                    Ok(_) => last = format!("answer: {body:?}"),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Err(last)
}

#[test]
fn a_pod_in_a_cni_style_netns_answers_on_its_address() {
    if !kvm_available("a_pod_in_a_cni_style_netns_answers_on_its_address") {
        return;
    }
    let (tmp, c) = Containerd::with_busybox(&Assets::get());
    let netns = PodNetns::create("pod");
    let with_ns = format!("network:{}", netns.path());

    // The pod serves a page with busybox httpd on its CNI address.
    let script = "mkdir -p /www && echo served-from-the-pod > /www/index.html && httpd -p 8080 -h /www && exec sleep 100000";
    let (code, out, err) = ctr_run(
        &c,
        tmp.path(),
        "run-d",
        &["run", "-d", "--runtime", RUNTIME, "--snapshotter", "native", "--with-ns", &with_ns, IMAGE, "web", "sh", "-c", script],
    );
    assert_eq!(code, Some(0), "ctr run -d: {out}{err}\n{}", c.log_tail());
    assert_eq!(task_status(&c, "web"), "RUNNING");

    // The host reaches it through the bridge, the veth, TC and the tap.
    let page = http_get(&format!("{POD_IP}:8080"), Instant::now() + BOOT_DEADLINE)
        .unwrap_or_else(|e| panic!("the pod did not answer on {POD_IP}:8080: {e}\n{}", c.log_tail()));
    assert!(page.contains("served-from-the-pod"), "{page}");
    eprintln!("GET http://{POD_IP}:8080/ answered: {:?}", page.lines().last().unwrap_or_default());

    // Inside, eth0 has the pod's address, MAC and the default route.
    let (code, out, err) =
        ctr_run(&c, tmp.path(), "ip", &["task", "exec", "--exec-id", "ip", "web", "sh", "-c", "ip addr show eth0; ip route"]);
    assert_eq!(code, Some(0), "exec ip: {out}{err}");
    assert!(out.contains(&format!("inet {POD_IP}/24")), "{out}");
    assert!(out.contains(&format!("default via {HOST_IP}")), "{out}");

    // And the pod reaches the host: a connection out to a listener on the bridge.
    let listener = TcpListener::bind(format!("{HOST_IP}:0")).expect("listen on the bridge");
    let port = listener.local_addr().expect("addr").port();
    let answer = std::thread::spawn(move || {
        let (s, peer) = listener.accept().expect("accept");
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("read");
        (peer.ip().to_string(), line)
    });
    let (code, out, err) = ctr_run(
        &c,
        tmp.path(),
        "nc",
        &["task", "exec", "--exec-id", "nc", "web", "sh", "-c", &format!("echo hello-host | nc {HOST_IP} {port}")],
    );
    assert_eq!(code, Some(0), "exec nc: {out}{err}");
    let (peer, line) = answer.join().expect("listener");
    assert_eq!((peer.as_str(), line.trim()), (POD_IP, "hello-host"));

    // Kill and delete: the VM, the tap and the redirect are gone.
    c.ctr_ok(&["task", "kill", "-s", "KILL", "web"]);
    let deadline = Instant::now() + BOOT_DEADLINE;
    while task_status(&c, "web") != "STOPPED" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    c.ctr_ok(&["task", "delete", "web"]);
    c.ctr_ok(&["container", "delete", "web"]);
    assert_clean(&c, tmp.path());
    assert!(vmms(&c).is_empty());
    let links = netns.links();
    assert!(!links.contains("cptap"), "tap left in the pod's netns:\n{links}");
    let filters = netns.eth0_filters();
    assert!(!filters.contains("mirred"), "redirect left on eth0:\n{filters}");
}
