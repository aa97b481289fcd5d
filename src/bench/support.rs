//! What every benchmark needs: latency histograms (HdrHistogram), flagrelay child processes
//! with a configuration written for them, their peak RSS from `/proc`, and the machine facts
//! printed with every result.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use secrecy::ExposeSecret;

use crate::config::Config;

/// The broker benchmarks use unless told otherwise (the local RabbitMQ of the README).
pub const LOCAL_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A latency distribution in microseconds (1 µs to 10 min, 3 significant digits).
#[derive(Debug, Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Self(Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid static bounds"))
    }
}

impl Latencies {
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        self.0.saturating_record(us);
    }

    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The `q` quantile (0..=1) in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.0.max() as f64 / 1000.0
    }

    /// `p50 / p90 / p99 / max` in ms, or `-` when empty.
    pub fn summary(&self) -> String {
        if self.count() == 0 {
            return "-".into();
        }
        format!(
            "{:.1} / {:.1} / {:.1} / {:.1}",
            self.ms(0.5),
            self.ms(0.9),
            self.ms(0.99),
            self.max_ms()
        )
    }
}

/// Peak resident set size of a live process (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM:")
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// `12.3 MiB`, or `?` when unknown.
pub fn mib(kib: Option<u64>) -> String {
    kib.map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

/// One line about the machine: CPU, cores, load average (other builds share it).
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cpu}, {cores} cores, load average {}, flagrelay {}",
        load_average(),
        env!("CARGO_PKG_VERSION")
    )
}

/// The 1-minute load average, as the kernel reports it.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// A scratch directory for configurations, state and child logs; removed on drop unless
/// `FLAGRELAY_BENCH_KEEP` is set (to read the children's logs).
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "flagrelay-bench-{name}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("FLAGRELAY_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            eprintln!("kept {}", self.0.display());
        }
    }
}

/// A flagrelay subcommand running as a child process of this binary, configured by a file
/// written for it (secrets passed in its environment, never in the file or on the command
/// line). Killed when dropped.
#[derive(Debug)]
pub struct FlagrelayProcess {
    pub name: String,
    child: tokio::process::Child,
    pid: u32,
    /// Peak RSS seen so far (kept when the process has already exited).
    peak: Option<u64>,
}

impl FlagrelayProcess {
    /// Start `flagrelay --config <dir>/<name>.toml <args...>`; its output goes to
    /// `<dir>/<name>.log`.
    pub fn spawn(name: &str, args: &[&str], config: &Config, dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(format!("{name}.toml"));
        let text = toml::to_string(config).context("writing a child's configuration")?;
        std::fs::write(&path, text)?;
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let exe = std::env::current_exe().context("finding the flagrelay binary")?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("--config")
            .arg(&path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        // The child reads its settings from the file only, plus the secrets below.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("FLAGRELAY_") {
                cmd.env_remove(key);
            }
        }
        let secrets = [
            (
                "FLAGRELAY_GRAPH__CLIENT_SECRET",
                &config.graph.client_secret,
            ),
            ("FLAGRELAY_GRAPH__CLIENT_STATE", &config.graph.client_state),
            (
                "FLAGRELAY_PROOFPOINT__PASSWORD",
                &config.proofpoint.password,
            ),
            ("FLAGRELAY_SIGNING__KEY", &config.signing.key),
            ("FLAGRELAY_AMQP__URL", &config.amqp.url),
            ("FLAGRELAY_STATE__URL", &config.state.url),
        ];
        for (var, value) in secrets {
            if let Some(v) = value {
                cmd.env(var, v.expose_secret());
            }
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child.id().context("the child has a pid")?;
        Ok(Self {
            name: name.to_owned(),
            child,
            pid,
            peak: None,
        })
    }

    /// Peak RSS so far, in KiB (VmHWM only grows, so the last reading of a live process is
    /// its peak up to then).
    pub fn peak_rss_kib(&mut self) -> Option<u64> {
        if let Some(now) = peak_rss_kib(self.pid) {
            self.peak = Some(self.peak.map_or(now, |p| p.max(now)));
        }
        self.peak
    }

    /// Start measuring the peak RSS afresh (`/proc/PID/clear_refs`, "5" resets `VmHWM`).
    pub fn reset_peak_rss(&mut self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5");
        self.peak = None;
    }

    /// Wait for the process to exit by itself, sampling its peak RSS meanwhile (every
    /// 20 ms: a peak in its last instants can be missed).
    pub async fn wait(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        loop {
            self.peak_rss_kib();
            tokio::select! {
                status = self.child.wait() => return Ok(status?),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    /// Fail if the process has exited (pointing at its log).
    pub fn ensure_running(&mut self, dir: &Path) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!(
                "{} exited early ({status}); see {}",
                self.name,
                dir.join(format!("{}.log", self.name)).display()
            );
        }
        Ok(())
    }

    /// Read the peak RSS, then stop the process (SIGKILL: nothing of it is kept).
    /// Current resident memory split as (anonymous: heap and stacks; file-backed: mostly
    /// the binary's code), in KiB.
    pub fn rss_split_kib(&self) -> Option<(u64, u64)> {
        Some((
            proc_status_kib(self.pid, "RssAnon:")?,
            proc_status_kib(self.pid, "RssFile:")?,
        ))
    }

    pub async fn stop(mut self) -> Option<u64> {
        let peak = self.peak_rss_kib();
        let _ = self.child.kill().await;
        peak
    }
}

/// Wait until `check` answers true, polling every 20 ms; error after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Whether a flagrelay receiver answers Graph's validation handshake at `base` (it does as
/// soon as it listens; the broker is not needed for that).
pub async fn receiver_answers(client: &reqwest::Client, base: &str) -> bool {
    client
        .post(format!("{base}/graph/notifications?validationToken=bench"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// A loopback port free right now (for a child process to listen on).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A name prefix for this run's exchanges and queues.
pub fn unique_prefix(what: &str) -> String {
    format!(
        "flagrelay-bench-{what}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Another writer on the disk while a benchmark measures: writes 1 MiB blocks and fsyncs each,
/// in a file under `dir`, until dropped (the file is truncated every 256 MiB).
#[derive(Debug)]
pub struct DiskLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    started: Instant,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DiskLoad {
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        use std::io::Write as _;
        use std::sync::atomic::Ordering;
        let path = dir.join("disk-load.bin");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut file = std::fs::File::create(&path)?;
        let (s, w) = (stop.clone(), written.clone());
        let thread = std::thread::spawn(move || {
            let block = vec![0x5au8; 1 << 20];
            let mut since_truncate = 0u64;
            while !s.load(Ordering::Relaxed) {
                if file
                    .write_all(&block)
                    .and_then(|()| file.sync_data())
                    .is_err()
                {
                    return;
                }
                w.fetch_add(1, Ordering::Relaxed);
                since_truncate += 1;
                if since_truncate >= 256 {
                    since_truncate = 0;
                    let _ = file.set_len(0);
                    let _ = std::io::Seek::rewind(&mut file);
                }
            }
        });
        Ok(Self {
            stop,
            written,
            started: Instant::now(),
            thread: Some(thread),
        })
    }

    /// MiB written and synced per second so far.
    pub fn mib_per_second(&self) -> f64 {
        self.written.load(std::sync::atomic::Ordering::Relaxed) as f64
            / self.started.elapsed().as_secs_f64().max(1e-9)
    }
}

impl Drop for DiskLoad {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
