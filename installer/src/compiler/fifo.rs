//! The seed's two containers: `dev` (privileged, with kernel headers and gcc) serves compile
//! requests from a FIFO in the shared `/cmd` directory; `modulus` sends one and waits.
//!
//! `/cmd/request`: one JSON [`CompileRequest`]. `/cmd/response`: the exit code on the first line,
//! then the log. `/cmd/dev.heartbeat` is touched every [`HEARTBEAT`] while `dev` serves, so a
//! `dev` container that is not there, or dies mid-build, is noticed instead of waited on forever.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use crate::compiler::compile::{self, CompileRequest};
use crate::{Error, Result};

pub const HEARTBEAT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct Pipes {
    pub request: PathBuf,
    pub response: PathBuf,
    pub heartbeat: PathBuf,
}

impl Pipes {
    pub fn new(cmd_dir: &Path) -> Self {
        Self {
            request: cmd_dir.join("request"),
            response: cmd_dir.join("response"),
            heartbeat: cmd_dir.join("dev.heartbeat"),
        }
    }

    /// Create both FIFOs (either side may come first).
    pub fn create(&self) -> Result<()> {
        for fifo in [&self.request, &self.response] {
            match nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(Error::io("creating the FIFO", fifo, e.into())),
            }
        }
        Ok(())
    }

    /// Seconds since `dev` last showed signs of life, or `None` when it never did.
    fn heartbeat_age(&self) -> Option<Duration> {
        let modified = std::fs::metadata(&self.heartbeat).and_then(|m| m.modified()).ok()?;
        Some(SystemTime::now().duration_since(modified).unwrap_or_default())
    }
}

/// The dev side: serve requests until the process is stopped.
pub fn serve(pipes: &Pipes, work: &Path) -> Result<()> {
    pipes.create()?;
    let alive = Arc::new(AtomicBool::new(true));
    let beat = {
        let path = pipes.heartbeat.clone();
        let alive = alive.clone();
        std::thread::spawn(move || {
            while alive.load(Ordering::Relaxed) {
                let _ = std::fs::write(&path, format!("{}\n", std::process::id()));
                std::thread::sleep(HEARTBEAT);
            }
        })
    };
    info!(request = %pipes.request.display(), "serving compile requests");
    let result = loop {
        let mut text = String::new();
        match std::fs::File::open(&pipes.request).and_then(|mut f| f.read_to_string(&mut text)) {
            Ok(_) if text.trim().is_empty() => continue,
            Ok(_) => {}
            Err(e) => break Err(Error::io("reading", &pipes.request, e)),
        }
        let (code, log) = match serde_json::from_str::<CompileRequest>(&text) {
            Err(e) => (2, format!("the request is not a compile request: {e}\n")),
            Ok(request) => {
                info!(kernel = ?request.kernel_release, source = %request.driver_source, "compile request");
                match compile::compile(&request, work) {
                    Ok(done) => {
                        (0, format!("built {} ({} modules)\n", done.output.display(), done.manifest.modules.len()))
                    }
                    Err(error) => {
                        let tail = match &error {
                            Error::Build { log, .. } => tail_of(log, 40),
                            _ => String::new(),
                        };
                        (1, format!("{error}\n{tail}"))
                    }
                }
            }
        };
        let answer = format!("{code}\n{log}");
        if let Err(e) = std::fs::OpenOptions::new()
            .write(true)
            .open(&pipes.response)
            .and_then(|mut f| f.write_all(answer.as_bytes()))
        {
            warn!(error = %e, "the coordinator went away before the answer");
        }
    };
    alive.store(false, Ordering::Relaxed);
    let _ = beat.join();
    result
}

fn tail_of(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.into_iter().rev().map(|l| format!("{l}\n")).collect()
}

/// The dev container's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub code: i32,
    pub log: String,
}

/// The coordinator side: wait (up to `dev_wait`) for `dev` to be serving, send the request, and
/// wait (up to `timeout`) for the answer, giving up early if `dev` stops beating.
pub fn request(pipes: &Pipes, request: &CompileRequest, dev_wait: Duration, timeout: Duration) -> Result<Answer> {
    pipes.create()?;
    let started = Instant::now();
    let gone = Error::DevContainer;
    loop {
        match pipes.heartbeat_age() {
            Some(age) if age < HEARTBEAT * 5 => break,
            _ if started.elapsed() > dev_wait => {
                return Err(gone(format!(
                    "not serving {} after {}s (no fresh heartbeat at {}): is the dev container running `nvidia-installer dev-serve`?",
                    pipes.request.display(),
                    dev_wait.as_secs(),
                    pipes.heartbeat.display()
                )));
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    let body = serde_json::to_vec(request)
        .map_err(|e| Error::Encode { what: "the compile request", reason: e.to_string() })?;
    // Opening a FIFO blocks until the other end opens it: do it where a dead peer can't hang us.
    let (sender, receiver) = std::sync::mpsc::channel::<std::io::Result<String>>();
    let request_path = pipes.request.clone();
    let response_path = pipes.response.clone();
    std::thread::spawn(move || {
        let result = (|| {
            std::fs::OpenOptions::new().write(true).open(&request_path)?.write_all(&body)?;
            let mut answer = String::new();
            std::fs::File::open(&response_path)?.read_to_string(&mut answer)?;
            Ok(answer)
        })();
        let _ = sender.send(result);
    });
    let deadline = Instant::now() + timeout;
    loop {
        match receiver.recv_timeout(Duration::from_millis(500)) {
            Ok(Ok(answer)) => {
                let (code, log) = answer.split_once('\n').unwrap_or((answer.as_str(), ""));
                let code = code
                    .trim()
                    .parse::<i32>()
                    .map_err(|_| gone(format!("answered without an exit code (it stopped mid-answer?): {answer:?}")))?;
                return Ok(Answer { code, log: log.to_owned() });
            }
            Ok(Err(e)) => return Err(Error::io("talking to the dev container through", &pipes.request, e)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(gone("the exchange thread ended".into()));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some(age) = pipes.heartbeat_age()
            && age > HEARTBEAT * 5
        {
            return Err(gone(format!("stopped during the build (no heartbeat for {}s)", age.as_secs())));
        }
        if Instant::now() > deadline {
            return Err(gone(format!("no answer within {}", humantime::format_duration(timeout))));
        }
    }
}
