//! The wire protocol between the driver library (one connection per client process)
//! and the daemon: one text line per request, one per reply. Both sides build and
//! match the typed [`Request`] and [`Reply`]; only [`Request::encode`]/[`Request::decode`]
//! and [`encode_reply`]/[`decode_reply`] see the text.
//!
//! Requests: `hello NS_PID`, `dev I`, `ctx_create DEV`, `ctx_destroy CTX`,
//! `alloc DEV BYTES`, `mem_create DEV BYTES`, `free ID`, `meminfo DEV`,
//! `nvml_meminfo DEV`, `nvml_procs DEV`, `stats`.
//! Replies: `ok [VALUES...]` or `err CODE` (see `SimError::code`). The values depend
//! on the request, so a reply is decoded knowing the request it answers.

use crate::state::{SimError, Stats};
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The default socket, used when `VIGIL_GPUSIM_SOCKET` is unset.
pub const DEFAULT_SOCKET: &str = "/tmp/vigil-gpusim.sock";

/// The socket path from `VIGIL_GPUSIM_SOCKET`, or the default.
pub fn socket_path() -> PathBuf {
    std::env::var_os("VIGIL_GPUSIM_SOCKET")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// One request from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Registers the connection; `ns_pid` is the client's PID in its own namespace.
    Hello {
        ns_pid: u32,
    },
    /// A device's total memory, UUID and name.
    Dev {
        device: u32,
    },
    CtxCreate {
        device: u32,
    },
    CtxDestroy {
        ctx: u64,
    },
    Alloc {
        device: u32,
        bytes: u64,
    },
    /// A VMM physical allocation (`cuMemCreate`).
    MemCreate {
        device: u32,
        bytes: u64,
    },
    /// Frees an allocation or a VMM handle.
    Free {
        id: u64,
    },
    /// `cuMemGetInfo`: free and total, never lagging.
    MemInfo {
        device: u32,
    },
    /// `nvmlDeviceGetMemoryInfo`, with the configured NVML faults.
    NvmlMemInfo {
        device: u32,
    },
    /// `nvmlDeviceGetComputeRunningProcesses`, with lag and the configured faults.
    NvmlProcs {
        device: u32,
    },
    /// Totals, not counting the asking connection.
    Stats,
}

/// A successful reply; which variant answers which request is fixed (see
/// [`Reply::decode`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// To `Hello`.
    Hello {
        host_pid: u32,
        devices: u32,
        cuda_version: u32,
        driver_version: String,
    },
    /// To `Dev`.
    Device {
        memory: u64,
        uuid: String,
        name: String,
    },
    /// To `CtxCreate`: the new context's handle.
    Context(u64),
    /// To `CtxDestroy`.
    Destroyed,
    /// To `Alloc`: the device address.
    Allocated(u64),
    /// To `MemCreate`: the VMM handle.
    MemHandle(u64),
    /// To `Free`: the bytes freed.
    Freed(u64),
    /// To `MemInfo`.
    MemInfo { free: u64, total: u64 },
    /// To `NvmlMemInfo`.
    NvmlMemInfo { total: u64, free: u64, used: u64 },
    /// To `NvmlProcs`: (PID, used bytes) per process.
    NvmlProcs(Vec<(u32, u64)>),
    /// To `Stats`.
    Stats(Stats),
}

/// A line that is not a valid request or reply, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The line as received (without its newline).
    pub line: String,
    /// What is wrong with it.
    pub why: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed line {:?}: {}", self.line, self.why)
    }
}

impl std::error::Error for DecodeError {}

/// Splits a line into whitespace-separated fields and parses them by name, so every
/// error says which field is wrong.
struct Fields<'a> {
    line: &'a str,
    it: std::str::SplitWhitespace<'a>,
}

impl<'a> Fields<'a> {
    fn new(line: &'a str) -> Fields<'a> {
        Fields {
            line,
            it: line.split_whitespace(),
        }
    }

    fn err(&self, why: String) -> DecodeError {
        DecodeError {
            line: self.line.trim_end_matches(['\r', '\n']).to_string(),
            why,
        }
    }

    fn word(&mut self, name: &str) -> Result<&'a str, DecodeError> {
        self.it
            .next()
            .ok_or_else(|| self.err(format!("{name} missing")))
    }

