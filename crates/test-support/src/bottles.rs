//! Driving the real `bot-bottle` binary in tests: whether this host runs namespace bottles (asked of `doctor`, as a
//! user would), and a command's outcome as text for an assertion message.

use std::process::{Command, Output};

/// Why namespace bottles cannot run here (the `doctor` report), or `None` when they can. `bin` is the
/// `bot-bottle` binary under test.
pub fn namespace_unavailable(bin: &str) -> Option<String> {
    let out = Command::new(bin)
        .args(["doctor", "--backend", "namespace"])
        .output()
        .unwrap();
    (!out.status.success()).then(|| {
        format!(
            "namespace backend unavailable here:\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `bin` as the launcher, or as `uid` (through `setpriv`, with that uid's group and no supplementary groups): the
/// root and unprivileged launchers the bottle tests run.
pub fn launcher(bin: &str, as_user: Option<u32>) -> Command {
    match as_user {
        None => Command::new(bin),
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--",
                bin,
            ]);
            c
        }
    }
}

/// A command's status, stdout and stderr, for an assertion message.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
