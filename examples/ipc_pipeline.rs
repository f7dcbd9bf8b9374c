//! The original guide's second scenario: a three-process pipeline.
//!
//! Run: `cargo run --example ipc_pipeline [-- INPUT_DIR OUTPUT_DIR]`
//!
//! One command starts a bus daemon (in this process) and three processes
//! (this program again, one role each), all in peer-to-peer mode: events go
//! straight from process to process; the daemon only tells where machines live.
//! - the **ingester** reads every file of the input folder and sends each to a `Processor`;
//! - the **processor** transforms it (upper-cases it, adds a header) and sends it to a `Storage`;
//! - the **storage** writes it to the output folder and acknowledges back to the ingester.
//!
//! Without arguments, a temp input folder with three sample files is created.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard::ipc::{Daemon, DaemonConfig, IpcBus, IpcConfig, unique_socket_path};
use switchyard::{Envelope, Node, Session};

type AnyResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct FileRead {
    name: String,
    content: String,
    ingester: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stored {
    name: String,
    bytes: u64,
}

#[tokio::main]
async fn main() -> AnyResult<()> {
    let role = std::env::var("SWITCHYARD_EXAMPLE_ROLE").unwrap_or_default();
    if role.is_empty() {
        return launcher().await;
    }
    let socket = PathBuf::from(std::env::var("SWITCHYARD_SOCKET")?);
    let bus = IpcBus::connect(
        IpcConfig::new(&socket)
            .peer_to_peer()
            .client_id(role.clone()),
    )?;
    let session = switchyard::builder().ipc(&bus).build()?;
    match role.as_str() {
        "ingester" => ingester(&session, PathBuf::from(std::env::var("INPUT")?)).await,
        "processor" => processor(&session).await,
        "storage" => storage(&session, PathBuf::from(std::env::var("OUTPUT")?)).await,
        other => Err(format!("unknown role {other}").into()),
    }
}

async fn until_stdin_closes() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    })
    .await;
}

async fn ingester(session: &Session, input: PathBuf) -> AnyResult<()> {
    let (tx, mut acks) = tokio::sync::mpsc::unbounded_channel::<Stored>();
    let me = session
        .machine("ingester", "Ingester")
        .handler(move |_: &Node, ev: Envelope| {
            if ev.name() == "STORED"
                && let Ok(s) = ev.data::<Stored>()
            {
                let _ = tx.send(s);
            }
        })
        .build()
        .await?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&input)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for path in &files {
        let content = std::fs::read_to_string(path)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let to = me
            .send_to_any_of_type(
                "Processor",
                "FILE_READ",
                FileRead {
                    name: name.clone(),
                    content,
                    ingester: me.id().to_string(),
                },
            )
            .await?;
        println!("ingester: read {name}, sent to {to}");
    }
    for _ in 0..files.len() {
        let s = tokio::time::timeout(Duration::from_secs(10), acks.recv())
            .await?
            .ok_or("the ingester stopped")?;
        println!(
            "ingester: storage acknowledged {} ({} bytes)",
            s.name, s.bytes
        );
    }
    println!("ALL {} STORED", files.len());
    Ok(())
}

async fn processor(session: &Session) -> AnyResult<()> {
    let _p = session
        .machine("processor", "Processor")
        .handler_async(|node: Node, ev: Envelope| async move {
            let Ok(file) = ev.data::<FileRead>() else {
                return;
            };
            let lines = file.content.lines().count();
            let out = FileRead {
                content: format!(
                    "# processed by pid {} ({lines} lines)\n{}",
                    std::process::id(),
                    file.content.to_uppercase()
                ),
                ..file
            };
            let name = out.name.clone();
            match node.send_to_any_of_type("Storage", "STORE", out).await {
                Ok(to) => println!("processor: transformed {name}, sent to {to}"),
                Err(e) => eprintln!("processor: cannot forward {name}: {e}"),
            }
        })
        .build()
        .await?;
    println!("READY");
    until_stdin_closes().await;
    Ok(())
}

