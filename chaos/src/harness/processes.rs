//! The Tally processes of a run: started with split roles, each with its own state
//! directory, log file and (for the API) port; killed, paused, resumed and restarted by the
//! nemesis; and watched, so that a process that exits on its own is noted and restarted
//! (as a supervisor such as Kubernetes would) rather than silently missing.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use tracing::{info, warn};

/// How every process of the run reaches Kafka and PostgreSQL, and where it keeps its files.
#[derive(Debug, Clone)]
pub struct TallySettings {
    /// The `tally` binary (a copy in the run directory, so a rebuild cannot swap it).
    pub binary: PathBuf,
    /// The run directory: `logs/<name>.log`, `state/<name>/`.
    pub dir: PathBuf,
    pub brokers: String,
    pub prefix: String,
    pub database_url: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// The saga's step deadline: short enough for a run to settle.
    pub saga_step_timeout_ms: u64,
}

impl TallySettings {
    /// `tally init`: topics and migrations, once, before any process starts.
    pub fn init(&self) -> anyhow::Result<()> {
        let log = self.log_file("init")?;
        let status = Command::new(&self.binary)
            .arg("init")
            .args(self.common_args())
            .env_clear()
            .envs(passthrough_env())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .status()
            .context("running tally init")?;
        anyhow::ensure!(
            status.success(),
            "tally init failed ({status}); see logs/init.log"
        );
        Ok(())
    }

    fn common_args(&self) -> Vec<String> {
        [
            ("--kafka-brokers", self.brokers.clone()),
            ("--topic-prefix", self.prefix.clone()),
            ("--database-url", self.database_url.clone()),
            ("--partitions", self.partitions.to_string()),
            ("--replication-factor", self.replication_factor.to_string()),
            ("--startup-timeout-secs", "120".to_string()),
            ("--database-connections", "6".to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }

    fn log_file(&self, name: &str) -> anyhow::Result<std::fs::File> {
        let dir = self.dir.join("logs");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.log"));
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))
    }
}

/// The environment a Tally process gets: the basics and its log filter, nothing of the
/// harness's own `TALLY_*` settings (a JWT secret there would turn authentication on).
fn passthrough_env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| matches!(k.as_str(), "PATH" | "HOME" | "LANG" | "TZ"))
        .collect();
    env.push(("TALLY_LOG".into(), "info".into()));
    env
}

/// One process of the run: its name, roles and, with the `api` role, its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    pub roles: &'static str,
    pub port: Option<u16>,
    /// Started by a storm, removed when it ends.
    pub extra: bool,
}

/// The processes the issue asks for: API-only, commands-only ×2, sagas-only,
/// projections-only, and one with every role; the two with the API on `base_port` and the
/// next port.
pub fn base_layout(base_port: u16) -> Vec<Spec> {
    let spec = |name: &str, roles, port| Spec {
        name: name.to_string(),
        roles,
        port,
        extra: false,
    };
    vec![
        spec("all", "api,commands,sagas,projections", Some(base_port + 1)),
        spec("api", "api", Some(base_port)),
        spec("commands-1", "commands", None),
        spec("commands-2", "commands", None),
        spec("sagas", "sagas", None),
        spec("projections", "projections", None),
    ]
}

#[derive(Debug)]
enum State {
    Running(Child),
    Paused(Child),
    Down,
}

#[derive(Debug)]
struct Proc {
    spec: Spec,
    state: State,
    /// Held by a fault (killed, paused): the watcher leaves it alone, the nemesis picks
    /// other targets.
    held: bool,
}

/// Every process of the run.
pub struct Processes {
    settings: TallySettings,
    procs: Mutex<BTreeMap<String, Proc>>,
    /// Processes that exited without being told to: `name: status`.
    unplanned: Mutex<Vec<String>>,
}

