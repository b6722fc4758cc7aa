//! The lab: a private network namespace, made by the test, in which a family's launcher, proxy, decoys and bottles
//! all live. Its `lo` carries the "internet" (8.8.8.8, 192.0.2.1, 10.0.0.1, 169.254.169.254, 2001:db8::1, fd00::1,
//! the host's own resolvers, ...), so an attempt that gets out of a bottle lands on a decoy that counts it, and
//! nothing the suite does, even with a broken bottle or proxy, can leave the machine.
//!
//! Needs root (a netns, and `setns` into it for the decoys' threads). Trusts `unshare`, `nsenter` and `ip` from
//! util-linux and iproute2.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Command, Stdio};

/// Addresses every lab puts on its `lo`, besides 127.0.0.0/8 and ::1: public resolvers and web hosts, TEST-NET,
/// RFC 1918, link-local metadata, IPv6 documentation and unique-local space.
pub const INTERNET: [&str; 14] = [
    "8.8.8.8",
    "8.8.4.4",
    "1.1.1.1",
    "9.9.9.9",
    "192.0.2.1",
    "192.0.2.10",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.0.1",
    "169.254.169.254",
    "2001:db8::1",
    "2001:4860:4860::8888",
    "fd00::1",
    "fd00::53",
];

pub struct Lab {
    ns: File,
    /// `/proc/<test pid>/fd/<n>`: the namespace, for `nsenter --net=`.
    path: String,
}

/// The nameservers of the host's /etc/resolv.conf: the lab owns them too, so the proxy's own lookups land on a decoy.
pub fn host_resolvers() -> Vec<IpAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse().ok())
        .collect()
}

impl Lab {
    /// A lab with `lo` up and every `INTERNET` address and host resolver on it.
    pub fn new() -> Lab {
        let mut addrs: Vec<String> = INTERNET.iter().map(|s| s.to_string()).collect();
        addrs.extend(
            host_resolvers()
                .iter()
                .filter(|ip| !ip.is_loopback())
                .map(|ip| ip.to_string()),
        );
        let mut script = String::from("set -e; ip link set lo up;");
        for a in &addrs {
            let spec = if a.contains(':') {
                "128 dev lo nodad"
            } else {
                "32 dev lo"
            };
            script.push_str(&format!(" ip addr add {a}/{spec};"));
        }
        Self::make(&script)
    }

    /// A lab whose loopback holds 127.0.0.1 alone (a /32, not the usual /8): no bottle address 127.0.0.N can be
    /// bound in it (escape case 46).
    pub fn without_bottle_addresses() -> Lab {
        Self::make("set -e; ip link set lo up; ip addr del 127.0.0.1/8 dev lo; ip addr add 127.0.0.1/32 dev lo")
    }

    fn make(setup: &str) -> Lab {
        let script = format!("{setup}\necho ready\nexec cat");
        let mut child = Command::new("unshare")
            .args(["--net", "--", "sh", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run unshare --net");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != "ready" {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the lab network did not come up: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let ns = File::open(format!("/proc/{}/ns/net", child.id())).expect("cannot open the lab's netns");
        drop(child.stdin.take());
        child.wait().unwrap();
        let path = format!("/proc/{}/fd/{}", std::process::id(), ns.as_raw_fd());
        Lab { ns, path }
    }

    /// Runs `f` on a thread inside the lab: every socket it creates belongs to the lab for good.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                rustix::thread::move_into_link_name_space(
                    self.ns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .expect("cannot enter the lab's network namespace");
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// `program` run inside the lab.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path)).arg("--").arg(program);
        c
    }
}