async fn storage(session: &Session, output: PathBuf) -> AnyResult<()> {
    let _s = session
        .machine("storage", "Storage")
        .handler(move |node: &Node, ev: Envelope| {
            let Ok(file) = ev.data::<FileRead>() else {
                return;
            };
            let path = output.join(&file.name);
            match std::fs::write(&path, &file.content) {
                Ok(()) => {
                    let ack = Stored {
                        name: file.name.clone(),
                        bytes: file.content.len() as u64,
                    };
                    if let Err(e) = node.post(file.ingester.as_str(), "STORED", ack) {
                        eprintln!("storage: cannot acknowledge {}: {e}", file.name);
                    }
                }
                Err(e) => eprintln!("storage: cannot write {}: {e}", path.display()),
            }
        })
        .build()
        .await?;
    println!("READY");
    until_stdin_closes().await;
    Ok(())
}

struct Role {
    child: Child,
    lines: std::io::Lines<BufReader<Box<dyn std::io::Read + Send>>>,
}

fn empty_stdout() -> Box<dyn std::io::Read + Send> {
    Box::new(std::io::empty())
}

impl Drop for Role {
    fn drop(&mut self) {
        // Closing stdin asks the role to stop; it then removes its own socket.
        drop(self.child.stdin.take());
        for _ in 0..200 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(role: &str, socket: &Path, env: &[(&str, &Path)]) -> AnyResult<Role> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env("SWITCHYARD_EXAMPLE_ROLE", role)
        .env("SWITCHYARD_SOCKET", socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn()?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let out: Box<dyn std::io::Read + Send> = Box::new(out);
    Ok(Role {
        child,
        lines: BufReader::new(out).lines(),
    })
}

impl Role {
    /// Echoes the role's lines until one equals `until` (or the role exits).
    fn relay(&mut self, until: &str) -> AnyResult<()> {
        for line in self.lines.by_ref() {
            let line = line?;
            println!("  {line}");
            if line.starts_with(until) {
                return Ok(());
            }
        }
        Err(format!("the process exited before printing {until}").into())
    }

    /// Keeps echoing the role's output on a thread, so a chatty role never blocks on a full pipe.
    fn relay_rest(&mut self) {
        let lines = std::mem::replace(&mut self.lines, BufReader::new(empty_stdout()).lines());
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                println!("  {line}");
            }
        });
    }
}

async fn launcher() -> AnyResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tmp = std::env::temp_dir().join(format!("switchyard-pipeline-{}", std::process::id()));
    let input = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.join("in"));
    let output = args
        .get(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.join("out"));
    if args.is_empty() {
        std::fs::create_dir_all(&input)?;
        for (name, text) in [
            ("a.txt", "first file\nhello"),
            ("b.txt", "second file"),
            ("c.txt", "third\nfile\nhere"),
        ] {
            std::fs::write(input.join(name), text)?;
        }
    }
    std::fs::create_dir_all(&output)?;
    let socket = unique_socket_path(&std::env::temp_dir(), "pipeline");
    let _daemon = Daemon::start(DaemonConfig::new(&socket))?;
    println!("bus daemon on {}", socket.display());
    let mut storage = start("storage", &socket, &[("OUTPUT", &output)])?;
    storage.relay("READY")?;
    storage.relay_rest();
    let mut processor = start("processor", &socket, &[])?;
    processor.relay("READY")?;
    processor.relay_rest();
    let mut ingester = start("ingester", &socket, &[("INPUT", &input)])?;
    ingester.relay("ALL")?;
    println!("output in {}:", output.display());
    let mut outs: Vec<PathBuf> = std::fs::read_dir(&output)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    outs.sort();
    for p in outs {
        let text = std::fs::read_to_string(&p)?;
        println!("  {}: {:?}", p.display(), text);
    }
    Ok(())
}
