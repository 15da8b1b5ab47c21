//! A `kvplane serve` child process, as the soak benchmark and the engine replay run it:
//! config and log written next to each other, started until its socket accepts, SIGTERM
//! and wait on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvplane_daemon::config::{Config, ConfigError};

#[derive(Debug, thiserror::Error)]
pub enum ServeChildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting {exe} serve: {source}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("daemon {reason}; log {log}:\n{tail}")]
    Start {
        reason: String,
        log: PathBuf,
        tail: String,
    },
}

/// A running `kvplane serve`; SIGTERM and wait (then SIGKILL) on drop.
pub struct ServeChild {
    child: Child,
    pub log: PathBuf,
}

/// The last `lines` lines of a log file (empty if unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl ServeChild {
    /// Writes `settings` as TOML to `config`, starts `exe serve --config config` with its
    /// log in `log`, and waits up to `timeout` for `socket` to accept a connection.
    pub fn start(
        exe: &Path,
        config: &Path,
        log: &Path,
        settings: &Config,
        socket: &Path,
        timeout: Duration,
    ) -> Result<ServeChild, ServeChildError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| ServeChildError::Io { what, path, source }
        };
        let text = settings.to_toml()?;
        std::fs::write(config, text).map_err(io("writing daemon config", config))?;
        let log_file = std::fs::File::create(log).map_err(io("creating daemon log", log))?;
        let child = Command::new(exe)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("KVPLANE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|source| ServeChildError::Spawn {
                exe: exe.to_path_buf(),
                source,
            })?;
        let mut d = ServeChild {
            child,
            log: log.to_path_buf(),
        };
        let t0 = Instant::now();
        loop {
            if let Ok(Some(status)) = d.child.try_wait() {
                return Err(d.start_error(format!("exited during start-up with {status}")));
            }
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Ok(d);
            }
            if t0.elapsed() > timeout {
                return Err(d.start_error(format!("had no socket after {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_error(&self, reason: String) -> ServeChildError {
        ServeChildError::Start {
            reason,
            log: self.log.clone(),
            tail: self.tail(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last 20 lines of its log.
    pub fn tail(&self) -> String {
        log_tail(&self.log, 20)
    }

    /// SIGTERM, then wait up to `timeout` (SIGKILL after); whether it exited successfully.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        if self.alive() {
            self.terminate(Duration::from_secs(10));
        }
    }
}
