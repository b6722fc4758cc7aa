//! #12: a busy bottle ran its proxy out of descriptors at the default soft limit (1,024): `accept` failed. The proxy
//! raises its own soft limit to the hard limit when it starts. (Its own test binary: it changes process limits.)
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod fixture;

use fixture::*;
use rustix::process::{Resource, getrlimit, setrlimit};

#[tokio::test]
async fn the_proxy_raises_its_open_file_limit_to_the_hard_limit() {
    let mut limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum;
    assert!(
        hard.is_none_or(|h| h > 256),
        "the hard limit is too low to test: {hard:?}"
    );
    limit.current = Some(256);
    setrlimit(Resource::Nofile, limit).unwrap();
    let _w = World::start().await;
    assert_eq!(
        getrlimit(Resource::Nofile).current,
        hard,
        "the soft limit was not raised"
    );
}
