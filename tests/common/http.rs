//! A small HTTP/1.1 file server on 127.0.0.1 for the download tests: it
//! serves byte ranges, can cut connections, throttle, and counts what it
//! was asked. Each connection carries one request.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub enum Body {
    Bytes(Arc<Vec<u8>>),
    File(PathBuf),
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::File(p) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
        }
    }
}

/// How a path misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    Normal,
    /// The first response is cut after this many body bytes; later ones
    /// (ranges) are served in full.
    CutOnce(u64),
    /// Every response stops at this offset of the file; range requests
    /// beyond it get nothing before the close.
    CutAt(u64),
    /// Serve at about this many bytes per second.
    Throttle(u64),
}

#[derive(Debug, Clone, Default)]
pub struct Log {
    /// (path, Range header) of every request, in order.
    pub requests: Vec<(String, Option<String>)>,
}

struct Route {
    body: Body,
    behavior: Behavior,
    served: u32,
}

pub struct Server {
    pub port: u16,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start() -> Server {
        let listener =
            TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind 127.0.0.1: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("{e}"));
        let routes: Arc<Mutex<HashMap<String, Route>>> = Arc::default();
        let log: Arc<Mutex<Log>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (r, l, s) = (routes.clone(), log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (r, l) = (r.clone(), l.clone());
                        std::thread::spawn(move || {
                            let _ = serve(stream, &r, &l);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Server {
            port,
            routes,
            log,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn add(&self, path: &str, body: Body, behavior: Behavior) {
        if let Ok(mut r) = self.routes.lock() {
            r.insert(
                path.to_string(),
                Route {
                    body,
                    behavior,
                    served: 0,
                },
            );
        }
    }

    pub fn add_bytes(&self, path: &str, bytes: Vec<u8>, behavior: Behavior) {
        self.add(path, Body::Bytes(Arc::new(bytes)), behavior);
    }

    pub fn log(&self) -> Log {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Requests for `path`: (count without Range, Range headers seen).
    pub fn requests_for(&self, path: &str) -> (usize, Vec<String>) {
        let log = self.log();
        let full = log
            .requests
            .iter()
            .filter(|(p, r)| p == path && r.is_none())
            .count();
        let ranges = log
            .requests
            .iter()
            .filter(|(p, _)| p == path)
            .filter_map(|(_, r)| r.clone())
            .collect();
        (full, ranges)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    stream: TcpStream,
    routes: &Mutex<HashMap<String, Route>>,
    log: &Mutex<Log>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.trim().eq_ignore_ascii_case("range")
        {
            range = Some(v.trim().to_string());
        }
    }
    if let Ok(mut l) = log.lock() {
        l.requests.push((path.clone(), range.clone()));
    }
    let found = routes.lock().ok().and_then(|mut r| {
        r.get_mut(&path).map(|route| {
            route.served += 1;
            (route.body.clone(), route.behavior, route.served)
        })
    });
    let mut out = stream;
    let Some((body, behavior, served)) = found else {
        out.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found",
        )?;
        return Ok(());
    };
    let total = body.len();
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|s| s.parse::<u64>().ok());
    let (status, start) = match start {
        Some(s) if s >= total => {
            let head = format!(
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{total}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            out.write_all(head.as_bytes())?;
            return Ok(());
        }
        Some(s) => ("206 Partial Content", s),
        None => ("200 OK", 0),
    };
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nETag: \"v1\"\r\nConnection: close\r\n",
        total - start
    );
    if start > 0 {
        head.push_str(&format!(
            "Content-Range: bytes {start}-{}/{total}\r\n",
            total - 1
        ));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    let end = match behavior {
        Behavior::CutOnce(n) if served == 1 => (start + n).min(total),
        Behavior::CutAt(n) => n.max(start).min(total),
        _ => total,
    };
    let rate = match behavior {
        Behavior::Throttle(r) => Some(r.max(1)),
        _ => None,
    };
    let chunk: u64 = match rate {
        Some(r) => (r / 20).max(1),
        None => 256 * 1024,
    };
    let mut pos = start;
    let mut file = match &body {
        Body::File(p) => {
            let mut f = std::fs::File::open(p)?;
            f.seek(SeekFrom::Start(start))?;
            Some(f)
        }
        Body::Bytes(_) => None,
    };
    let mut buf = vec![0u8; chunk as usize];
    while pos < end {
        let n = chunk.min(end - pos) as usize;
        match (&body, file.as_mut()) {
            (Body::Bytes(b), _) => out.write_all(&b[pos as usize..pos as usize + n])?,
            (Body::File(_), Some(f)) => {
                f.read_exact(&mut buf[..n])?;
                out.write_all(&buf[..n])?;
            }
            _ => break,
        }
        pos += n as u64;
        if rate.is_some() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    out.flush()?;
    // Closing here (maybe early) is the cut.
    let _ = out.shutdown(std::net::Shutdown::Both);
    Ok(())
}

/// Pseudo-random bytes (deterministic, fast).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}
