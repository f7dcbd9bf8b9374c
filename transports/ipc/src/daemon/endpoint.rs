//! The daemon's local socket: its name (a path, or a named pipe on Windows), binding it
//! with the right mode, connecting to it, and checking who is on the other end.

use super::*;

/// Makes the local socket name for a path (on Windows, a named pipe: see [`DaemonConfig::socket`]).
pub(crate) fn socket_name(path: &Path) -> std::io::Result<interprocess::local_socket::Name<'_>> {
    use interprocess::local_socket::{GenericFilePath, ToFsName};
    #[cfg(windows)]
    if let Some(pipe) = pipe_name(&path.to_string_lossy()) {
        use interprocess::local_socket::{GenericNamespaced, ToNsName};
        // GenericNamespaced prepends `\\.\pipe\`.
        return pipe
            .to_ns_name::<GenericNamespaced>()
            .map(|n| n.into_owned());
    }
    path.to_fs_name::<GenericFilePath>()
}

/// The prefix of a local named pipe's path on Windows.
#[cfg(any(windows, test))]
pub(crate) const PIPE_PREFIX: &str = r"\\.\pipe\";

/// Windows: `None` for a path that already is a named pipe (`\\.\pipe\NAME`, used as is),
/// else the pipe name (after `\\.\pipe\`) that stands for `path`: `\`, `/` and `:` become `_`.
#[cfg(any(windows, test))]
pub(crate) fn pipe_name(path: &str) -> Option<String> {
    let is_pipe = path.len() > PIPE_PREFIX.len()
        && path
            .get(..PIPE_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(PIPE_PREFIX));
    (!is_pipe).then(|| path.replace(['\\', '/', ':'], "_"))
}

/// Connects to a local socket path.
pub(crate) async fn connect(path: &Path) -> std::io::Result<Stream> {
    let name = socket_name(path)?;
    Stream::connect(name).await
}

/// Binds a listener at `path` with the given unix mode; refuses to displace a live listener.
///
/// On Windows `mode` is ignored (the pipe gets the default security descriptor of
/// the creating user) and nothing is created on disk; the pipe's first instance is
/// created with `FILE_FLAG_FIRST_PIPE_INSTANCE`, so a name another listener owns
/// is refused with [`IpcError::AlreadyRunning`].
pub(crate) fn bind_listener(path: &Path, mode: u32) -> Result<Listener, IpcError> {
    use interprocess::local_socket::ListenerOptions;
    #[cfg(unix)]
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(IpcError::AlreadyRunning(path.to_path_buf()));
        }
        // A socket file nobody listens on is left over from a crash: reclaim it.
        let _ = std::fs::remove_file(path);
    }
    #[cfg(unix)]
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| IpcError::io(dir.display().to_string(), e))?;
    }
    let name = socket_name(path).map_err(|e| IpcError::io(path.display().to_string(), e))?;
    let opts = ListenerOptions::new().name(name).reclaim_name(true);
    #[cfg(unix)]
    let opts = {
        use interprocess::os::unix::local_socket::ListenerOptionsExt;
        opts.mode(mode as _)
    };
    #[cfg(not(unix))]
    let _ = mode;
    let listener = opts.create_tokio().map_err(|e| {
        // ERROR_ACCESS_DENIED on the first pipe instance: the name is taken.
        #[cfg(windows)]
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            return IpcError::AlreadyRunning(path.to_path_buf());
        }
        IpcError::io(path.display().to_string(), e)
    })?;
    // The mode set before bind() is still masked by the umask (0660 became 0640); set it exactly.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| IpcError::io(path.display().to_string(), e))?;
    }
    Ok(listener)
}

/// The uid that owns `path` (the daemon's own uid right after it created the socket).
///
/// `None` on Windows, which turns the peer check off there.
pub(crate) fn owner_uid(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| m.uid())
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Checks a peer's credentials: same uid, or the configured group; `Ok` where the OS cannot tell.
///
/// Windows: always `Ok`. Named pipes carry no uid (`SO_PEERCRED`); who may
/// connect is decided by the pipe's default security descriptor.
pub(crate) fn check_peer(
    stream: &Stream,
    own_uid: Option<u32>,
    group: Option<u32>,
) -> Result<(), IpcError> {
    #[cfg(unix)]
    {
        use interprocess::local_socket::traits::StreamCommon;
        let Some(ours) = own_uid else { return Ok(()) };
        let creds = stream
            .peer_creds()
            .map_err(|e| IpcError::io("peer credentials", e))?;
        let Some(peer) = creds.euid() else {
            return Ok(());
        };
        let group_ok = group.is_some_and(|g| creds.egid().is_some_and(|pg| pg == g));
        if peer != ours && !group_ok {
            return Err(IpcError::PeerUid { peer, ours });
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        let _ = (stream, own_uid, group);
        Ok(())
    }
}
