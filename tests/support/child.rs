//! The test binary re-executed as a child process, for tests that need real OS processes.
//!
//! The parent starts `current_exe --exact <test>` with environment variables that tell
//! that test (which does nothing without them) what to be; the child reports progress as
//! lines on stdout, which the parent awaits with [`Child::expect`], and reads commands
//! from stdin ([`Child::tell`], [`stdin_lines`]). A child is killed when its handle drops.
#![allow(dead_code)] // each test file uses part of it

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::sync::mpsc;

/// How long the parent waits for a line it expects.
pub const WAIT: Duration = Duration::from_secs(60);

/// A running child process and its output, line by line.
pub struct Child {
    name: String,
    proc: std::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
    stdin: Option<std::process::ChildStdin>,
}

impl Child {
    /// Runs test `test` of this binary in a child process with `env` set.
    pub fn spawn<K, V>(test: &str, env: &[(K, V)]) -> Child
    where
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let exe = std::env::current_exe().expect("the test binary path");
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut name = test.to_string();
        for (k, v) in env {
            cmd.env(k, v);
            name.push_str(&format!(
                " {}={}",
                k.as_ref().to_string_lossy(),
                v.as_ref().to_string_lossy()
            ));
        }
        let mut proc = cmd.spawn().expect("the child process starts");
        let stdout = proc.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = proc.stdin.take();
        Child {
            name,
            proc,
            lines,
            stdin,
        }
    }

    /// Waits for a line containing `prefix`; returns what follows it.
    pub async fn expect(&mut self, prefix: &str) -> String {
        let name = self.name.clone();
        tokio::time::timeout(WAIT, async {
            loop {
                match self.lines.recv().await {
                    Some(l) if l.contains(prefix) => {
                        let at = l.find(prefix).unwrap_or(0) + prefix.len();
                        return l[at..].trim().to_string();
                    }
                    Some(_) => continue,
                    None => panic!("child {name} exited before printing {prefix}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("child {} did not print {prefix} in time", self.name))
    }

    /// Writes a line to the child's stdin.
    pub fn tell(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{line}").expect("the child reads its stdin");
        stdin.flush().expect("flush");
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// Kills the child (SIGKILL, which also ends a stopped one) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Child side: prints a line for the parent.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Child side: lines from stdin, read on a thread.
pub fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
