//! `doctor`: the preflight report per backend, each check ok | degraded | missing with its remedy.

use std::fmt::Write;

use bottle_policy::Backend;
use bottle_sandbox::preflight::{self, BackendReport, RealHost, Status};

use crate::cli::DoctorArgs;
use crate::exit::PreflightFailed;
use crate::output::Output;

pub fn run(args: &DoctorArgs, out: &Output) -> anyhow::Result<u8> {
    let host = RealHost;
    let reports = match &args.backend {
        Some(b) => {
            let backend: Backend = b.parse().map_err(anyhow::Error::msg)?;
            vec![preflight::report(backend, &host)]
        }
        None => preflight::report_all(&host),
    };
    out.emit(&reports, || render(&reports))?;
    match (&args.backend, reports.first()) {
        (Some(_), Some(r)) if !r.usable() => Err(PreflightFailed { backend: r.backend }.into()),
        _ => Ok(0),
    }
}

fn render(reports: &[BackendReport]) -> String {
    let mut s = String::new();
    let width = reports
        .iter()
        .flat_map(|r| &r.checks)
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0)
        + 2;
    for r in reports {
        let verdict = if !r.usable() {
            "missing"
        } else if r.checks.iter().any(|c| matches!(c.status, Status::Degraded { .. })) {
            "degraded"
        } else {
            "ok"
        };
        let _ = writeln!(s, "{:<14}{verdict}", r.backend.as_str());
        for c in &r.checks {
            let (mark, word) = match &c.status {
                Status::Ok => ("✓", "ok"),
                Status::Degraded { .. } => ("~", "degraded"),
                Status::Missing { .. } => ("✗", "missing"),
            };
            let _ = write!(s, "  {mark} {:<width$}{word}", c.name);
            if let Some(d) = &c.detail {
                let _ = write!(s, " ({d})");
            }
            let _ = writeln!(s);
            match &c.status {
                Status::Ok => {}
                Status::Degraded { reason } => {
                    let _ = writeln!(s, "      {reason}");
                }
                Status::Missing { reason, remedy } => {
                    let _ = writeln!(s, "      {reason}\n      fix: {remedy}");
                }
            }
        }
        let _ = writeln!(s);
    }
    s
}
