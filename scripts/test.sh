#!/usr/bin/env bash
# Runs every test: unit tests of each crate, agent tests on the host, and the
# end-to-end tests that boot real microVMs (they skip only without /dev/kvm,
# and fail instead under CARAPACE_REQUIRE_KVM=1, which .ci/run sets).
# Builds what is missing first (the guest kernel comes from its cache).
source "$(dirname "$0")/lib.sh"

install_packages
build_all
log "cargo test --workspace"
cd "$repo"
cargo test --workspace -- --test-threads="${CARAPACE_TEST_THREADS:-2}"
