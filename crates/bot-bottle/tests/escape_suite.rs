//! The escape suite (issue #6): every case of shared/escape-cases.md, and cases of our own, attempted from inside real
//! bottles. Each case is a named test (`case_NN_...`, `extra_...`); each family shares one bottle run per backend,
//! set up once, in which `bottle-probe` makes every attempt and prints a verdict. The raw-egress, DNS, credentials
//! and local-IPC/kernel families take their attempts from the escape catalogue (`bottle_probe::catalogue`), which
//! `bot-bottle selftest` runs too.
//!
//! Everything runs inside private network namespaces the suite creates ("labs") whose loopback carries every address
//! an attempt aims at, so an escape lands on a decoy instead of leaving the machine. `self_check` runs the same
//! probes with no bottle at all and requires them to report the escapes they see.
//!
//! Each family runs once per backend in `scenario::BACKENDS` that can run here: today namespace, which needs root;
//! for every other backend each test says why it skips, and `BOTTLE_TEST_REQUIRE` naming the backend's requirement
//! (`namespace`, `container`, `smolmachines-boot`) makes that a failure. A scenario whose setup fails, a probe that
//! cannot run and a verdict that cannot be parsed all fail the test.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

#[path = "escape/backend.rs"]
mod backend;
#[path = "escape/decoys.rs"]
mod decoys;
#[path = "escape/lab.rs"]
mod lab;
#[path = "escape/scenario.rs"]
mod scenario;

#[path = "escape/credentials.rs"]
mod credentials;
#[path = "escape/dns.rs"]
mod dns;
#[path = "escape/lifecycle.rs"]
mod lifecycle;
#[path = "escape/local_ipc_kernel.rs"]
mod local_ipc_kernel;
#[path = "escape/proxy_policy.rs"]
mod proxy_policy;
#[path = "escape/raw_egress.rs"]
mod raw_egress;
#[path = "escape/self_check.rs"]
mod self_check;