impl Processes {
    pub fn new(settings: TallySettings) -> Self {
        Self {
            settings,
            procs: Mutex::new(BTreeMap::new()),
            unplanned: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Proc>> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn(&self, spec: &Spec) -> anyhow::Result<Child> {
        let s = &self.settings;
        let log = s.log_file(&spec.name)?;
        let state_dir = s.dir.join("state").join(&spec.name);
        let mut command = Command::new(&s.binary);
        command
            .arg("serve")
            .args(s.common_args())
            .args(["--roles", spec.roles])
            .arg("--state-dir")
            .arg(&state_dir)
            .args([
                "--saga-step-timeout-ms",
                &s.saga_step_timeout_ms.to_string(),
            ])
            .args(["--shutdown-timeout-secs", "10"])
            .env_clear()
            .envs(passthrough_env())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        if let Some(port) = spec.port {
            command.args(["--listen", &format!("127.0.0.1:{port}")]);
        }
        command
            .spawn()
            .with_context(|| format!("starting tally process {}", spec.name))
    }

    /// Starts a new process (or starts again one that is down).
    pub fn start(&self, spec: Spec) -> anyhow::Result<()> {
        let child = self.spawn(&spec)?;
        info!(process = %spec.name, roles = spec.roles, pid = child.id(), "started");
        let mut procs = self.lock();
        let held = procs.get(&spec.name).is_some_and(|p| p.held);
        procs.insert(
            spec.name.clone(),
            Proc {
                spec,
                state: State::Running(child),
                held,
            },
        );
        Ok(())
    }

    /// Starts again a process that is down (after a kill).
    pub fn restart(&self, name: &str) -> anyhow::Result<()> {
        let spec = {
            let procs = self.lock();
            let p = procs.get(name).context("no such process")?;
            if !matches!(p.state, State::Down) {
                return Ok(());
            }
            p.spec.clone()
        };
        self.start(spec)
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&self, name: &str) -> anyhow::Result<u32> {
        let mut procs = self.lock();
        let p = procs.get_mut(name).context("no such process")?;
        let state = std::mem::replace(&mut p.state, State::Down);
        let (State::Running(mut child) | State::Paused(mut child)) = state else {
            anyhow::bail!("{name} is not running");
        };
        let pid = child.id();
        child.kill().with_context(|| format!("SIGKILL of {name}"))?;
        child.wait().with_context(|| format!("reaping {name}"))?;
        Ok(pid)
    }

    /// SIGSTOP.
    pub fn pause(&self, name: &str) -> anyhow::Result<u32> {
        let mut procs = self.lock();
        let p = procs.get_mut(name).context("no such process")?;
        let State::Running(child) = std::mem::replace(&mut p.state, State::Down) else {
            anyhow::bail!("{name} is not running");
        };
        let pid = child.id();
        let sent = signal("STOP", pid);
        p.state = match sent {
            Ok(()) => State::Paused(child),
            Err(_) => State::Running(child),
        };
        sent.map(|()| pid)
    }

    /// SIGCONT of a paused process.
    pub fn resume(&self, name: &str) -> anyhow::Result<()> {
        let mut procs = self.lock();
        let p = procs.get_mut(name).context("no such process")?;
        match std::mem::replace(&mut p.state, State::Down) {
            State::Paused(child) => {
                let sent = signal("CONT", child.id());
                p.state = State::Running(child);
                sent
            }
            other => {
                p.state = other;
                Ok(())
            }
        }
    }

    /// SIGTERM (SIGCONT first if paused), waiting up to `grace` for a clean exit, then
    /// SIGKILL. The process is then down.
    pub async fn terminate(&self, name: &str, grace: Duration) -> anyhow::Result<()> {
        self.send_term(name)?;
        self.await_down(&[name.to_string()], grace).await;
        Ok(())
    }

    fn send_term(&self, name: &str) -> anyhow::Result<()> {
        let mut procs = self.lock();
        let p = procs.get_mut(name).context("no such process")?;
        p.held = true;
        match &p.state {
            State::Running(c) => signal("TERM", c.id()),
            State::Paused(c) => signal("TERM", c.id()).and_then(|()| signal("CONT", c.id())),
            State::Down => Ok(()),
        }
    }

    /// Waits until every process of `names` has exited, SIGKILLing what still runs after
    /// `grace`.
    async fn await_down(&self, names: &[String], grace: Duration) {
        let deadline = Instant::now() + grace;
        loop {
            let late = Instant::now() >= deadline;
            let mut running = 0;
            {
                let mut procs = self.lock();
                for name in names {
                    let Some(p) = procs.get_mut(name) else {
                        continue;
                    };
                    let exited = match &mut p.state {
                        State::Running(c) | State::Paused(c) => {
                            c.try_wait().map_or(true, |s| s.is_some())
                        }
                        State::Down => continue,
                    };
                    if !exited && !late {
                        running += 1;
                        continue;
                    }
                    if let State::Running(mut c) | State::Paused(mut c) =
                        std::mem::replace(&mut p.state, State::Down)
                    {
                        if !exited {
                            warn!(process = %name, "did not stop within {grace:?}; SIGKILL");
                            let _ = c.kill();
                        }
                        let _ = c.wait();
                    }
                }
            }
            if running == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Forgets a process that is down (an extra of a storm).
    pub fn remove(&self, name: &str) {
        let mut procs = self.lock();
        if procs
            .get(name)
            .is_some_and(|p| matches!(p.state, State::Down))
        {
            procs.remove(name);
        }
    }

    /// Marks `name` held by a fault, if it is a base process that runs and is not held yet.
    /// The nemesis picks among [`Processes::free`] and then claims.
    pub fn claim(&self, name: &str) -> bool {
        let mut procs = self.lock();
        match procs.get_mut(name) {
            Some(p) if !p.held && !p.spec.extra && matches!(p.state, State::Running(_)) => {
                p.held = true;
                true
            }
            _ => false,
        }
    }

    pub fn release(&self, name: &str) {
        if let Some(p) = self.lock().get_mut(name) {
            p.held = false;
        }
    }

    /// The base processes that run and no fault holds, by name.
    pub fn free(&self) -> Vec<String> {
        self.lock()
            .values()
            .filter(|p| !p.held && !p.spec.extra && matches!(p.state, State::Running(_)))
            .map(|p| p.spec.name.clone())
            .collect()
    }

    /// Base URLs of the API processes that run (not paused, not killed).
    pub fn api_urls(&self) -> Vec<String> {
        self.lock()
            .values()
            .filter(|p| matches!(p.state, State::Running(_)))
            .filter_map(|p| p.spec.port)
            .map(|port| format!("http://127.0.0.1:{port}"))
            .collect()
    }

    /// Base URLs of every API process, whatever its state.
    pub fn all_api_urls(&self) -> Vec<String> {
        self.lock()
            .values()
            .filter_map(|p| p.spec.port)
            .map(|port| format!("http://127.0.0.1:{port}"))
            .collect()
    }

    /// Notes every process that exited without being told to, and starts it again.
    pub fn reap_unplanned(&self) {
        let exited: Vec<(Spec, String)> = {
            let mut procs = self.lock();
            procs
                .values_mut()
                .filter(|p| !p.held)
                .filter_map(|p| {
                    let State::Running(child) = &mut p.state else {
                        return None;
                    };
                    let status = child.try_wait().ok().flatten()?;
                    p.state = State::Down;
                    Some((p.spec.clone(), status.to_string()))
                })
                .collect()
        };
        for (spec, status) in exited {
            warn!(process = %spec.name, %status, "exited on its own; starting it again");
            self.unplanned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("{}: {status}", spec.name));
            if let Err(e) = self.start(spec) {
                warn!("restarting: {e:#}");
            }
        }
    }

    /// The processes that exited on their own, `name: status`.
    pub fn unplanned_exits(&self) -> Vec<String> {
        self.unplanned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every process that runs or is paused, by name.
    pub fn names(&self) -> Vec<String> {
        self.lock()
            .values()
            .filter(|p| !matches!(p.state, State::Down))
            .map(|p| p.spec.name.clone())
            .collect()
    }

    /// Stops every process (SIGTERM to all, then SIGKILL to what runs after `grace`).
    pub async fn stop_all(&self, grace: Duration) {
        let names = self.names();
        for name in &names {
            if let Err(e) = self.send_term(name) {
                warn!(process = %name, "stopping: {e:#}");
            }
        }
        self.await_down(&names, grace).await;
    }
}

/// `kill -<sig> <pid>` (the workspace forbids the unsafe code a libc call would need).
fn signal(sig: &str, pid: u32) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running kill -{sig} {pid}"))?;
    anyhow::ensure!(status.success(), "kill -{sig} {pid}: {status}");
    Ok(())
}

/// Waits until `<url>/readyz` answers 200, up to `timeout`.
pub async fn wait_ready(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ready = http
            .get(format!("{url}/readyz"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{url} not ready within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
