//! The agent's status: what it is attached to, where its state comes from, when it last synced,
//! what went wrong, and the problems in Marathon's data. Served as JSON on a unix socket that only
//! root can open (mode 0600); `lbctl status` and `lbctl problems` read it.
use crate::{
    api::ResolveOutput,
    dns::ZoneHandle,
    error::{Error, Result},
};
use std::{
    io::{Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixListener, net::UnixStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::{runtime::Handle, sync::Semaphore};
use tokio_util::sync::CancellationToken;

/// The agent's status socket unless the pin directory is not the default one.
pub const DEFAULT_SOCKET: &str = "/run/lb/agent.sock";

/// The status document; its shape lives with every other JSON output in [`crate::api`].
pub use crate::api::AgentStatus;

/// Fills in what the kernel serves now (services, backends with state and counters), read
/// from the pinned maps at each request.
fn kernel_view(st: &mut AgentStatus) {
    match crate::dataplane::Maps::open(Path::new(&st.pin_dir)) {
        Ok(maps) => {
            // One read of the kernel per request (the flow tables walked once).
            let kernel = maps.inspect(true);
            st.services = kernel
                .as_ref()
                .map(|k| k.services.clone())
                .unwrap_or_default();
            st.counters = kernel
                .map(|k| crate::api::counters(&k.counters))
                .unwrap_or_default();
        }
        Err(e) => st.last_error = Some(e.to_string()),
    }
}

/// Now, in Unix seconds.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The status the agent updates and the socket serves.
pub type Shared = Arc<Mutex<AgentStatus>>;

/// The status socket, bound (mode 0600) and not answering yet: the agent binds it before it
/// touches the kernel, and serves it once attached. Dropping it removes the socket file.
pub struct StatusSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for StatusSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the status socket at `path` (mode 0600), creating its directory and replacing a socket
/// a killed agent left. Refused when another agent answers there, or the path cannot be a socket.
pub fn bind(path: &Path) -> Result<StatusSocket> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    // A socket left by an agent that was killed.
    if UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| Error::io(format!("binding the status socket {}", path.display()), e))?;
    // From here on, dropping `socket` removes the file.
    let socket = StatusSocket {
        listener,
        path: path.to_path_buf(),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod 0600 {}", path.display()), e))?;
    socket
        .listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("status socket", e))?;
    Ok(socket)
}

/// Connections of the status socket answered at once; more wait for one to finish.
const MAX_CLIENTS: usize = 16;

/// Serves `status` on `socket` as tasks of `runtime` until `stop` is cancelled, at most
/// [`MAX_CLIENTS`] connections at once. A connection sends one request line and gets one JSON
/// document: `status` (or nothing within a second) the agent's status, `resolve NAME [TYPE]`
/// what the DNS server answers for NAME ([`crate::api::ResolveOutput`]). The socket file is
/// removed when it stops.
pub fn serve(
    socket: StatusSocket,
    status: Shared,
    zone: ZoneHandle,
    runtime: &Handle,
    stop: CancellationToken,
) -> Result<()> {
    let listener = {
        let _guard = runtime.enter();
        let std = socket
            .listener
            .try_clone()
            .map_err(|e| Error::io("status socket", e))?;
        tokio::net::UnixListener::from_std(std).map_err(|e| Error::io("status socket", e))?
    };
    runtime.spawn(async move {
        // Dropped (the file removed) when the task ends.
        let _socket = socket;
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let conn = tokio::select! {
                _ = stop.cancelled() => break,
                c = listener.accept() => match c {
                    Ok((conn, _)) => conn,
                    Err(e) => {
                        tracing::debug!(error = %e, "status socket accept");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let (status, zone) = (status.clone(), zone.clone());
            tokio::spawn(async move {
                answer(conn, status, zone).await;
                drop(permit);
            });
        }
    });
    Ok(())
}

/// Reads one request (a line of at most 1 KiB, within a second) and writes its answer (within
/// 2 s). The kernel is read off the async threads.
async fn answer(mut conn: tokio::net::UnixStream, status: Shared, zone: ZoneHandle) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let mut line = Vec::new();
    {
        let mut reader = BufReader::new((&mut conn).take(1024));
        let _ =
            tokio::time::timeout(Duration::from_secs(1), reader.read_until(b'\n', &mut line)).await;
    }
    let request = String::from_utf8_lossy(&line).into_owned();
    let body = tokio::task::spawn_blocking(move || {
        let mut words = request.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("resolve"), Some(name), rtype) => match zone.resolve(name, rtype) {
                Ok(out) => serde_json::to_string(&out),
                Err(e) => serde_json::to_string(&ResolveOutput {
                    name: name.to_string(),
                    rcode: format!("error: {e}"),
                    ..Default::default()
                }),
            },
            _ => {
                let mut st = status.lock().map(|s| s.clone()).unwrap_or_default();
                kernel_view(&mut st);
                serde_json::to_string(&st)
            }
        }
    })
    .await;
    let body = match body {
        Ok(Ok(b)) => b,
        _ => return,
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.write_all(body.as_bytes())).await;
}

/// Sends `request` (one line) to the agent's socket at `path` and returns its answer.
fn ask(path: &Path, request: &str) -> Result<String> {
    let mut conn = UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => Error::NotPermitted(path.to_path_buf()),
        _ => Error::AgentNotRunning(path.to_path_buf()),
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| Error::io("status socket", e))?;
    conn.write_all(format!("{request}\n").as_bytes())
        .map_err(|e| Error::io(format!("writing to {}", path.display()), e))?;
    let mut text = String::new();
    conn.read_to_string(&mut text)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    Ok(text)
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, what: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Io {
        what: format!("{what} from {}", path.display()),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// Reads the agent's status from its socket.
pub fn query(path: &Path) -> Result<AgentStatus> {
    parse(path, "the status", &ask(path, "status")?)
}

/// Asks the agent at `path` what its DNS server answers for `name` (of `record_type`, `A` when
/// `None`).
pub fn resolve(path: &Path, name: &str, record_type: Option<&str>) -> Result<ResolveOutput> {
    if name.is_empty() || name.chars().any(char::is_whitespace) {
        return Err(Error::Config(format!("`{name}` is not a DNS name")));
    }
    let request = format!("resolve {name} {}", record_type.unwrap_or("A"));
    let out: ResolveOutput = parse(path, "the DNS answer", &ask(path, &request)?)?;
    match out.rcode.strip_prefix("error: ") {
        Some(e) => Err(Error::Config(e.to_string())),
        None => Ok(out),
    }
}

/// The socket path for a pin directory other than the default, so that several agents (one per
/// pin directory) each have their own.
pub fn default_socket_for(pin_dir: &Path) -> PathBuf {
    if pin_dir == Path::new(crate::dataplane::DEFAULT_PIN_DIR) {
        return PathBuf::from(DEFAULT_SOCKET);
    }
    let name = pin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "lb".into());
    PathBuf::from(format!("/run/lb/{name}.sock"))
}
