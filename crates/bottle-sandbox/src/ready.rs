//! Readiness: poll a condition with exponential backoff until a deadline, and say which step timed out.
//! Never sleep-and-hope.

use std::time::{Duration, Instant};

pub const FIRST_DELAY: Duration = Duration::from_millis(2);
pub const MAX_DELAY: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum WaitError<E: std::error::Error + 'static> {
    #[error("timed out after {waited:?} waiting for {step}")]
    Timeout { step: &'static str, waited: Duration },
    #[error("{step} failed")]
    Failed {
        step: &'static str,
        #[source]
        source: E,
    },
}

/// Calls `probe` until it returns `Ok(Some(_))`, an error, or `timeout` passes; the pause doubles from
/// `FIRST_DELAY` up to `MAX_DELAY`.
pub fn poll<T, E: std::error::Error + 'static>(
    step: &'static str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>, E>,
) -> Result<T, WaitError<E>> {
    let start = Instant::now();
    let mut delay = FIRST_DELAY;
    loop {
        match probe() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(source) => return Err(WaitError::Failed { step, source }),
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(WaitError::Timeout { step, waited });
        }
        std::thread::sleep(delay.min(timeout - waited));
        delay = (delay * 2).min(MAX_DELAY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_ready() {
        let mut n = 0;
        let v = poll("count", Duration::from_secs(5), || -> Result<_, std::io::Error> {
            n += 1;
            Ok((n == 4).then_some(n))
        })
        .unwrap();
        assert_eq!(v, 4);
    }

    #[test]
    fn times_out_loudly_naming_the_step() {
        let err = poll(
            "the proxy listener",
            Duration::from_millis(30),
            || -> Result<Option<()>, std::io::Error> { Ok(None) },
        )
        .unwrap_err();
        assert!(err.to_string().contains("waiting for the proxy listener"), "{err}");
    }

    #[test]
    fn errors_stop_the_wait() {
        let err = poll("x", Duration::from_secs(5), || -> Result<Option<()>, std::io::Error> {
            Err(std::io::Error::other("boom"))
        })
        .unwrap_err();
        assert!(matches!(err, WaitError::Failed { step: "x", .. }));
    }
}
