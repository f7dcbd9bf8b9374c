//! Peer-to-peer mode: each process listens on its own socket and senders connect to it directly.
//!
//! The daemon is only asked where a machine lives (its registry entry carries
//! the owning process's socket under [`crate::ENDPOINT_KEY`]); the connection is
//! then opened once per peer process and reused for every machine living there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use interprocess::local_socket::tokio::{Listener, Stream};
use interprocess::local_socket::traits::tokio::Listener as _;
use switchyard_core::{Error, MachineEntry, Result};
use tokio::sync::watch;

use crate::client::{Client, Inbound, Local, handshake_client};
use crate::conn::{FrameReader, Outbox};
use crate::daemon::{bind_listener, check_peer, error_frame_for, handshake_server, owner_uid};
use crate::error::IpcError;
use crate::frame::{self, Body, HEADER_LEN, NackMsg, kind};
use crate::{ENDPOINT_KEY, IpcConfig};

/// The peer-to-peer side of one transport: its listener and its connections to other processes.
pub(crate) struct P2p {
    pub(crate) path: PathBuf,
    pool: tokio::sync::Mutex<HashMap<String, Arc<Outbox>>>,
    stop: watch::Sender<bool>,
}

impl P2p {
    /// Binds this process's socket and starts accepting peers.
    pub(crate) fn start(
        path: PathBuf,
        cfg: &IpcConfig,
        local: Arc<Local>,
    ) -> std::result::Result<Arc<P2p>, IpcError> {
        let listener = bind_listener(&path, 0o600)?;
        let own_uid = if cfg.allow_any_uid {
            None
        } else {
            owner_uid(&path)
        };
        let p2p = Arc::new(P2p {
            path,
            pool: tokio::sync::Mutex::new(HashMap::new()),
            stop: watch::channel(false).0,
        });
        tokio::spawn(accept_loop(
            listener,
            p2p.path.clone(),
            cfg.clone(),
            own_uid,
            local,
            p2p.stop.subscribe(),
        ));
        Ok(p2p)
    }

    pub(crate) fn close(&self) {
        let _ = self.stop.send_replace(true);
        if let Ok(mut pool) = self.pool.try_lock() {
            for (_, o) in pool.drain() {
                o.close("transport closed");
            }
        }
        // A Windows named pipe has no file: it goes away with its last handle.
        #[cfg(unix)]
        let _ = std::fs::remove_file(&self.path);
    }

    /// The connection to the process of `to` (from the endpoint in its registry entry),
    /// opened once per peer process and shared; `None` when it has no endpoint (reach it
    /// through the daemon).
    pub(crate) async fn connect(
        &self,
        client: &Client,
        to: &MachineEntry,
    ) -> Result<Option<Arc<Outbox>>> {
        let Some(endpoint) = to.metadata.get(ENDPOINT_KEY) else {
            return Ok(None);
        };
        let mut pool = self.pool.lock().await;
        if let Some(o) = pool.get(endpoint).filter(|o| !o.is_closed()) {
            return Ok(Some(o.clone()));
        }
        let o = connect_peer(Path::new(endpoint), &client.cfg, self.stop.subscribe())
            .await
            .map_err(|e| {
                tracing::debug!(machine = %to.id, endpoint, error = %e, "peer unreachable");
                Error::TargetGone(to.id.clone())
            })?;
        pool.insert(endpoint.clone(), o.clone());
        Ok(Some(o))
    }
}

async fn connect_peer(
    path: &Path,
    cfg: &IpcConfig,
    mut stop: watch::Receiver<bool>,
) -> std::result::Result<Arc<Outbox>, IpcError> {
    let stream = crate::daemon::connect(path)
        .await
        .map_err(|e| IpcError::io(path.display().to_string(), e))?;
    let mut rd = FrameReader::new(cfg.max_frame);
    let welcome = handshake_client(&stream, &mut rd, cfg, false, false).await?;
    let stream = Arc::new(stream);
    // The peer said what it accepts: a bigger event is refused here, at the sender.
    let max_frame = usize::try_from(welcome.max_frame)
        .unwrap_or(usize::MAX)
        .min(cfg.max_frame);
    let outbox = Outbox::start(
        stream.clone(),
        cfg.outbox_limit,
        max_frame,
        format!("peer {}", path.display()),
    );
    let ob = outbox.clone();
    tokio::spawn(async move {
        // The peer only ever answers with NACKs (or an ERROR before closing).
        let r: std::result::Result<(), IpcError> = async {
            loop {
                while let Some(f) = rd.next_frame()? {
                    let body = &rd.bytes(&f)[HEADER_LEN..];
                    match f.kind {
                        kind::NACK => {
                            let n: NackMsg = frame::decode_msg(body)?;
                            tracing::warn!(to = %n.to, envelope = n.id, "peer could not deliver: {}", n.message);
                        }
                        kind::ERROR => {
                            let e: frame::ErrorMsg = frame::decode_msg(body)?;
                            return Err(IpcError::Remote { code: e.code, message: e.message });
                        }
                        other => return Err(IpcError::UnknownFrame(other)),
                    }
                    rd.consume(&f);
                }
                // Stop with the transport, so the socket is released even if the peer lingers.
                tokio::select! {
                    more = rd.fill(&stream) => if !more? { return Ok(()) },
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                }
            }
        }
        .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "peer connection ended");
        }
        ob.close("the peer closed the connection");
    });
    Ok(outbox)
}