    fn num<T: FromStr>(&mut self, name: &str) -> Result<T, DecodeError> {
        let w = self.word(name)?;
        w.parse()
            .map_err(|_| self.err(format!("{name} {w:?} is not a number in range")))
    }

    /// The rest of the line, words joined by single spaces (possibly empty).
    fn rest(&mut self) -> String {
        self.it.by_ref().collect::<Vec<_>>().join(" ")
    }

    fn end(mut self) -> Result<(), DecodeError> {
        match self.it.next() {
            None => Ok(()),
            Some(w) => Err(self.err(format!("unexpected trailing value {w:?}"))),
        }
    }
}

impl Request {
    /// The request's first word.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Dev { .. } => "dev",
            Request::CtxCreate { .. } => "ctx_create",
            Request::CtxDestroy { .. } => "ctx_destroy",
            Request::Alloc { .. } => "alloc",
            Request::MemCreate { .. } => "mem_create",
            Request::Free { .. } => "free",
            Request::MemInfo { .. } => "meminfo",
            Request::NvmlMemInfo { .. } => "nvml_meminfo",
            Request::NvmlProcs { .. } => "nvml_procs",
            Request::Stats => "stats",
        }
    }

    /// The request as a line, without the newline.
    pub fn encode(&self) -> String {
        let op = self.op();
        match self {
            Request::Hello { ns_pid } => format!("{op} {ns_pid}"),
            Request::Dev { device }
            | Request::CtxCreate { device }
            | Request::MemInfo { device }
            | Request::NvmlMemInfo { device }
            | Request::NvmlProcs { device } => format!("{op} {device}"),
            Request::CtxDestroy { ctx: id } | Request::Free { id } => format!("{op} {id}"),
            Request::Alloc { device, bytes } | Request::MemCreate { device, bytes } => {
                format!("{op} {device} {bytes}")
            }
            Request::Stats => op.to_string(),
        }
    }

    /// Parses a request line. Every argument must be present and a number in range;
    /// a malformed one fails the request rather than being skipped (which would shift
    /// the others).
    pub fn decode(line: &str) -> Result<Request, DecodeError> {
        let mut f = Fields::new(line);
        let op = f.word("request")?;
        let r = match op {
            "hello" => Request::Hello {
                ns_pid: f.num("NS_PID")?,
            },
            "dev" => Request::Dev {
                device: f.num("device")?,
            },
            "ctx_create" => Request::CtxCreate {
                device: f.num("device")?,
            },
            "ctx_destroy" => Request::CtxDestroy {
                ctx: f.num("context")?,
            },
            "alloc" => Request::Alloc {
                device: f.num("device")?,
                bytes: f.num("bytes")?,
            },
            "mem_create" => Request::MemCreate {
                device: f.num("device")?,
                bytes: f.num("bytes")?,
            },
            "free" => Request::Free { id: f.num("id")? },
            "meminfo" => Request::MemInfo {
                device: f.num("device")?,
            },
            "nvml_meminfo" => Request::NvmlMemInfo {
                device: f.num("device")?,
            },
            "nvml_procs" => Request::NvmlProcs {
                device: f.num("device")?,
            },
            "stats" => Request::Stats,
            other => return Err(f.err(format!("unknown request {other:?}"))),
        };
        f.end()?;
        Ok(r)
    }
}

impl Reply {
    /// The reply's values, as they follow `ok` on the wire (possibly empty).
    pub fn encode_values(&self) -> String {
        match self {
            Reply::Hello {
                host_pid,
                devices,
                cuda_version,
                driver_version,
            } => format!("{host_pid} {devices} {cuda_version} {driver_version}"),
            Reply::Device { memory, uuid, name } => format!("{memory} {uuid} {name}"),
            Reply::Context(v) | Reply::Allocated(v) | Reply::MemHandle(v) | Reply::Freed(v) => {
                v.to_string()
            }
            Reply::Destroyed => String::new(),
            Reply::MemInfo { free, total } => format!("{free} {total}"),
            Reply::NvmlMemInfo { total, free, used } => format!("{total} {free} {used}"),
            Reply::NvmlProcs(procs) => {
                let mut out = procs.len().to_string();
                for (pid, used) in procs {
                    out.push_str(&format!(" {pid}:{used}"));
                }
                out
            }
            Reply::Stats(st) => format!(
                "processes={} contexts={} allocations={} used={} peak={}",
                st.processes, st.contexts, st.allocations, st.used, st.peak
            ),
        }
    }

