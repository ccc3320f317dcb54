//! The fuzz targets under plain `cargo test`: each harness runs on random
//! inputs for a bounded time (`CARAPACE_FUZZ_SECONDS`, default 5 per
//! target), without coverage feedback. Inputs are random bytes, or mutations
//! (bit flips, splices, truncations) of earlier inputs and of the seeds in
//! `corpus/<target>/` when present. The seed is printed, and a failing input
//! is written to `artifacts/<target>/` so that `cargo fuzz run <target>
//! <file>` (or this loop with `CARAPACE_FUZZ_SEED`) replays it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| std::fs::read(e.ok()?.path()).ok()).collect())
        .unwrap_or_default()
}

fn mutate(rng: &mut Rng, pool: &[Vec<u8>], max_len: usize) -> Vec<u8> {
    if pool.is_empty() || rng.below(4) == 0 {
        let n = rng.below(max_len);
        return (0..n).map(|_| rng.next() as u8).collect();
    }
    let mut v = pool[rng.below(pool.len())].clone();
    for _ in 0..1 + rng.below(8) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = [0, 0xff, 0x7f, 0x80, 1][rng.below(5)];
            }
            2 => v.truncate(rng.below(v.len() + 1)),
            3 => {
                let other = &pool[rng.below(pool.len())];
                let at = rng.below(v.len() + 1);
                let from = rng.below(other.len() + 1);
                v.splice(at..at, other[from..].iter().copied().take(256));
            }
            4 => {
                let at = rng.below(v.len() + 1);
                let n = rng.below(64);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(at..at, bytes);
            }
            _ => {}
        }
        v.truncate(max_len);
    }
    v
}

fn run(target: &str, max_len: usize, f: fn(&[u8])) {
    let secs: u64 = std::env::var("CARAPACE_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let seed: u64 = std::env::var("CARAPACE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Instant::now().elapsed().as_nanos() as u64 ^ u64::from(std::process::id()) << 32 | 1);
    eprintln!("{target}: seed {seed}, {secs} s");
    let mut rng = Rng(seed);
    let mut pool = seeds(target);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut runs = 0u64;
    while Instant::now() < end {
        let input = mutate(&mut rng, &pool, max_len);
        if catch_unwind(AssertUnwindSafe(|| f(&input))).is_err() {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("artifacts").join(target);
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("crash-seed{seed}-run{runs}"));
            let _ = std::fs::write(&path, &input);
            panic!("{target}: input {runs} (seed {seed}) panicked; saved to {}", path.display());
        }
        runs += 1;
        if pool.len() < 256 {
            pool.push(input);
        } else {
            let i = rng.below(pool.len());
            pool[i] = input;
        }
    }
    eprintln!("{target}: {runs} inputs, no failure");
}

#[test]
fn agent_protocol() {
    run("agent_protocol", 4096, carapace_fuzz::agent_protocol);
}

#[test]
fn virtio_queue() {
    run("virtio_queue", 16384, carapace_fuzz::virtio_queue);
}

#[test]
fn vsock_packets() {
    run("vsock_packets", 16384, carapace_fuzz::vsock_packets);
}

#[test]
fn fuse_request() {
    run("fuse_request", 4096, carapace_fuzz::fuse_request);
}
