//! The escape catalogue: every attempt the escape suite makes inside a bottle, as data. A case names its step id
//! (the escape suite's test asserts on it), its attempt (a `bottle-probe` case and its arguments, or a shell command
//! the probe runs), what must happen, and which fixtures it needs beyond a bottle with the probe in its workspace.
//!
//! Arguments are templates: `{{name}}` is filled from the runner's values (a decoy's port, a planted secret),
//! `{{hex:name}}` with the value hex-encoded for the probe's `hex:` needles, so that a secret never appears on a
//! command line literally. A template whose value the runner does not have is an error, never an empty string.
//!
//! Trusts nothing at run time: it is constants and a substitution. The escape suite runs every case; `selftest`
//! runs every case whose fixtures a user's host has, and reports the others with `Needs::reason`.

mod credentials;
mod dns;
mod local_ipc_kernel;
mod proxy_policy;
mod raw_egress;

use std::collections::BTreeMap;
use std::fmt;

/// One attempt and its expectation.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// The step id, unique across the catalogue: `cNN-...` for escape-cases.md item NN, `x-...` for our own,
    /// `ctl-...` for controls.
    pub id: &'static str,
    pub attempt: Attempt,
    pub expect: Expect,
    pub needs: &'static [Needs],
    /// It takes long (see `slow`).
    pub slow: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum Attempt {
    /// `bottle-probe ARGS...` (templates).
    Probe(&'static [&'static str]),
    /// `bottle-probe command sh -c CMD` (a template): escaped means the command exited 0.
    Shell(&'static str),
}

/// What must happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The attempt fails (the probe reports it held).
    Held,
    /// The proxy refuses it: held, with a 403 carrying `x-bottle-denied`.
    Refused,
    /// A control: the allowed path works (the probe reports it got through), so the held cases mean something.
    Control,
    /// Either outcome inside is acceptable (a private tmpfs may take a write, the proxy may forward a request with
    /// its `Host` rewritten); what decides is what the runner finds outside afterwards (the host's files, what an
    /// upstream received).
    JudgedOutside,
}

/// What a case needs beyond a bottle with the probe in its workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// A tool from the host's `/usr` inside the bottle (the shell attempts drive it).
    Tool(&'static str),
    /// A DNS server that answers test names with private addresses: the escape suite's lab.
    LabDns,
    /// A second bottle running beside the first.
    OtherBottle,
    /// HTTPS and plain-HTTP upstreams under test names, trusted through a CA the test mints.
    TestUpstreams,
    /// The escape suite's policy for the case's family: a deny list, per-path rules, wildcard and passthrough test
    /// hosts.
    TestPolicy,
    /// Decoy secrets planted in a fake `$HOME`.
    DecoyHome,
    /// A network namespace it may wreck: the attempt would change the network configuration (routes, addresses,
    /// links, firewall) of wherever it escaped to.
    DisposableNetwork,
}

impl Needs {
    /// Whether only the escape suite has this fixture (a user's host never does).
    pub fn test_only(self) -> bool {
        !matches!(self, Self::Tool(_))
    }

    /// Why a case with this need does not run outside the escape suite.
    pub fn reason(self) -> String {
        match self {
            Self::Tool(t) => format!("needs `{t}`, which is not installed on this host"),
            Self::LabDns => "needs a DNS server that answers test names with private addresses (the escape suite's \
                             private lab network)"
                .into(),
            Self::OtherBottle => "needs a second bottle running beside the first (the escape suite)".into(),
            Self::TestUpstreams => "needs test upstreams trusted through a CA the test mints (the escape suite)".into(),
            Self::TestPolicy => "needs the escape suite's test policy (deny list, per-path rules, wildcard and \
                                 passthrough hosts)"
                .into(),
            Self::DecoyHome => "needs decoy secrets planted in a fake $HOME (the self-test does not write into \
                                yours)"
                .into(),
            Self::DisposableNetwork => "would change the host's routes, addresses or firewall if it escaped: it runs \
                                        only inside the escape suite's private lab network"
                .into(),
        }
    }
}

