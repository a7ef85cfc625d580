//! One websocket connection to a relay, split into a reader and a writer so a session can
//! send while it waits for messages. Reading is pull-based: when the session stops reading
//! (its publisher queue is full) the socket is not read, and TCP flow control slows the
//! remote down — nothing is buffered without bound.

use std::time::Duration;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use nostr::{ClientMessage, JsonUtil, RelayMessage};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::nostr::RelayUrl;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub connect_timeout: Duration,
    /// Largest websocket message accepted from the relay; larger ones end the connection.
    pub max_message_bytes: usize,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(10),
            max_message_bytes: 1024 * 1024,
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
    #[error("websocket error: {0}")]
    Websocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    #[error("the relay closed the connection")]
    Closed,
}

impl ConnectionError {
    /// Short, bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectionError::ConnectTimeout { .. } => "timeout",
            ConnectionError::Connect { .. } => "connect",
            ConnectionError::Websocket(_) => "websocket",
            ConnectionError::Closed => "closed",
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

pub struct ConnReader {
    stream: SplitStream<Ws>,
    bytes: u64,
}

pub struct ConnWriter {
    sink: SplitSink<Ws, Message>,
}

pub async fn connect(
    url: &RelayUrl,
    opts: &ConnectOptions,
) -> Result<(ConnWriter, ConnReader), ConnectionError> {
    crate::relay::tls::install_default_crypto();
    let config = WebSocketConfig::default()
        .max_message_size(Some(opts.max_message_bytes))
        .max_frame_size(Some(opts.max_message_bytes));
    let fut = tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), false);
    let (ws, _response) = tokio::time::timeout(opts.connect_timeout, fut)
        .await
        .map_err(|_| ConnectionError::ConnectTimeout {
            url: url.to_string(),
            after: opts.connect_timeout,
        })?
        .map_err(|e| ConnectionError::Connect {
            url: url.to_string(),
            source: Box::new(e),
        })?;
    let (sink, stream) = ws.split();
    Ok((ConnWriter { sink }, ConnReader { stream, bytes: 0 }))
}

impl ConnReader {
    /// Bytes of text frames read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The next relay message. `Err(Closed)` once the connection has ended.
    pub async fn recv(&mut self) -> Result<Incoming, ConnectionError> {
        loop {
            let frame = match self.stream.next().await {
                None => return Err(ConnectionError::Closed),
                Some(Err(e)) => return Err(ConnectionError::Websocket(Box::new(e))),
                Some(Ok(frame)) => frame,
            };
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
        self.sink
            .send(Message::text(msg.as_json()))
            .await
            .map_err(|e| ConnectionError::Websocket(Box::new(e)))
    }

    pub async fn close(&mut self) {
        let _ = self.sink.close().await;
    }
}
