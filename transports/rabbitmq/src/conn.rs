//! Connecting to the broker, declaring the exchanges, and turning lapin's errors into
//! Switchyard errors that say what to do.

use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind, ExchangeKind};
use switchyard_core::Error;

use crate::NAME;
use crate::config::{Mode, RabbitConfig};
use crate::names::Names;

/// One live connection with the channels every send shares.
pub(crate) struct Live {
    pub(crate) conn: Connection,
    /// Publisher confirms on: every publish of the session goes through it, in order.
    pub(crate) publish: Channel,
    /// Counts connections made, so consumers know which connection they belong to.
    pub(crate) generation: u64,
}

impl Live {
    /// Whether the connection and the publishing channel are still up.
    pub(crate) fn is_up(&self) -> bool {
        self.conn.status().connected() && self.publish.status().connected()
    }
}

/// The TLS settings of an `amqps://` URL (`None` for `amqp://`): the system roots, or the
/// CA of `tls_ca_file`. A build without feature `tls` refuses `amqps://`.
fn tls_config(
    cfg: &RabbitConfig,
    amqps: bool,
) -> Result<Option<lapin::tcp::OwnedTLSConfig>, Error> {
    if !amqps {
        return Ok(None);
    }
    #[cfg(not(feature = "tls"))]
    {
        Err(Error::Config(format!(
            "`{}` asks for TLS (amqps://), which this build does not include: enable feature \
             `tls` of switchyard-rabbitmq (`rabbitmq-tls` of switchyard), or use amqp://",
            cfg.redacted_url()
        )))
    }
    #[cfg(feature = "tls")]
    {
        let cert_chain = match &cfg.tls_ca_file {
            None => None,
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                Error::Config(format!(
                    "cannot read the CA file {} for `{}`: {e}; give the PEM file of the CA \
                     that signed the broker's certificate",
                    path.display(),
                    cfg.redacted_url()
                ))
            })?),
        };
        Ok(Some(lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain,
        }))
    }
}

/// Parses the URL; a malformed one is [`Error::Config`] naming the expected form.
pub(crate) fn parse_url(cfg: &RabbitConfig) -> Result<AMQPUri, Error> {
    cfg.url.parse::<AMQPUri>().map_err(|e| {
        Error::Config(format!(
            "invalid AMQP URL `{}`: {e}; expected amqp://user:password@host:5672/vhost \
             (or amqps:// for TLS; set it in SWITCHYARD_AMQP_URL or RabbitConfig::url)",
            cfg.redacted_url()
        ))
    })
}

/// Connects, opens the publishing channel (confirms on) and declares the exchanges,
/// all within `cfg.connect_timeout`.
pub(crate) async fn connect(
    cfg: &RabbitConfig,
    names: &Names,
    generation: u64,
) -> Result<Live, Error> {
    let uri = parse_url(cfg)?;
    let tls = tls_config(cfg, uri.scheme == lapin::uri::AMQPScheme::AMQPS)?;
    let work = async {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("switchyard {}", names.namespace()).into());
        let conn = match tls {
            None => Connection::connect_uri(uri, props).await,
            Some(tls) => {
                lapin::DefaultConnectionBuilder::new()
                    .map_err(|e| connect_error(cfg, &e))?
                    .with_uri(uri)
                    .with_properties(props)
                    .with_tls_config(tls)
                    .connect()
                    .await
            }
        }
        .map_err(|e| connect_error(cfg, &e))?;
        let publish = conn
            .create_channel()
            .await
            .map_err(|e| op_error("open a channel", &e))?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| op_error("turn publisher confirms on", &e))?;
        declare_exchanges(&conn, cfg, names).await?;
        Ok(Live {
            conn,
            publish,
            generation,
        })
    };
    match tokio::time::timeout(cfg.connect_timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(Error::Transport {
            transport: NAME,
            reason: format!(
                "no answer from RabbitMQ at {} within {:?}: check that the broker runs and the \
                 host and port are right (or raise RabbitConfig::connect_timeout)",
                cfg.redacted_url(),
                cfg.connect_timeout
            ),
            retryable: true,
        }),
    }
}

async fn declare_exchanges(
    conn: &Connection,
    cfg: &RabbitConfig,
    names: &Names,
) -> Result<(), Error> {
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| op_error("open a channel", &e))?;
    let opts = ExchangeDeclareOptions {
        durable: cfg.mode == Mode::Durable,
        ..ExchangeDeclareOptions::default()
    };
    for (name, kind) in [
        (&names.machines, ExchangeKind::Direct),
        (&names.topics, ExchangeKind::Topic),
        (&names.groups, ExchangeKind::Direct),
    ] {
        ch.exchange_declare(name.clone(), kind, opts, FieldTable::default())
            .await
            .map_err(|e| declare_error(cfg, name.as_str(), &e))?;
    }
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// A failed declaration: the usual cause is a namespace declared before with other settings.
pub(crate) fn declare_error(cfg: &RabbitConfig, what: &str, e: &lapin::Error) -> Error {
    let hint = if is_code(e, 406) {
        format!(
            "it exists with other settings (another mode than {:?}, or other queue arguments): \
             use the same RabbitConfig in every process of namespace `{}`, or another namespace",
            cfg.mode, cfg.namespace
        )
    } else {
        "check the broker's log".to_string()
    };
    Error::Transport {
        transport: NAME,
        reason: format!("could not declare `{what}` on RabbitMQ: {e}; {hint}"),
        retryable: false,
    }
}

fn is_code(e: &lapin::Error, code: u16) -> bool {
    match e.kind() {
        ErrorKind::ProtocolError(p) => p.get_id() == code,
        _ => false,
    }
}

/// A broker operation failed on a live connection (it may have just been lost).
pub(crate) fn op_error(what: &str, e: &lapin::Error) -> Error {
    Error::Transport {
        transport: NAME,
        reason: format!("could not {what} on RabbitMQ: {e}"),
        retryable: true,
    }
}

/// A failed connection attempt, sorted by cause.
fn connect_error(cfg: &RabbitConfig, e: &lapin::Error) -> Error {
    let url = cfg.redacted_url();
    let (reason, retryable) = match e.kind() {
        ErrorKind::IOError(io) if io.to_string().contains("certificate") => (
            format!(
                "the TLS certificate of RabbitMQ at {url} is not trusted: {io}; give the CA that \
                 signed it with RabbitConfig::tls_ca_file, or check the host name in the URL"
            ),
            false,
        ),
        ErrorKind::IOError(io) => (
            format!(
                "cannot reach RabbitMQ at {url}: {io}; start the broker (e.g. `rabbitmq-server \
                 -detached`) or fix the host and port in the URL"
            ),
            true,
        ),
        ErrorKind::ProtocolError(p) if p.get_id() == 403 => (
            format!(
                "RabbitMQ at {url} refused the credentials: check the user and password in the \
                 URL ({})",
                p.get_message()
            ),
            false,
        ),
        ErrorKind::ProtocolError(p) if p.get_id() == 530 => (
            format!(
                "RabbitMQ at {url} does not let this user into the virtual host: check the vhost \
                 at the end of the URL (`/%2f` is the default one) and the user's permissions ({})",
                p.get_message()
            ),
            false,
        ),
        ErrorKind::InvalidConnectionState(_) | ErrorKind::ProtocolError(_) => (
            format!(
                "RabbitMQ at {url} closed the connection while it was being opened ({e}): check \
                 the user, password and virtual host in the URL"
            ),
            false,
        ),
        _ => (format!("could not connect to RabbitMQ at {url}: {e}"), true),
    };
    Error::Transport {
        transport: NAME,
        reason,
        retryable,
    }
}
