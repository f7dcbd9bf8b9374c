//! Helper processes: this binary started again with a hidden role (the demo's second
//! process, the bench's remote ponger), ready when it prints a line, gone when its stdin closes.

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

use super::measure::BenchResult;

/// How long a helper may take to connect and set itself up.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// The line a helper prints once it is set up.
pub const READY: &str = "switchyard-helper ready";

/// A running helper; killed when dropped, so an early return cannot leak it.
pub struct Helper {
    child: Child,
    what: &'static str,
}

impl Helper {
    /// Starts `switchyard <args>` and waits for its ready line (not a sleep).
    pub async fn start<I, S>(what: &'static str, args: I) -> BenchResult<Helper>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find this program to start the {what}: {e}"))?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start the {what}: {e}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| format!("the {what} has no stdout pipe"))?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if line == READY {
                    return Ok(true);
                }
            }
            Ok::<bool, std::io::Error>(false)
        })
        .await;
        match ready {
            Ok(Ok(true)) => Ok(Helper { child, what }),
            Ok(Ok(false)) => Err(format!("the {what} exited before it was ready").into()),
            Ok(Err(e)) => Err(format!("cannot read the {what}'s output: {e}").into()),
            Err(_) => Err(format!("the {what} was not ready within {READY_TIMEOUT:?}").into()),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> String {
        self.child
            .id()
            .map_or_else(|| "?".to_string(), |p| p.to_string())
    }

    /// Closes its stdin, which tells it to leave, and waits for it; kills it if it lingers.
    pub async fn stop(&mut self) {
        drop(self.child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(helper = self.what, "did not leave when asked; killing it");
            let _ = self.child.kill().await;
        }
    }
}

/// In a helper: blocks until the parent closes our stdin (or dies, which closes it too).
pub async fn until_parent_leaves() {
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
}
