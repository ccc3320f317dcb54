#!/usr/bin/env bash
# Checks formatting and lints first (`cargo fmt --check`, then clippy over
# every crate and target with warnings as errors: the workspace's lints, such
# as undocumented_unsafe_blocks, are enforced here). Then runs every test:
# unit tests of each crate, agent tests on the host, and the
# end-to-end tests that boot real microVMs (they skip only without /dev/kvm,
# and fail instead under CARAPACE_REQUIRE_KVM=1, which .ci/run sets).
# Builds what is missing first (the guest kernel comes from its cache).
source "$(dirname "$0")/lib.sh"

install_packages
cd "$repo"
log "cargo fmt --all --check"
cargo fmt --all --check
log "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
build_all
log "cargo test --workspace"
cd "$repo"
cargo test --workspace -- --test-threads="${CARAPACE_TEST_THREADS:-2}"
