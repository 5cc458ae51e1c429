//! Typed configuration of `herald serve`, and the parsers for its units.
//!
//! The command line (`cli`) turns flags and environment variables into a
//! [`Config`]; everything below it takes the typed struct and never reads
//! the environment, so tests build configs directly.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Errors in configuration values. Each names the flag at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that must be positive is zero.
    #[error("{flag} must be greater than zero")]
    Zero {
        /// The flag.
        flag: &'static str,
    },
    /// A value is out of its range.
    #[error("{flag}: {message}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// A secret (a token): never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The value, for comparison only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Which origins may use the API from a browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cors {
    /// No CORS headers (same-origin only).
    Off,
    /// Any origin (`Access-Control-Allow-Origin: *`).
    Any,
    /// Only these origins.
    Origins(Vec<String>),
}

/// The default public listener.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Default interval between SSE heartbeat comments and WebSocket pings.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
/// Default reconnection delay announced to SSE clients.
pub const DEFAULT_SSE_RETRY: Duration = Duration::from_secs(2);
/// Default events kept per channel.
pub const DEFAULT_HISTORY_SIZE: usize = 1000;
/// Default time an event stays in history.
pub const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(600);
/// Default largest publish body.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Default bytes a connection may fall behind before it is cut off.
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 1024 * 1024;
/// Default time to finish after SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default `--drain-delay`: long enough for Kubernetes to take a pod out of
/// its Services' endpoints after the SIGTERM.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(5);
/// Default time a blocked write may take before the connection is dropped.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default interval of re-evaluating watched Deployments without a change.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(30);
/// Most channels one connection may subscribe to.
pub const MAX_CHANNELS_PER_CONNECTION: usize = 256;
/// Largest message a WebSocket client may send.
pub const MAX_WS_CLIENT_MESSAGE_BYTES: usize = 16 * 1024;

/// What a client can make a node hold, and how long it may take: the
/// protections against hostile clients (README, "Limits and protections").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// A new connection must send its first request head within this.
    pub head_timeout: Duration,
    /// A kept-alive connection must send its next request head within this
    /// of the previous response (so it is also the idle timeout).
    pub keep_alive_timeout: Duration,
    /// A request body must arrive within this.
    pub body_timeout: Duration,
    /// Connections still sending their first request head; more are closed
    /// at once.
    pub max_handshakes: usize,
    /// Open connections per client address (0 = no limit).
    pub max_connections_per_ip: usize,
    /// Channels the node keeps; subscribing to or publishing on a new one
    /// beyond this is refused with 503.
    pub max_channels: usize,
}

/// Default for [`Limits::head_timeout`].
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`Limits::keep_alive_timeout`].
pub const DEFAULT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`Limits::body_timeout`].
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`Limits::max_handshakes`].
pub const DEFAULT_MAX_HANDSHAKES: usize = 8192;
/// Default for [`Limits::max_connections_per_ip`].
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 4096;
/// Default for [`Limits::max_channels`].
pub const DEFAULT_MAX_CHANNELS: usize = 100_000;

impl Default for Limits {
    fn default() -> Self {
        Self {
            head_timeout: DEFAULT_HEAD_TIMEOUT,
            keep_alive_timeout: DEFAULT_KEEP_ALIVE_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            max_channels: DEFAULT_MAX_CHANNELS,
        }
    }
}