impl Case {
    const fn new(id: &'static str, attempt: Attempt) -> Self {
        Self {
            id,
            attempt,
            expect: Expect::Held,
            needs: &[],
            slow: false,
        }
    }

    pub const fn refused(mut self) -> Self {
        self.expect = Expect::Refused;
        self
    }

    pub const fn control(mut self) -> Self {
        self.expect = Expect::Control;
        self
    }

    pub const fn judged_outside(mut self) -> Self {
        self.expect = Expect::JudgedOutside;
        self
    }

    /// It takes long: a runner may start it first and let it run alongside the others.
    pub const fn slow(mut self) -> Self {
        self.slow = true;
        self
    }

    pub const fn needs(mut self, needs: &'static [Needs]) -> Self {
        self.needs = needs;
        self
    }

    /// The probe's argument list, templates filled.
    pub fn argv(&self, values: &Values) -> Result<Vec<String>, Unfilled> {
        match self.attempt {
            Attempt::Probe(args) => args.iter().map(|a| values.fill(a)).collect(),
            Attempt::Shell(cmd) => Ok(vec!["command".into(), "sh".into(), "-c".into(), values.fill(cmd)?]),
        }
    }

    /// Every `{{name}}` its templates use (without `hex:`).
    pub fn placeholders(&self) -> Vec<&'static str> {
        let templates: &[&'static str] = match &self.attempt {
            Attempt::Probe(args) => args,
            Attempt::Shell(cmd) => std::slice::from_ref(cmd),
        };
        let mut names = Vec::new();
        for t in templates {
            let mut rest: &'static str = t;
            while let Some(start) = rest.find("{{") {
                let Some(len) = rest[start + 2..].find("}}") else { break };
                let name = &rest[start + 2..start + 2 + len];
                names.push(name.strip_prefix("hex:").unwrap_or(name));
                rest = &rest[start + 2 + len + 2..];
            }
        }
        names
    }

    /// The tools its shell attempt drives.
    pub fn tools(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.needs.iter().filter_map(|n| match n {
            Needs::Tool(t) => Some(*t),
            _ => None,
        })
    }

    /// The first fixture only the escape suite has, if any.
    pub fn test_only(&self) -> Option<Needs> {
        self.needs.iter().copied().find(|n| n.test_only())
    }
}

const fn probe(id: &'static str, args: &'static [&'static str]) -> Case {
    Case::new(id, Attempt::Probe(args))
}

const fn shell(id: &'static str, cmd: &'static str) -> Case {
    Case::new(id, Attempt::Shell(cmd))
}

/// A family of cases: one file of the escape suite, one shared bottle run.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub cases: &'static [Case],
}

impl Family {
    /// The case `id` of this family.
    pub fn case(&self, id: &str) -> Option<&'static Case> {
        self.cases.iter().find(|c| c.id == id)
    }

    /// Every tool its cases drive, once each.
    pub fn tools(&self) -> Vec<&'static str> {
        let mut tools: Vec<&'static str> = self.cases.iter().flat_map(Case::tools).collect();
        tools.sort_unstable();
        tools.dedup();
        tools
    }
}

pub const RAW_EGRESS: Family = Family {
    name: "raw-egress",
    cases: raw_egress::CASES,
};
pub const DNS: Family = Family {
    name: "dns",
    cases: dns::CASES,
};
pub const PROXY_POLICY: Family = Family {
    name: "proxy-policy",
    cases: proxy_policy::CASES,
};
pub const CREDENTIALS: Family = Family {
    name: "credentials",
    cases: credentials::CASES,
};
pub const LOCAL_IPC_KERNEL: Family = Family {
    name: "local-ipc-kernel",
    cases: local_ipc_kernel::CASES,
};