    /// Parses the values of a successful reply to `req`.
    pub fn decode(req: &Request, values: &str) -> Result<Reply, DecodeError> {
        let mut f = Fields::new(values);
        let r = match req {
            Request::Hello { .. } => {
                let (host_pid, devices, cuda_version) = (
                    f.num("host PID")?,
                    f.num("device count")?,
                    f.num("CUDA version")?,
                );
                Reply::Hello {
                    host_pid,
                    devices,
                    cuda_version,
                    driver_version: f.rest(),
                }
            }
            Request::Dev { .. } => {
                let memory = f.num("memory")?;
                let uuid = f.word("UUID")?.to_string();
                Reply::Device {
                    memory,
                    uuid,
                    name: f.rest(),
                }
            }
            Request::CtxCreate { .. } => Reply::Context(f.num("context")?),
            Request::CtxDestroy { .. } => Reply::Destroyed,
            Request::Alloc { .. } => Reply::Allocated(f.num("address")?),
            Request::MemCreate { .. } => Reply::MemHandle(f.num("handle")?),
            Request::Free { .. } => Reply::Freed(f.num("bytes")?),
            Request::MemInfo { .. } => Reply::MemInfo {
                free: f.num("free")?,
                total: f.num("total")?,
            },
            Request::NvmlMemInfo { .. } => Reply::NvmlMemInfo {
                total: f.num("total")?,
                free: f.num("free")?,
                used: f.num("used")?,
            },
            Request::NvmlProcs { .. } => {
                let n: usize = f.num("process count")?;
                let mut procs = Vec::with_capacity(n.min(1024));
                for i in 0..n {
                    let p = f.word(&format!("process {i}"))?;
                    let parsed = p
                        .split_once(':')
                        .and_then(|(pid, used)| Some((pid.parse().ok()?, used.parse().ok()?)));
                    let Some(entry) = parsed else {
                        return Err(f.err(format!("process {i} {p:?} is not PID:BYTES")));
                    };
                    procs.push(entry);
                }
                Reply::NvmlProcs(procs)
            }
            Request::Stats => {
                let mut st = Stats::default();
                for key in ["processes", "contexts", "allocations", "used", "peak"] {
                    let w = f.word(key)?;
                    let v = w
                        .strip_prefix(key)
                        .and_then(|r| r.strip_prefix('='))
                        .ok_or_else(|| f.err(format!("{w:?} is not {key}=N")))?;
                    let bad = || f.err(format!("{key} {v:?} is not a number"));
                    match key {
                        "processes" => st.processes = v.parse().map_err(|_| bad())?,
                        "contexts" => st.contexts = v.parse().map_err(|_| bad())?,
                        "allocations" => st.allocations = v.parse().map_err(|_| bad())?,
                        "used" => st.used = v.parse().map_err(|_| bad())?,
                        _ => st.peak = v.parse().map_err(|_| bad())?,
                    }
                }
                Reply::Stats(st)
            }
        };
        f.end()?;
        Ok(r)
    }
}

/// A reply line, with its newline: `ok [VALUES]` or `err CODE`.
pub fn encode_reply(r: &Result<Reply, SimError>) -> String {
    match r {
        Ok(v) => {
            let v = v.encode_values();
            if v.is_empty() {
                "ok\n".to_string()
            } else {
                format!("ok {v}\n")
            }
        }
        Err(e) => format!("err {}\n", e.code()),
    }
}