/// Configuration of a hub node.
#[derive(Debug, Clone)]
pub struct Config {
    /// Public listener.
    pub listen: SocketAddr,
    /// This node's name (in `/status`).
    pub node_name: String,
    /// SSE heartbeat comment and WebSocket ping interval.
    pub heartbeat: Duration,
    /// `retry:` sent at the start of every SSE stream.
    pub sse_retry: Duration,
    /// Events kept per channel.
    pub history_size: usize,
    /// Time an event stays in history.
    pub history_ttl: Duration,
    /// Largest publish body, in bytes.
    pub max_message_bytes: usize,
    /// Bytes a connection may have queued before it is cut off as slow.
    pub max_queued_bytes: usize,
    /// Token publishers must send as `Authorization: Bearer`.
    pub publish_token: Option<Secret>,
    /// Allow publishing without a token from non-loopback addresses.
    pub allow_anonymous_publish: bool,
    /// Cross-origin policy.
    pub cors: Cors,
    /// Time to finish after SIGTERM/SIGINT, the drain delay included.
    pub shutdown_grace: Duration,
    /// After SIGTERM/SIGINT: how long the listener stays open, `/readyz`
    /// answering 503 and new subscriptions refused while open streams keep
    /// flowing, before the streams end (0 = at once). At most half of
    /// `shutdown_grace` is used ([`Config::drain`]).
    pub drain_delay: Duration,
    /// A write blocked this long drops the connection.
    pub write_timeout: Duration,
    /// Timeouts and bounds on what clients can make the node hold.
    pub limits: Limits,
    /// Kubernetes sources (Deployment versions, Events).
    pub kube: crate::k8s::Options,
    /// The spa-reloader compatible WebSocket listener, if any.
    pub spa_compat_listen: Option<SocketAddr>,
    /// Clustering (peers, the internal listener).
    pub cluster: crate::cluster::Options,
}

impl Config {
    /// The drain delay in effect: `drain_delay`, but at most half of the
    /// grace period, so that streams always have time to end within it
    /// (`--shutdown-grace 2s` alone keeps working).
    pub fn drain(&self) -> Duration {
        self.drain_delay.min(self.shutdown_grace / 2)
    }

    /// The `herald serve` defaults, listening on `listen`.
    pub fn defaults(listen: SocketAddr) -> Self {
        Self {
            listen,
            node_name: default_node_name(),
            heartbeat: DEFAULT_HEARTBEAT,
            sse_retry: DEFAULT_SSE_RETRY,
            history_size: DEFAULT_HISTORY_SIZE,
            history_ttl: DEFAULT_HISTORY_TTL,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            publish_token: None,
            allow_anonymous_publish: false,
            cors: Cors::Off,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            drain_delay: DEFAULT_DRAIN_DELAY,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            limits: Limits::default(),
            kube: crate::k8s::Options {
                resync: DEFAULT_RESYNC,
                ..crate::k8s::Options::default()
            },
            spa_compat_listen: None,
            cluster: crate::cluster::Options::default(),
        }
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("--heartbeat", self.heartbeat.is_zero()),
            ("--history-ttl", self.history_ttl.is_zero()),
            ("--max-message-bytes", self.max_message_bytes == 0),
            ("--max-queued-bytes", self.max_queued_bytes == 0),
            ("--write-timeout", self.write_timeout.is_zero()),
            ("--head-timeout", self.limits.head_timeout.is_zero()),
            (
                "--keep-alive-timeout",
                self.limits.keep_alive_timeout.is_zero(),
            ),
            ("--body-timeout", self.limits.body_timeout.is_zero()),
            ("--max-handshakes", self.limits.max_handshakes == 0),
            ("--max-channels", self.limits.max_channels == 0),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, zero)| *zero) {
            return Err(ConfigError::Zero { flag });
        }
        if self.max_queued_bytes < self.max_message_bytes {
            return Err(ConfigError::Invalid {
                flag: "--max-queued-bytes",
                message: format!(
                    "must be at least --max-message-bytes ({} bytes), or no event could ever be queued",
                    self.max_message_bytes
                ),
            });
        }
        if self
            .publish_token
            .as_ref()
            .is_some_and(|t| t.expose().is_empty())
        {
            return Err(ConfigError::Invalid {
                flag: "--publish-token",
                message: "must not be empty".into(),
            });
        }
        if self.kube.resync.is_zero() {
            return Err(ConfigError::Zero { flag: "--resync" });
        }
        if let Some(compat) = self.spa_compat_listen
            && compat.port() != 0
            && compat.port() == self.listen.port()
            && (compat.ip() == self.listen.ip()
                || compat.ip().is_unspecified()
                || self.listen.ip().is_unspecified())
        {
            return Err(ConfigError::Invalid {
                flag: "--spa-compat-listen",
                message: format!(
                    "{compat} (SPA_WEBSOCKET_PORT) collides with --listen {}; give one of them another port",
                    self.listen
                ),
            });
        }
        if self.spa_compat_listen.is_some() && self.kube.deployments.is_empty() {
            return Err(ConfigError::Invalid {
                flag: "--spa-compat-listen",
                message: "announces Deployment versions, but no Deployment is watched; add --watch-deployment, --watch-deployments or --watch-selector".into(),
            });
        }
        if let Err((flag, message)) = self.cluster.validate() {
            return Err(ConfigError::Invalid { flag, message });
        }
        if self.cluster.enabled() && !crate::hub::valid_origin(&self.node_name) {
            return Err(ConfigError::Invalid {
                flag: "--node-name",
                message: format!(
                    "{:?}: in a cluster the node name is its origin: 1 to 63 characters of a-z A-Z 0-9 . _ -",
                    self.node_name
                ),
            });
        }
        if self.node_name.is_empty() {
            return Err(ConfigError::Invalid {
                flag: "--node-name",
                message: "must not be empty".into(),
            });
        }
        Ok(())
    }

    /// The hub's part of the configuration.
    pub fn hub(&self) -> crate::hub::Config {
        crate::hub::Config {
            history_size: self.history_size,
            history_ttl: self.history_ttl,
            max_queued_bytes: self.max_queued_bytes,
            max_channels: self.limits.max_channels,
            origin: self
                .cluster
                .enabled()
                .then(|| std::sync::Arc::from(self.node_name.as_str())),
        }
    }
}

