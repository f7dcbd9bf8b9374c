//! A certificate authority made for one test, and a server certificate for 127.0.0.1
//! signed by it (with the `openssl` program), for tests that run TLS servers of their own.
#![allow(dead_code)] // each test file uses part of it

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A temporary directory with `ca.crt`, `server.crt` and `server.key`; removed on drop.
pub struct TestCa {
    /// Where the files are.
    pub dir: PathBuf,
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `program` runs here.
pub fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn run(dir: &Path, program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl TestCa {
    /// Makes the CA and the server certificate, once every program in `needs` (`openssl`
    /// and whatever the test runs) is installed. Without one the test is skipped (`None`,
    /// with the reason printed), except under `CI=true`, where that is a failure.
    pub fn make(tag: &str, needs: &[&str]) -> Option<TestCa> {
        for p in needs.iter().chain(&["openssl"]) {
            if !installed(p) {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI needs `{p}` installed: the TLS test runs a server of its own"
                );
                eprintln!("skipped: `{p}` is not installed (the TLS test needs it)");
                return None;
            }
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("sy-{tag}-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let ca = TestCa { dir };
        std::fs::write(
            ca.dir.join("server.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("writes the extensions file");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let make_ca = [
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=switchyard-test-ca",
            ],
        ]
        .concat();
        let csr = [
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat();
        let sign = [
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ];
        assert!(
            run(&ca.dir, "openssl", &make_ca)
                && run(&ca.dir, "openssl", &csr)
                && run(&ca.dir, "openssl", &sign),
            "openssl made the test certificates in {}",
            ca.dir.display()
        );
        Some(ca)
    }

    /// The CA's certificate (PEM), for the client to trust.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
}