/// Parses a reply line to `req`: the daemon's answer (a reply or its error), or why
/// the line is malformed.
pub fn decode_reply(req: &Request, line: &str) -> Result<Result<Reply, SimError>, DecodeError> {
    let t = line.trim_end_matches(['\r', '\n']);
    let bad = |why: String| DecodeError {
        line: t.to_string(),
        why,
    };
    let (status, values) = t.split_once(' ').unwrap_or((t, ""));
    match status {
        "ok" => Reply::decode(req, values).map(Ok).map_err(|e| bad(e.why)),
        "err" => {
            let code = values.trim();
            SimError::from_code(code)
                .map(Err)
                .ok_or_else(|| bad(format!("unknown error code {code:?}")))
        }
        _ => Err(bad("a reply starts with \"ok\" or \"err\"".into())),
    }
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
        let Reply::Hello {
            host_pid,
            devices,
            cuda_version,
            driver_version,
        } = c.call(&Request::Hello { ns_pid })?
        else {
            return Err(CallError::Io("hello: unexpected reply".into()));
        };
        c.host_pid = host_pid;
        c.devices = devices;
        c.cuda_version = cuda_version;
        c.driver_version = driver_version;
        Ok(c)
    }

    /// Sends one request and returns the daemon's reply, whose variant is the one
    /// that answers `req`.
    pub fn call(&mut self, req: &Request) -> Result<Reply, CallError> {
        let line = self.exchange(&req.encode())?;
        match decode_reply(req, &line) {
            Ok(r) => r.map_err(CallError::Sim),
            Err(e) => Err(CallError::Io(format!("reply to {req:?}: {e}"))),
        }
    }

    /// Sends a raw line and returns the reply's values: for tests of how the daemon
    /// treats malformed requests. Everything else uses [`Conn::call`].
    pub fn call_raw(&mut self, req: &str) -> Result<Vec<String>, CallError> {
        let line = self.exchange(req)?;
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

    /// Writes one request line and reads one reply line.
    fn exchange(&mut self, req: &str) -> Result<String, CallError> {
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
        Ok(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Hello { ns_pid: 1 },
            Request::Dev { device: 3 },
            Request::CtxCreate { device: 0 },
            Request::CtxDestroy { ctx: u64::MAX },
            Request::Alloc {
                device: 1,
                bytes: 1 << 40,
            },
            Request::MemCreate {
                device: 0,
                bytes: 2 << 20,
            },
            Request::Free { id: 0x7000_0000 },
            Request::MemInfo { device: 1 },
            Request::NvmlMemInfo { device: 0 },
            Request::NvmlProcs { device: 1 },
            Request::Stats,
        ]
    }

    #[test]
    fn requests_round_trip() {
        for r in all_requests() {
            let line = r.encode();
            assert_eq!(Request::decode(&line), Ok(r.clone()), "{line}");
            assert_eq!(Request::decode(&format!("{line}\n")), Ok(r), "{line}");
        }
        assert_eq!(
            Request::Alloc {
                device: 1,
                bytes: 5
            }
            .encode(),
            "alloc 1 5"
        );
        assert_eq!(Request::Stats.encode(), "stats");
    }

    #[test]
    fn request_errors_say_what_is_wrong() {
        let why = |l: &str| Request::decode(l).unwrap_err().why;
        assert_eq!(why(""), "request missing");
        assert_eq!(why("launch 0"), "unknown request \"launch\"");
        assert_eq!(why("alloc x 5"), "device \"x\" is not a number in range");
        assert_eq!(why("alloc 0"), "bytes missing");
        assert_eq!(why("alloc 0 -1"), "bytes \"-1\" is not a number in range");
        assert_eq!(
            why("dev 4294967296"),
            "device \"4294967296\" is not a number in range"
        );
        assert_eq!(why("stats now"), "unexpected trailing value \"now\"");
        let e = Request::decode("free one\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "malformed line \"free one\": id \"one\" is not a number in range"
        );
    }

    #[test]
    fn replies_round_trip() {
        let replies = [
            Reply::Hello {
                host_pid: 42,
                devices: 2,
                cuda_version: 12060,
                driver_version: "560.35.03".into(),
            },
            Reply::Device {
                memory: 16 << 30,
                uuid: "GPU-00000000-0000-0000-0000-000000000000".into(),
                name: "Vigil Simulated GPU".into(),
            },
            Reply::Context(7),
            Reply::Destroyed,
            Reply::Allocated(0x7000_0000_0000),
            Reply::MemHandle(9),
            Reply::Freed(4096),
            Reply::MemInfo { free: 1, total: 2 },
            Reply::NvmlMemInfo {
                total: 3,
                free: 2,
                used: 1,
            },
            Reply::NvmlProcs(vec![]),
            Reply::NvmlProcs(vec![(100, 1 << 20), (7, 0)]),
            Reply::Stats(Stats {
                processes: 1,
                contexts: 2,
                allocations: 3,
                used: 4,
                peak: 5,
            }),
        ];
        let reqs = all_requests();
        for reply in replies {
            // The request each reply answers.
            let req = match &reply {
                Reply::Hello { .. } => &reqs[0],
                Reply::Device { .. } => &reqs[1],
                Reply::Context(_) => &reqs[2],
                Reply::Destroyed => &reqs[3],
                Reply::Allocated(_) => &reqs[4],
                Reply::MemHandle(_) => &reqs[5],
                Reply::Freed(_) => &reqs[6],
                Reply::MemInfo { .. } => &reqs[7],
                Reply::NvmlMemInfo { .. } => &reqs[8],
                Reply::NvmlProcs(_) => &reqs[9],
                Reply::Stats(_) => &reqs[10],
            };
            let line = encode_reply(&Ok(reply.clone()));
            assert!(line.ends_with('\n'));
            assert_eq!(decode_reply(req, &line), Ok(Ok(reply)), "{line:?}");
        }
        for e in [
            SimError::OutOfMemory,
            SimError::InvalidValue,
            SimError::InvalidDevice,
            SimError::Refused,
            SimError::NvmlUnknown,
        ] {
            let line = encode_reply(&Err(e));
            assert_eq!(decode_reply(&Request::Stats, &line), Ok(Err(e)), "{line:?}");
        }
    }

    #[test]
    fn the_wire_text_is_unchanged() {
        assert_eq!(encode_reply(&Ok(Reply::Destroyed)), "ok\n");
        assert_eq!(
            encode_reply(&Ok(Reply::NvmlProcs(vec![(5, 10), (6, 0)]))),
            "ok 2 5:10 6:0\n"
        );
        assert_eq!(
            encode_reply(&Ok(Reply::Stats(Stats {
                processes: 1,
                contexts: 2,
                allocations: 3,
                used: 4,
                peak: 5
            }))),
            "ok processes=1 contexts=2 allocations=3 used=4 peak=5\n"
        );
        assert_eq!(encode_reply(&Err(SimError::OutOfMemory)), "err oom\n");
        // A device name keeps its spaces.
        assert_eq!(
            decode_reply(&Request::Dev { device: 0 }, "ok 1 GPU-x A B  C\n"),
            Ok(Ok(Reply::Device {
                memory: 1,
                uuid: "GPU-x".into(),
                name: "A B C".into()
            }))
        );
    }

    #[test]
    fn reply_errors_say_what_is_wrong() {
        // (request, reply line, what the error says).
        let cases = [
            (
                Request::Stats,
                "maybe\n",
                "a reply starts with \"ok\" or \"err\"",
            ),
            (
                Request::Stats,
                "err melted",
                "unknown error code \"melted\"",
            ),
            (Request::CtxCreate { device: 0 }, "ok", "context missing"),
            (
                Request::NvmlProcs { device: 0 },
                "ok 2 5:10",
                "process 1 missing",
            ),
            (
                Request::NvmlProcs { device: 0 },
                "ok 1 5-10",
                "process 0 \"5-10\" is not PID:BYTES",
            ),
            (
                Request::Stats,
                "ok processes=1 contexts=x",
                "contexts \"x\" is not a number",
            ),
            (
                Request::MemInfo { device: 0 },
                "ok 1 2 3",
                "unexpected trailing value \"3\"",
            ),
        ];
        for (req, line, why) in cases {
            assert_eq!(decode_reply(&req, line).unwrap_err().why, why, "{line:?}");
        }
    }
}
