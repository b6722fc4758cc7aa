//! Runs inside a bottle, attempts one named escape, prints one JSON verdict line:
//! `{"case": ..., "escaped": bool, "evidence": ...}`. Exit 0 when the attempt ran (whatever the verdict), 2 when
//! the case is unknown or its arguments are wrong: a probe that cannot run is never a pass.
//! It needs nothing from the bottle but the kernel.

use std::io::Read;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

const CASES: &[(&str, &str)] = &[
    (
        "tcp-connect ADDR:PORT",
        "open a TCP connection directly, bypassing the proxy",
    ),
    ("udp-send ADDR:PORT", "send a UDP datagram and wait for any answer"),
    ("read-file PATH", "read a host file that must not be visible"),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let verdict = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["tcp-connect", addr] => addr.parse().map(tcp_connect),
        ["udp-send", addr] => addr.parse().map(udp_send),
        ["read-file", path] => Ok(read_file(path)),
        ["list"] => {
            for (case, what) in CASES {
                println!("{case:<24} {what}");
            }
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("usage: bottle-probe CASE ARGS… (bottle-probe list)");
            return ExitCode::from(2);
        }
    };
    match verdict {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bottle-probe: bad address: {e}");
            ExitCode::from(2)
        }
    }
}

fn verdict(case: &str, escaped: bool, evidence: String) -> serde_json::Value {
    serde_json::json!({ "case": case, "escaped": escaped, "evidence": evidence })
}

fn tcp_connect(addr: SocketAddr) -> serde_json::Value {
    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(_) => verdict("tcp-connect", true, format!("connected to {addr}")),
        Err(e) => verdict("tcp-connect", false, format!("connect {addr}: {e}")),
    }
}

fn udp_send(addr: SocketAddr) -> serde_json::Value {
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = match UdpSocket::bind(bind) {
        Ok(s) => s,
        Err(e) => return verdict("udp-send", false, format!("socket: {e}")),
    };
    if let Err(e) = sock.send_to(b"bottle-probe", addr) {
        return verdict("udp-send", false, format!("sendto {addr}: {e}"));
    }
    let _ = sock.set_read_timeout(Some(CONNECT_TIMEOUT));
    let mut buf = [0u8; 64];
    match sock.recv_from(&mut buf) {
        Ok((n, from)) => verdict("udp-send", true, format!("{n} bytes back from {from}")),
        Err(e) => verdict("udp-send", false, format!("sent, no answer: {e}")),
    }
}

fn read_file(path: &str) -> serde_json::Value {
    let mut buf = Vec::new();
    match std::fs::File::open(path).and_then(|f| f.take(4096).read_to_end(&mut buf)) {
        Ok(n) => verdict("read-file", true, format!("read {n} bytes of {path}")),
        Err(e) => verdict("read-file", false, format!("{path}: {e}")),
    }
}
