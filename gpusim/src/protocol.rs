//! The wire protocol between the driver library (one connection per client process)
//! and the daemon: one text line per request, one per reply.
//!
//! Requests: `hello NS_PID`, `dev I`, `ctx_create DEV`, `ctx_destroy CTX`,
//! `alloc DEV BYTES`, `mem_create DEV BYTES`, `free ID`, `meminfo DEV`,
//! `nvml_meminfo DEV`, `nvml_procs DEV`, `stats`.
//! Replies: `ok [VALUES...]` or `err CODE` (see `SimError::code`).

use crate::state::SimError;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// The default socket, used when `VIGIL_GPUSIM_SOCKET` is unset.
pub const DEFAULT_SOCKET: &str = "/tmp/vigil-gpusim.sock";

/// The socket path from `VIGIL_GPUSIM_SOCKET`, or the default.
pub fn socket_path() -> PathBuf {
    std::env::var_os("VIGIL_GPUSIM_SOCKET")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

#[derive(Debug)]
pub enum CallError {
    /// The daemon answered with an error.
    Sim(SimError),
    /// The connection failed or the reply was malformed.
    Io(String),
}

/// A client connection.
pub struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub host_pid: u32,
    pub devices: u32,
    pub cuda_version: u32,
    pub driver_version: String,
}

impl Conn {
    pub fn connect(path: &Path, ns_pid: u32) -> Result<Conn, CallError> {
        let s = UnixStream::connect(path).map_err(|e| {
            CallError::Io(format!(
                "cannot reach vigil-gpusim at {}: {e}",
                path.display()
            ))
        })?;
        let writer = s
            .try_clone()
            .map_err(|e| CallError::Io(format!("socket clone: {e}")))?;
        let mut c = Conn {
            reader: BufReader::new(s),
            writer,
            host_pid: 0,
            devices: 0,
            cuda_version: 0,
            driver_version: String::new(),
        };
        let v = c.call(&format!("hello {ns_pid}"))?;
        c.host_pid = num(&v, 0)? as u32;
        c.devices = num(&v, 1)? as u32;
        c.cuda_version = num(&v, 2)? as u32;
        c.driver_version = v.get(3).cloned().unwrap_or_default();
        Ok(c)
    }

    /// Sends one request and returns the reply's values.
    pub fn call(&mut self, req: &str) -> Result<Vec<String>, CallError> {
        self.writer
            .write_all(format!("{req}\n").as_bytes())
            .map_err(|e| CallError::Io(format!("send {req:?}: {e}")))?;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| CallError::Io(format!("reply to {req:?}: {e}")))?;
        if n == 0 {
            return Err(CallError::Io(format!(
                "daemon closed the connection on {req:?}"
            )));
        }
        let mut it = line.split_whitespace().map(str::to_string);
        match it.next().as_deref() {
            Some("ok") => Ok(it.collect()),
            Some("err") => {
                let code = it.next().unwrap_or_default();
                Err(SimError::from_code(&code)
                    .map(CallError::Sim)
                    .unwrap_or_else(|| CallError::Io(format!("unknown error code {code:?}"))))
            }
            _ => Err(CallError::Io(format!("malformed reply {line:?}"))),
        }
    }
}

/// The `i`th reply value as a number.
pub fn num(v: &[String], i: usize) -> Result<u64, CallError> {
    v.get(i)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| CallError::Io(format!("reply value {i} missing or not a number in {v:?}")))
}