async fn accept_loop(
    listener: Listener,
    path: PathBuf,
    cfg: IpcConfig,
    own_uid: Option<u32>,
    local: Arc<Local>,
    stop: watch::Receiver<bool>,
) {
    let mut stop_wait = stop.clone();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok(stream) => {
                    let (cfg, local, stop) = (cfg.clone(), local.clone(), stop.clone());
                    tokio::spawn(serve_peer(stream, cfg, own_uid, local, stop));
                }
                Err(e) => tracing::warn!(error = %e, "peer accept failed"),
            },
            _ = stop_wait.wait_for(|s| *s) => break,
        }
    }
    drop(listener);
    #[cfg(unix)]
    let _ = std::fs::remove_file(&path);
    #[cfg(not(unix))]
    let _ = path;
}

async fn serve_peer(
    stream: Stream,
    cfg: IpcConfig,
    own_uid: Option<u32>,
    local: Arc<Local>,
    mut stop: watch::Receiver<bool>,
) {
    let stream = Arc::new(stream);
    let mut rd = FrameReader::new(cfg.max_frame);
    let setup = async {
        check_peer(&stream, own_uid, None)?;
        let welcome = frame::Welcome {
            protocol: frame::PROTOCOL_VERSION,
            server_id: cfg.client_id.clone(),
            max_frame: cfg.max_frame as u64,
            idle_timeout_ms: None,
            frame_timeout_ms: None,
            queue_limit: None,
        };
        handshake_server(
            &stream,
            &mut rd,
            cfg.token.as_deref(),
            welcome,
            Duration::from_secs(5),
        )
        .await
    };
    if let Err(e) = setup.await {
        tracing::warn!(error = %e, "peer rejected during handshake");
        let _ = crate::conn::write_now(&stream, &error_frame_for(&e)).await;
        return;
    }
    let outbox = Outbox::start(
        stream.clone(),
        cfg.outbox_limit,
        cfg.max_frame,
        "peer (nacks)",
    );
    let r: std::result::Result<(), IpcError> = async {
        let mut inbound = Inbound::default();
        loop {
            loop {
                rd.take_sends(|body| inbound.try_deliver_view(&local, body));
                inbound.flush_counts(&local);
                let Some(f) = rd.next_frame()? else { break };
                let body = &rd.bytes(&f)[HEADER_LEN..];
                if f.kind != kind::SEND {
                    return Err(IpcError::UnknownFrame(f.kind));
                }
                let mut b = Body::array(body, 2)?;
                let to = b.raw_str()?;
                // A bad envelope hurts only itself: the sender gets a NACK, the connection stays.
                let refused = match inbound.deliver_bytes(&local, to, b.rest()).await {
                    Ok(true) => None,
                    Ok(false) => Some((
                        frame::nack::UNKNOWN_TARGET,
                        Error::UnknownTarget(String::from_utf8_lossy(to).as_ref().into())
                            .to_string(),
                    )),
                    Err(IpcError::Malformed(why)) => {
                        tracing::warn!("dropped an undecodable event from a peer: {why}");
                        Some((frame::nack::MALFORMED, why))
                    }
                    Err(e) => return Err(e),
                };
                if let Some((code, message)) = refused {
                    let nack = frame::msg_frame(
                        kind::NACK,
                        &NackMsg {
                            message,
                            to: String::from_utf8_lossy(to).into_owned(),
                            id: crate::daemon::peek_envelope_id(b.rest()),
                            code: code.into(),
                            source: None,
                        },
                    )
                    .map_err(|e| IpcError::Malformed(e.to_string()))?;
                    let _ = outbox.push_force(&nack);
                }
                rd.consume(&f);
            }
            tokio::select! {
                r = rd.fill(&stream) => if !r? { return Ok(()) },
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
        }
    }
    .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "peer dropped");
        let _ = outbox.push_force(&error_frame_for(&e));
        outbox.drain(Duration::from_millis(200)).await;
    }
    outbox.close("peer finished");
}
