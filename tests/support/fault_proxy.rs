//! A TCP proxy in front of any relay (nostr-relay-builder, nostr-rs-relay, our scripted
//! relay, the local relay) that injects the transport faults real networks show: every
//! connection dropped at once (a relay restart), connections gone silent without a FIN (a NAT
//! idle drop, a remote that crashed), a relay that is down for a while (connections are
//! accepted and closed before the websocket handshake), and delivery delayed by a latency
//! (what the relay sends reaches the client that much later, in order).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use grasp_sync::nostr::RelayUrl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy)]
enum Fault {
    Drop,
    Silence,
}

struct State {
    upstream: SocketAddr,
    down: AtomicBool,
    faults: broadcast::Sender<Fault>,
    /// Connections proxied now (silenced ones excluded).
    open: AtomicUsize,
    /// Connections refused while down.
    refused: AtomicUsize,
    /// Latency added to what the relay sends, in milliseconds.
    delay_ms: AtomicU64,
}

pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        // Held (silenced) connections end with the proxy.
        let _ = self.state.faults.send(Fault::Drop);
    }
}

impl FaultProxy {
    /// Proxy `upstream` (a `ws://host:port` relay URL) on a new loopback port.
    pub async fn start(upstream: &RelayUrl) -> FaultProxy {
        let up = upstream
            .as_str()
            .trim_start_matches("ws://")
            .trim_end_matches('/');
        let upstream: SocketAddr = up.parse().expect("upstream is ws://ip:port");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State {
            upstream,
            down: AtomicBool::new(false),
            faults: broadcast::channel(64).0,
            open: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            delay_ms: AtomicU64::new(0),
        });
        let s = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if s.down.load(Ordering::SeqCst) {
                    s.refused.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                tokio::spawn(pipe(client, s.clone()));
            }
        });
        FaultProxy { addr, state, task }
    }

    pub fn url(&self) -> RelayUrl {
        RelayUrl::parse(&format!("ws://{}", self.addr)).expect("proxy URL")
    }

    /// `host:port` of the proxy.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// Close every proxied connection now (FIN to both sides).
    pub fn drop_connections(&self) {
        let _ = self.state.faults.send(Fault::Drop);
    }

    /// Every proxied connection stops forwarding in both directions but stays open: no
    /// FIN, no RST, nothing more delivered. New connections work.
    pub fn silence_connections(&self) {
        let _ = self.state.faults.send(Fault::Silence);
    }

    /// Down: drop every connection and refuse new ones until `set_down(false)`.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
        if down {
            self.drop_connections();
        }
    }

    /// What the relay sends from now on reaches the client `delay` later (zero: at once).
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }
}

async fn pipe(mut client: TcpStream, s: Arc<State>) {
    let mut faults = s.faults.subscribe();
    let Ok(mut upstream) = TcpStream::connect(s.upstream).await else {
        return;
    };
    s.open.fetch_add(1, Ordering::SeqCst);
    let (mut client_rd, mut client_wr) = client.split();
    let (mut up_rd, mut up_wr) = upstream.split();
    let to_relay = tokio::io::copy(&mut client_rd, &mut up_wr);
    let to_client = delayed_copy(&mut up_rd, &mut client_wr, &s.delay_ms);
    let fault = tokio::select! {
        _ = to_relay => None,
        _ = to_client => None,
        f = faults.recv() => f.ok(),
    };
    s.open.fetch_sub(1, Ordering::SeqCst);
    if let Some(Fault::Silence) = fault {
        // Keep both sockets open, untouched, until a drop (or the proxy's end) releases them.
        loop {
            match faults.recv().await {
                Ok(Fault::Drop) | Err(broadcast::error::RecvError::Closed) => break,
                _ => {}
            }
        }
    }
}

/// Copy `from` to `to`, each chunk held until `delay_ms` after it was read (order kept).
async fn delayed_copy<R, W>(from: &mut R, to: &mut W, delay_ms: &AtomicU64)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let due =
                        Instant::now() + Duration::from_millis(delay_ms.load(Ordering::SeqCst));
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}
