//! Harness for the cross-process tests in `tests/tests/`: free loopback ports, the workspace's
//! release binaries started as child processes (killed when dropped), a throw-away
//! `redis-server`, waiting for grpc.health.v1 to report SERVING, and altered copies of model files.

pub mod proxy;
pub mod setup;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A loopback port that was free a moment ago, for a service that binds it later.
///
/// Ports come from below the kernel's ephemeral range (`ip_local_port_range`), never twice in
/// one process: a port from `bind(0)` could be handed out again, to another `bind(0)` (the delay
/// proxy) or as the local port of an outgoing connection (a service dialling another), in the
/// seconds before the ranker, slow to load, binds it; CI saw exactly that ("Address already in
/// use"). Each test process starts at its own offset so concurrent test binaries rarely meet.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let high = ephemeral_low().clamp(LOW + 1_000, 65_535);
    let span = high - LOW;
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (offset + n) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{high}")
}

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|w| w.parse().ok()))
        .unwrap_or(32_768)
}

/// A workspace binary next to the test executable (`target/release/NAME`). `cargo test
/// --workspace` builds every binary target before running tests.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/..");
    let path = dir.join(name);
    assert!(path.is_file(), "{} is missing: run `cargo build --release --workspace` first", path.display());
    path
}

/// A child process that is killed (SIGKILL) when dropped.
pub struct Process {
    /// The child.
    pub child: Child,
    /// For messages.
    pub name: String,
}

impl Process {
    /// Starts `program` with `args` and extra environment, output inherited so failures show.
    pub fn start(name: &str, program: &Path, args: &[&str], env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(program);
        cmd.args(args).current_dir(repo_root()).stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {name} ({}): {e}", program.display()));
        Self { child, name: name.to_string() }
    }

    /// SIGKILL, like a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and returns at once.
    pub fn sigterm(&self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
    }

    /// Waits up to `timeout` for the process to exit; its status, or None if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private redis-server on a free port with append-only fsync-always persistence in a
/// temporary directory.
pub struct Redis {
    /// The server process.
    pub process: Process,
    /// Its port.
    pub port: u16,
    /// Its data directory (kept across restarts of the same instance).
    pub dir: tempfile::TempDir,
    /// `requirepass`, when set.
    pub password: Option<String>,
}

impl Redis {
    /// Starts redis-server (installed by `.ci/run` from Debian's packages).
    pub fn start() -> Self {
        Self::start_inner(None)
    }

    /// [`start`](Self::start) with `requirepass password`, as the shipped deployments run it.
    pub fn start_with_password(password: &str) -> Self {
        Self::start_inner(Some(password.to_string()))
    }

    fn start_inner(password: Option<String>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let process = Self::spawn(dir.path(), port, password.as_deref());
        Self { process, port, dir, password }
    }

    fn spawn(dir: &Path, port: u16, password: Option<&str>) -> Process {
        let program = which("redis-server").expect("redis-server not found: install it (`apt-get install -y redis-server`); .ci/run does");
        let port_s = port.to_string();
        let dir_s = dir.display().to_string();
        let log = dir.join("redis.log").display().to_string();
        let mut args = vec!["--port", &port_s, "--bind", "127.0.0.1", "--dir", &dir_s, "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile", &log];
        if let Some(p) = password {
            args.extend(["--requirepass", p]);
        }
        let p = Process::start("redis-server", &program, &args, &[]);
        wait_for_port(port, Duration::from_secs(10));
        wait_redis_loaded(port, Duration::from_secs(10));
        p
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL).
    pub fn stop(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same port and data directory.
    pub fn restart(&mut self) {
        self.process.kill();
        self.process = Self::spawn(self.dir.path(), self.port, self.password.as_deref());
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

/// Blocks until the Redis on `port` answers a data command: after a restart it accepts
/// connections while it replays its append-only file, answering `-LOADING` until it is done.
fn wait_redis_loaded(port: u16, timeout: Duration) {
    use std::io::{Read, Write};
    let start = Instant::now();
    loop {
        let answer = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.write_all(b"EXISTS llamarec-tests-ready\r\n")?;
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf)?;
            Ok(buf[..n].to_vec())
        });
        // `-NOAUTH`: a Redis with `requirepass` is up and refusing the unauthenticated probe.
        if answer.is_ok_and(|a| a.starts_with(b":") || a.starts_with(b"-NOAUTH")) {
            return;
        }
        assert!(start.elapsed() < timeout, "redis on port {port} still not ready after {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Blocks until something accepts TCP connections on the loopback port.
pub fn wait_for_port(port: u16, timeout: Duration) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < timeout, "nothing listening on port {port} after {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub use llamarec_common::serving::wait_serving;

/// Writes a copy of the safetensors file `from` to `to` with each f32 value `w` changed to
/// `f(i, w)`, `i` counting values over the whole data section. Every tensor must be F32 (true of
/// the shipped retriever checkpoint and LoRA adapter): another model of the same shapes, for
/// reload tests.
pub fn map_f32_safetensors(from: &Path, to: &Path, f: impl Fn(usize, f32) -> f32) {
    let mut bytes = std::fs::read(from).unwrap_or_else(|e| panic!("reading {}: {e}", from.display()));
    // safetensors: an 8-byte little-endian header length, the JSON header, then the data.
    let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for (i, chunk) in bytes[data_start..].chunks_exact_mut(4).enumerate() {
        let w = f32::from_le_bytes(chunk.try_into().unwrap());
        chunk.copy_from_slice(&f(i, w).to_le_bytes());
    }
    std::fs::write(to, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", to.display()));
}
