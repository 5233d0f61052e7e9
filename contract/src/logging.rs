//! Logging set-up shared by both binaries: `RUST_LOG` filter (default `info`), text or JSON lines
//! on stderr.

use tracing_subscriber::EnvFilter;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Install the global subscriber (once; later calls change nothing).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The last line a failing command prints on stderr, in the log format: `PROGRAM: ERROR` as text,
/// or one JSON object with the fields a JSON log line has (`timestamp`, `level`, `target`,
/// `message`) plus `error`, for log pipelines that parse every line.
pub fn fatal_line(format: LogFormat, program: &str, error: &str) -> String {
    match format {
        LogFormat::Text => format!("{program}: {error}"),
        LogFormat::Json => serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "level": "ERROR",
            "target": program,
            "message": "failed",
            "error": error,
        })
        .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_error_line_follows_the_log_format() {
        assert_eq!(fatal_line(LogFormat::Text, "nvidia-installer", "no bucket"), "nvidia-installer: no bucket");
        let line = fatal_line(LogFormat::Json, "nvidia-installer", "bucket \"b\": HTTP 403\nsecond line");
        assert!(!line.contains('\n'), "one line: {line}");
        let value: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(value["level"], "ERROR");
        assert_eq!(value["error"], "bucket \"b\": HTTP 403\nsecond line");
        assert_eq!(value["target"], "nvidia-installer");
        assert!(value["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
}