/// Every family in the catalogue. (The escape suite's lifecycle family is about launches, each case its own bottles
/// and host-side checks, so it has no shared attempts to catalogue.)
pub const FAMILIES: [&Family; 5] = [&RAW_EGRESS, &DNS, &PROXY_POLICY, &CREDENTIALS, &LOCAL_IPC_KERNEL];

/// Every case with its family.
pub fn all() -> impl Iterator<Item = (&'static Family, &'static Case)> {
    FAMILIES.into_iter().flat_map(|f| f.cases.iter().map(move |c| (f, c)))
}

/// The values a runner fills templates with.
#[derive(Debug, Default, Clone)]
pub struct Values(BTreeMap<String, String>);

/// A template named a value the runner does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfilled {
    pub name: String,
}

impl fmt::Display for Unfilled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no value for {{{{{}}}}}", self.name)
    }
}

impl std::error::Error for Unfilled {}

impl Values {
    pub fn set(&mut self, name: &str, value: impl ToString) -> &mut Self {
        self.0.insert(name.to_string(), value.to_string());
        self
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// `template` with every `{{name}}` and `{{hex:name}}` replaced.
    pub fn fill(&self, template: &str) -> Result<String, Unfilled> {
        let mut out = String::with_capacity(template.len());
        let mut rest = template;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(len) = after.find("}}") else {
                out.push_str(&rest[start..]);
                return Ok(out);
            };
            let name = &after[..len];
            let (encode, key) = match name.strip_prefix("hex:") {
                Some(key) => (true, key),
                None => (false, name),
            };
            let value = self.get(key).ok_or_else(|| Unfilled { name: key.to_string() })?;
            if encode {
                out.push_str(&hex(value));
            } else {
                out.push_str(value);
            }
            rest = &after[len + 2..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// `hex:` and the bytes of `s` in hex: the probe's needle encoding.
pub fn hex(s: &str) -> String {
    let mut out = String::from("hex:");
    for b in s.bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_ids_are_unique_across_the_catalogue() {
        let mut ids: Vec<&str> = all().map(|(_, c)| c.id).collect();
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n, "duplicate step ids");
    }

    #[test]
    fn every_id_says_what_it_is() {
        for (f, c) in all() {
            assert!(
                ["c", "x-", "ctl-", "syscall-"].iter().any(|p| c.id.starts_with(p)),
                "{}: {}",
                f.name,
                c.id
            );
        }
    }

    #[test]
    fn templates_fill_plain_and_hex_values_and_refuse_missing_ones() {
        let mut v = Values::default();
        v.set("port", 80).set("secret", "ab");
        assert_eq!(v.fill("127.0.0.1:{{port}}").unwrap(), "127.0.0.1:80");
        assert_eq!(v.fill("x {{hex:secret}} y").unwrap(), "x hex:6162 y");
        assert_eq!(v.fill("${{port}} { a; }").unwrap(), "$80 { a; }");
        assert_eq!(v.fill("{{nope}}").unwrap_err().name, "nope");
    }

    #[test]
    fn placeholders_are_listed_without_their_encoding() {
        let c = probe("x-t", &["read-file", "{{a}}/{{hex:b}}", "{{a}}"]);
        assert_eq!(c.placeholders(), ["a", "b", "a"]);
    }

    #[test]
    fn a_case_runs_outside_the_suite_only_without_test_only_fixtures() {
        let c = shell("x-t", "true").needs(&[Needs::Tool("curl"), Needs::LabDns]);
        assert_eq!(c.test_only(), Some(Needs::LabDns));
        assert_eq!(c.tools().collect::<Vec<_>>(), ["curl"]);
        assert_eq!(shell("x-u", "true").needs(&[Needs::Tool("ip")]).test_only(), None);
    }

    #[test]
    fn shell_attempts_run_through_the_probe_command_case() {
        let argv = shell("x-t", "echo {{v}}").argv(Values::default().set("v", 1)).unwrap();
        assert_eq!(argv, ["command", "sh", "-c", "echo 1"]);
    }
}
