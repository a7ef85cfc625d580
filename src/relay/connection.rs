//! One websocket connection to a relay, split into a reader and a writer so a session can
//! send while it waits for messages. Reading is pull-based: when the session stops reading
//! (its publisher queue is full) the socket is not read, and TCP flow control slows the
//! remote down — nothing is buffered without bound.
//!
//! A connection proves it is alive: a reader that has seen nothing for `ping_every` sends a
//! ping, and one that then sees nothing for `pong_timeout` fails with
//! [`ConnectionError::Unresponsive`] (a NAT that dropped the flow, a remote that crashed
//! without FIN). Every write has a deadline, so a remote that accepts and never reads
//! cannot block its session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use nostr::{ClientMessage, JsonUtil, RelayMessage};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::nostr::RelayUrl;
use crate::relay::resolve::Resolver;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub connect_timeout: Duration,
    /// Largest websocket message accepted from the relay; larger ones end the connection.
    pub max_message_bytes: usize,
    /// Ping a connection that has been silent this long.
    pub ping_every: Duration,
    /// A pinged connection that stays silent this long is dead.
    pub pong_timeout: Duration,
    /// A write (EVENT, REQ, ping, …) that has not gone out after this long fails.
    pub write_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(10),
            max_message_bytes: 1024 * 1024,
            ping_every: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(15),
            write_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Error)]
pub enum ConnectionError {
    #[error("connecting to {url} timed out after {after:?}")]
    ConnectTimeout { url: String, after: Duration },
    #[error("connecting to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    #[error("resolving {url}: {error}")]
    Resolve { url: String, error: String },
    #[error("websocket error: {0}")]
    Websocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    #[error("the relay closed the connection")]
    Closed,
    #[error("the connection is silent: no answer to a ping within {0:?}")]
    Unresponsive(Duration),
    #[error("a write did not go out within {0:?}")]
    WriteTimeout(Duration),
}

impl ConnectionError {
    /// Short, bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectionError::ConnectTimeout { .. } => "timeout",
            ConnectionError::Connect { .. } => "connect",
            ConnectionError::Resolve { .. } => "resolve",
            ConnectionError::Websocket(_) => "websocket",
            ConnectionError::Closed => "closed",
            ConnectionError::Unresponsive(_) => "unresponsive",
            ConnectionError::WriteTimeout(_) => "write_timeout",
        }
    }
}

/// What the reader hands the session.
// Short-lived and moved once; boxing the common variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Incoming {
    Message(RelayMessage<'static>),
    /// A text frame that is not a valid relay message (counted, otherwise ignored).
    Malformed {
        len: usize,
        error: String,
    },
}

type Sink = Arc<Mutex<SplitSink<Ws, Message>>>;

pub struct ConnReader {
    stream: SplitStream<Ws>,
    bytes: u64,
    /// Shared with the writer: the reader sends the pings.
    sink: Sink,
    liveness: Liveness,
}

pub struct ConnWriter {
    sink: Sink,
    write_timeout: Duration,
}

/// When the reader last saw a frame and whether it is waiting for an answer to a ping. Kept
/// in the reader, not in `recv`'s future, so a `recv` cancelled by `select!` loses nothing.
struct Liveness {
    ping_every: Duration,
    pong_timeout: Duration,
    write_timeout: Duration,
    last_seen: Instant,
    pinged_at: Option<Instant>,
}

impl Liveness {
    fn deadline(&self) -> Instant {
        match self.pinged_at {
            Some(at) => at + self.pong_timeout,
            None => self.last_seen + self.ping_every,
        }
    }
}

async fn write(sink: &Sink, msg: Message, within: Duration) -> Result<(), ConnectionError> {
    match tokio::time::timeout(within, async { sink.lock().await.send(msg).await }).await {
        Ok(r) => r.map_err(|e| ConnectionError::Websocket(Box::new(e))),
        Err(_) => Err(ConnectionError::WriteTimeout(within)),
    }
}

/// Connect to `url`, resolving its host with the system resolver and no address checks: for
/// the local relay, which the operator configured. Remote relays go through [`connect_to`]
/// with the addresses the policy checked.
pub async fn connect(
    url: &RelayUrl,
    opts: &ConnectOptions,
) -> Result<(ConnWriter, ConnReader), ConnectionError> {
    let addrs = tokio::time::timeout(opts.connect_timeout, Resolver::system().pin(url, None))
        .await
        .map_err(|_| timed_out(url, opts))?
        .map_err(|e| ConnectionError::Resolve {
            url: url.to_string(),
            error: e.to_string(),
        })?;
    connect_to(url, &addrs, opts).await
}

