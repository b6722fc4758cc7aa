//! What the smolvm test files share beyond `bottle-test-support`: their skip, the real engine wrapped so that its
//! /dev has no kvm node, and argv building. `mod common;` in each test file that needs it.

#![allow(dead_code)]

use std::ffi::OsString;
use std::path::Path;

use bottle_sandbox::engine::Engine;
use bottle_test_support::{engine, require};

pub const COMPONENT: &str = "smolmachines";

/// Skips with a reason, unless `BOTTLE_TEST_REQUIRE` lists smolmachines, in which case the skip is a failure.
pub fn skip(why: &str) {
    require::skip(COMPONENT, why);
}

/// The real engine in a private mount namespace whose /dev has no kvm node. Needs root and util-linux.
pub fn engine_without_kvm(real: &Engine, dir: &Path) -> Engine {
    Engine {
        path: engine::without_kvm(&real.path, dir),
        ..real.clone()
    }
}

pub fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}
