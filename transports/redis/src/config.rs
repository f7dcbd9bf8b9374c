//! Where the Redis server is and which namespace a deployment uses.

use std::time::Duration;

/// The server used when neither the configuration nor [`URL_ENV`] names one.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379/";

/// Environment variable read by [`RedisConfig::from_env`]: a `redis://` or `rediss://` URL
/// (user, password and database number included).
pub const URL_ENV: &str = "SWITCHYARD_REDIS_URL";

/// Default namespace: the prefix of every key and channel.
pub const DEFAULT_NAMESPACE: &str = "switchyard";

/// Connection and naming settings shared by the registry and the transport.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// Server URL, `redis://[user:password@]host:port[/db]` or `rediss://` for TLS.
    pub url: String,
    /// Prefix of every key and channel; deployments sharing one Redis use different ones.
    pub namespace: String,
    /// How long a command waits for its answer before it fails.
    pub response_timeout: Duration,
    /// For `rediss://` URLs: a PEM file of the CA that signed the server's certificate,
    /// when it is not in the system's trust store (needs feature `tls`).
    pub tls_ca_file: Option<std::path::PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: DEFAULT_URL.to_string(),
            namespace: DEFAULT_NAMESPACE.to_string(),
            response_timeout: Duration::from_secs(5),
            tls_ca_file: None,
        }
    }
}

impl RedisConfig {
    /// Defaults, with the URL from [`URL_ENV`] when it is set.
    pub fn from_env() -> RedisConfig {
        let mut cfg = RedisConfig::default();
        if let Ok(url) = std::env::var(URL_ENV)
            && !url.trim().is_empty()
        {
            cfg.url = url.trim().to_string();
        }
        cfg
    }

    /// Uses `url`.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// Trusts the CA in this PEM file for `rediss://` servers (needs feature `tls`).
    pub fn tls_ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.tls_ca_file = Some(path.into());
        self
    }

    /// Uses `namespace` as the prefix of every key and channel.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The URL with its password replaced by `***`, for messages and logs.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// `host:port` of the URL, for a plain TCP probe.
    fn host_port(&self) -> Option<String> {
        let rest = self.url.split_once("://")?.1;
        let authority = rest.split('/').next()?;
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if hostport.is_empty() {
            return None;
        }
        Some(if hostport.contains(':') && !hostport.ends_with(']') {
            hostport.to_string()
        } else {
            format!("{hostport}:6379")
        })
    }
}

fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_string();
    };
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    let sep = if rest.contains('/') { "/" } else { "" };
    format!("{scheme}://{user}:***@{host}{sep}{path}")
}

/// Whether the configured server accepts a TCP connection within `within`.
pub fn server_answers(cfg: &RedisConfig, within: Duration) -> bool {
    use std::net::ToSocketAddrs;
    let Some(hp) = cfg.host_port() else {
        return false;
    };
    let Ok(addrs) = hp.to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| std::net::TcpStream::connect_timeout(&a, within).is_ok())
}

/// For tests: whether the Redis server of [`RedisConfig::from_env`] answers. When it does
/// not, prints why and returns `false`, except under `CI=true`, where it panics: CI must
/// run every broker test.
pub fn ready_for_tests() -> bool {
    let cfg = RedisConfig::from_env();
    if server_answers(&cfg, Duration::from_secs(2)) {
        return true;
    }
    let why = format!(
        "Redis does not answer at {} (set {URL_ENV}, or start it: ./scripts/test starts a \
         local server)",
        cfg.redacted_url()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI needs Redis: {why}");
    }
    eprintln!("skipped: {why}");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://user:secret@host:6380/2"),
            "redis://user:***@host:6380/2"
        );
        assert_eq!(redact("rediss://:secret@host"), "rediss://:***@host");
        assert_eq!(redact("redis://host:6379/"), "redis://host:6379/");
    }

    #[test]
    fn host_port_defaults_the_port() {
        let c = RedisConfig::default().url("redis://:pw@example.org/1");
        assert_eq!(c.host_port().as_deref(), Some("example.org:6379"));
        let c = RedisConfig::default().url("redis://127.0.0.1:7000");
        assert_eq!(c.host_port().as_deref(), Some("127.0.0.1:7000"));
    }
}
