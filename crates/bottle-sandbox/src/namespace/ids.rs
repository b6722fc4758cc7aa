//! Whose ids a bottle runs with (#12). An unprivileged launcher's bottle maps the invoking uid and gid to themselves.
//! A root launcher's bottle never holds host root: its uid and gid 0 are one host id that no user or subordinate
//! range owns, per bottle (its lease address 127.0.0.N read as a number: 2130706432 + N), so a file it could write
//! outside the trees the launcher hands in, a `/proc/sys` knob, or a root-only host file gets the rights of nobody.
//! Trusts the kernel's id mapping (user_namespaces(7)) and the host's account files for "no user owns this id".

use std::io;
use std::net::Ipv4Addr;

/// The host uid and gid of a root launcher's bottle at `addr`.
pub fn host_id(addr: Ipv4Addr) -> u32 {
    0x7f00_0000 | (u32::from(addr) & 0x00ff_ffff)
}

#[derive(Debug, thiserror::Error)]
pub enum HostIdError {
    #[error(
        "host id {id} (the ids of the bottle at {addr}) belongs to {owner} in {file}: a bottle's files and processes \
         would be theirs; free that id, or use another address pool (BOT_BOTTLE_POOL)"
    )]
    Taken {
        id: u32,
        addr: Ipv4Addr,
        owner: String,
        file: &'static str,
    },
    #[error("cannot read {file}")]
    Read { file: &'static str, source: io::Error },
}

/// Refuses an id that a user, group or subordinate id range on this host owns.
pub fn check_free(addr: Ipv4Addr) -> Result<u32, HostIdError> {
    let id = host_id(addr);
    check_all_free(&[addr])?;
    Ok(id)
}

/// `check_free` for every address of `addrs`, each account file read once.
pub fn check_all_free(addrs: &[Ipv4Addr]) -> Result<(), HostIdError> {
    for file in ["/etc/passwd", "/etc/group", "/etc/subuid", "/etc/subgid"] {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(HostIdError::Read { file, source }),
        };
        let ranges = file.ends_with("subuid") || file.ends_with("subgid");
        for &addr in addrs {
            let id = host_id(addr);
            if let Some(owner) = owner_of(&text, ranges, id) {
                return Err(HostIdError::Taken { id, addr, owner, file });
            }
        }
    }
    Ok(())
}

/// The name whose entry in an account file (`name:x:ID:…`) or subordinate-id file (`name:START:COUNT`) covers `id`.
fn owner_of(text: &str, ranges: bool, id: u32) -> Option<String> {
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        let owns = if ranges {
            let start = fields.get(1)?.trim().parse::<u64>().ok()?;
            let count = fields.get(2)?.trim().parse::<u64>().ok()?;
            (start..start.saturating_add(count)).contains(&u64::from(id))
        } else {
            fields.get(2)?.trim().parse::<u32>().ok()? == id
        };
        owns.then(|| fields[0].to_owned())
    })
}

/// The launcher's side: the bottle's uid and gid 0 are host `id` (one id each; `setgroups` stays allowed so that
/// the init can drop the launcher's supplementary groups).
pub fn write_maps(pid: u32, id: u32) -> io::Result<()> {
    for file in ["uid_map", "gid_map"] {
        std::fs::write(format!("/proc/{pid}/{file}"), format!("0 {id} 1\n"))
            .map_err(|e| io::Error::new(e.kind(), format!("/proc/{pid}/{file}: {e}")))?;
    }
    Ok(())
}

/// In the init (or an `exec` that joined the bottle), once the launcher mapped the bottle's ids: take uid and gid 0
/// of the bottle (host `id`) and drop every supplementary group (host root's groups would still count on the host).
pub fn become_bottle_root() -> io::Result<()> {
    use rustix::process::{Gid, Uid};
    rustix::thread::set_thread_groups(&[])?;
    rustix::thread::set_thread_res_gid(Gid::ROOT, Gid::ROOT, Gid::ROOT)?;
    rustix::thread::set_thread_res_uid(Uid::ROOT, Uid::ROOT, Uid::ROOT)?;
    Ok(())
}

/// From inside, before anything is built: no id of this process's user namespace is host uid or gid 0, and (with
/// a mapped launcher) no supplementary group is left. Fails closed on anything it cannot read.
pub fn check_no_host_root(mapped: bool) -> Result<(), String> {
    for file in ["/proc/self/uid_map", "/proc/self/gid_map"] {
        let map = std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))?;
        // SECURITY: no mapping at all is not "no host root": it is a bottle whose ids were never set. Fail closed.
        if map.trim().is_empty() {
            return Err(format!("{file} is empty: the bottle's ids were never mapped"));
        }
        if let Some(line) = covers_host_zero(&map) {
            return Err(format!("{file} maps host id 0 (`{line}`)"));
        }
    }
    if mapped {
        let status = std::fs::read_to_string("/proc/self/status").map_err(|e| format!("/proc/self/status: {e}"))?;
        let groups = status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .unwrap_or("?")
            .trim();
        if !groups.is_empty() {
            return Err(format!("it keeps the launcher's supplementary groups ({groups})"));
        }
    }
    Ok(())
}

/// The line of an id map (`inside outside count`) whose outside range holds 0; an unreadable line counts.
fn covers_host_zero(map: &str) -> Option<&str> {
    map.lines().map(str::trim).filter(|l| !l.is_empty()).find(|line| {
        let f: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        !matches!(f[..], [_, outside, count] if outside > 0 || count == 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bottle_id_is_its_address_and_never_root() {
        assert_eq!(host_id(Ipv4Addr::new(127, 0, 0, 2)), 2_130_706_434);
        assert_eq!(host_id(Ipv4Addr::new(10, 0, 0, 2)), 2_130_706_434);
        assert_ne!(host_id(Ipv4Addr::new(0, 0, 0, 0)), 0);
    }

    #[test]
    fn an_id_an_account_or_range_owns_is_found() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nodd:x:2130706434:1::/:/bin/sh\n";
        assert_eq!(owner_of(passwd, false, 2_130_706_434).as_deref(), Some("odd"));
        assert_eq!(owner_of(passwd, false, 2_130_706_435), None);
        let subuid = "alice:100000:65536\nwide:2130000000:1000000\n";
        assert_eq!(owner_of(subuid, true, 2_130_706_434).as_deref(), Some("wide"));
        assert_eq!(owner_of(subuid, true, 165_536), None);
        assert_eq!(owner_of("junk\n::\n", true, 1), None);
    }

    #[test]
    fn a_map_holding_host_zero_is_caught() {
        assert_eq!(covers_host_zero("0 0 1\n"), Some("0 0 1"));
        assert_eq!(
            covers_host_zero("         0          0 4294967295\n"),
            Some("0          0 4294967295")
        );
        assert_eq!(covers_host_zero("0 2130706434 1\n"), None);
        assert_eq!(covers_host_zero("1000 1000 1\n"), None);
        assert_eq!(covers_host_zero("garbage\n"), Some("garbage"));
        assert_eq!(covers_host_zero(""), None);
    }
}
