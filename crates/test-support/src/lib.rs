//! Test support for the workspace's tests, and only for them (a `[dev-dependencies]` entry, never a dependency):
//! the one `BOTTLE_TEST_REQUIRE` rule, a CA minted in the test, recorded local upstreams, children waited on with a
//! timeout, and engine fixtures. It trusts nothing it is given and panics on any failure: a test's setup failing is
//! the test failing.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

pub mod bottles;
pub mod ca;
pub mod child;
pub mod container;
pub mod engine;
pub mod probe;
pub mod require;
pub mod tui;
pub mod upstream;
