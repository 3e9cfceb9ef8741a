//! A TCP proxy in front of PostgreSQL that loses the answer to a COMMIT: it reads the client's
//! messages, and the first time it sees a COMMIT it cuts the client off, either after passing
//! the COMMIT on (the server commits; the client never learns it) or instead of passing it on
//! (the server rolls back when the connection drops). Everything else is forwarded untouched,
//! and after the one cut the proxy is transparent.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Where the one COMMIT goes before the client is cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The server receives the COMMIT and commits; its answer is thrown away.
    AfterForwarding,
    /// The server never receives the COMMIT and rolls back when the connection drops.
    BeforeForwarding,
}

#[derive(Debug)]
pub struct CommitCutter {
    port: u16,
    armed: Arc<AtomicBool>,
}

impl CommitCutter {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr, cut: Cut) -> CommitCutter {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(true));
        let armed_for_pumps = Arc::clone(&armed);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                connect_pumps(client, server, cut, Arc::clone(&armed_for_pumps));
            }
        });
        CommitCutter { port, armed }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// True once the one COMMIT has been cut.
    pub fn has_cut(&self) -> bool {
        !self.armed.load(Ordering::SeqCst)
    }
}

fn connect_pumps(client: TcpStream, server: TcpStream, cut: Cut, armed: Arc<AtomicBool>) {
    let cut_here = Arc::new(AtomicBool::new(false));
    let (mut client_in, mut server_out) =
        (client.try_clone().unwrap(), server.try_clone().unwrap());
    let cut_seen = Arc::clone(&cut_here);
    std::thread::spawn(move || {
        // Server to client: stops forwarding for good once this connection was cut.
        let (mut server_in, mut client_out) = (server, client);
        let mut buf = [0u8; 8192];
        loop {
            let n = match server_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if cut_seen.load(Ordering::SeqCst) || client_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = client_out.shutdown(Shutdown::Both);
        let _ = server_in.shutdown(Shutdown::Both);
    });
    std::thread::spawn(move || {
        // Client to server, a message at a time, so that a COMMIT can be recognized.
        let mut startup = true;
        while let Some(message) = read_message(&mut client_in, startup) {
            if startup {
                // SSL and GSS encryption requests come before the real startup message.
                let code = message.get(4..8).map(|c| u32::from_be_bytes(c.try_into().unwrap()));
                startup = matches!(code, Some(80_877_103 | 80_877_104));
            } else if is_commit(&message)
                && armed.compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst).is_ok()
            {
                cut_here.store(true, Ordering::SeqCst);
                if cut == Cut::AfterForwarding {
                    let _ = server_out.write_all(&message);
                    let _ = server_out.flush();
                }
                let _ = client_in.shutdown(Shutdown::Both);
                if cut == Cut::BeforeForwarding {
                    let _ = server_out.shutdown(Shutdown::Both);
                }
                return;
            }
            if server_out.write_all(&message).is_err() {
                break;
            }
        }
        let _ = server_out.shutdown(Shutdown::Write);
    });
}

/// One protocol message with its header: the startup phase has no type byte.
fn read_message(stream: &mut TcpStream, startup: bool) -> Option<Vec<u8>> {
    let mut message = vec![0u8; if startup { 4 } else { 5 }];
    stream.read_exact(&mut message).ok()?;
    let len_at = message.len() - 4;
    let len = u32::from_be_bytes(message[len_at..].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len.checked_sub(4)?];
    stream.read_exact(&mut body).ok()?;
    message.extend_from_slice(&body);
    Some(message)
}

/// A simple query (`Q`) or a parse (`P`) whose SQL is a COMMIT.
fn is_commit(message: &[u8]) -> bool {
    let sql = match message[0] {
        b'Q' => &message[5..],
        // Parse: statement name (NUL-terminated), then the query.
        b'P' => match message[5..].iter().position(|b| *b == 0) {
            Some(end) => &message[5 + end + 1..],
            None => return false,
        },
        _ => return false,
    };
    let text = String::from_utf8_lossy(sql);
    let text = text.trim_start().to_ascii_uppercase();
    text.starts_with("COMMIT") || text.starts_with("END")
}