/// The host's name, for `--node-name`'s default.
pub fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "herald".to_owned())
}

/// Parses a socket address (`HOST:PORT` with an IP host), with an error
/// that shows the form.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("expected IP:PORT, e.g. 0.0.0.0:8080 or [::]:8080, got {s:?}"))
}

/// Parses a boolean environment value: `1/0`, `true/false`, `yes/no`
/// (any case).
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        _ => Err(format!("expected 1/0, true/false or yes/no, got {s:?}")),
    }
}

/// Parses a duration such as `10s`, `5m`, `250ms` or `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{e}; write a duration such as 10s, 5m or 250ms"))
}

/// Parses a size such as `64KiB`, `1MiB`, `512B`, `1000` (bytes) or `2kB`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let hint = "write a size such as 64KiB, 1MiB or 4096";
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; {hint}"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("unknown size unit {other:?}; {hint}")),
    };
    n.checked_mul(mult)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_delay_leaves_half_the_grace_to_end_streams() {
        let mut c = Config::defaults("127.0.0.1:0".parse().unwrap());
        assert_eq!(c.drain(), DEFAULT_DRAIN_DELAY);
        c.shutdown_grace = Duration::from_secs(2);
        assert_eq!(c.drain(), Duration::from_secs(1));
        c.drain_delay = Duration::ZERO;
        assert_eq!(c.drain(), Duration::ZERO);
    }

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2 kB"), Ok(2000));
        assert_eq!(parse_size("10B"), Ok(10));
        for bad in ["", "KiB", "1.5MiB", "-1", "1XB", "99999999999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_parse_in_the_documented_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("10").is_err());
    }

    #[test]
    fn validation_names_the_flag() {
        let mut c = Config::defaults("127.0.0.1:0".parse().unwrap());
        assert!(c.validate().is_ok());
        c.heartbeat = Duration::ZERO;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--heartbeat")
        );
        let mut c = Config::defaults("127.0.0.1:0".parse().unwrap());
        c.max_queued_bytes = 10;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--max-queued-bytes")
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