fn timed_out(url: &RelayUrl, opts: &ConnectOptions) -> ConnectionError {
    ConnectionError::ConnectTimeout {
        url: url.to_string(),
        after: opts.connect_timeout,
    }
}

/// Connect to `url` at exactly one of `addrs` (tried in order), then shake hands with the
/// URL's own host for TLS (SNI, certificate) and the `Host` header. No name is resolved here.
pub async fn connect_to(
    url: &RelayUrl,
    addrs: &[SocketAddr],
    opts: &ConnectOptions,
) -> Result<(ConnWriter, ConnReader), ConnectionError> {
    crate::relay::tls::install_default_crypto();
    let config = WebSocketConfig::default()
        .max_message_size(Some(opts.max_message_bytes))
        .max_frame_size(Some(opts.max_message_bytes));
    let fut = async {
        let mut last = None;
        let mut tcp = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = tcp.ok_or_else(|| {
            tokio_tungstenite::tungstenite::Error::Io(last.unwrap_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "no address to connect to")
            }))
        })?;
        // Small frames (REQ, CLOSE, pings) go out at once.
        let _ = tcp.set_nodelay(true);
        tokio_tungstenite::client_async_tls_with_config(url.as_str(), tcp, Some(config), None).await
    };
    let (ws, _response) = tokio::time::timeout(opts.connect_timeout, fut)
        .await
        .map_err(|_| timed_out(url, opts))?
        .map_err(|e| ConnectionError::Connect {
            url: url.to_string(),
            source: Box::new(e),
        })?;
    let (sink, stream) = ws.split();
    let sink = Arc::new(Mutex::new(sink));
    let liveness = Liveness {
        ping_every: opts.ping_every,
        pong_timeout: opts.pong_timeout,
        write_timeout: opts.write_timeout,
        last_seen: Instant::now(),
        pinged_at: None,
    };
    Ok((
        ConnWriter {
            sink: sink.clone(),
            write_timeout: opts.write_timeout,
        },
        ConnReader {
            stream,
            bytes: 0,
            sink,
            liveness,
        },
    ))
}

impl ConnReader {
    /// When the relay was last heard from (any frame, pongs included). Everything it sent
    /// before that moment has been read, so this is the latest moment the connection is
    /// proven to have delivered.
    pub fn last_seen(&self) -> Instant {
        self.liveness.last_seen
    }

    /// Bytes of text frames read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The next relay message. `Err(Closed)` once the connection has ended,
    /// `Err(Unresponsive)` once it stopped answering pings. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Incoming, ConnectionError> {
        loop {
            let deadline = self.liveness.deadline();
            let next = tokio::select! {
                // Frames already buffered count before any deadline: a reader that was not
                // polled for a while (back-pressure) is not a dead connection.
                biased;
                next = self.stream.next() => next,
                _ = tokio::time::sleep_until(deadline) => {
                    if self.liveness.pinged_at.is_some() {
                        return Err(ConnectionError::Unresponsive(self.liveness.pong_timeout));
                    }
                    write(&self.sink, Message::Ping(Default::default()), self.liveness.write_timeout)
                        .await?;
                    self.liveness.pinged_at = Some(Instant::now());
                    continue;
                }
            };
            let frame = match next {
                None => return Err(ConnectionError::Closed),
                Some(Err(e)) => return Err(ConnectionError::Websocket(Box::new(e))),
                Some(Ok(frame)) => frame,
            };
            self.liveness.last_seen = Instant::now();
            self.liveness.pinged_at = None;
            let text = match frame {
                Message::Text(t) => {
                    self.bytes += t.len() as u64;
                    t
                }
                Message::Close(_) => return Err(ConnectionError::Closed),
                // Pings are answered by tungstenite on the next write; binary frames carry
                // nothing in NIP-01.
                _ => continue,
            };
            return Ok(match RelayMessage::from_json(text.as_str()) {
                Ok(msg) => Incoming::Message(msg),
                Err(e) => Incoming::Malformed {
                    len: text.len(),
                    error: e.to_string(),
                },
            });
        }
    }
}

impl ConnWriter {
    pub async fn send(&mut self, msg: &ClientMessage<'_>) -> Result<(), ConnectionError> {
        write(&self.sink, Message::text(msg.as_json()), self.write_timeout).await
    }

    pub async fn close(&mut self) {
        let _ = tokio::time::timeout(self.write_timeout, async {
            self.sink.lock().await.close().await
        })
        .await;
    }
}
