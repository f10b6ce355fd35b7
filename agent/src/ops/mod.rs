//! Operator commands that talk to a running agent's admin server (`status`, `tap`) or look at
//! the node itself (`check`, `install-cni`).

pub mod check;
pub mod install_cni;
pub mod sk_msg_probe;
pub mod status;
pub mod tap;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, bail};

const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens `GET path` on the admin server and returns the reader positioned at the body.
fn get(
    admin: SocketAddr,
    path: &str,
    read_timeout: Option<Duration>,
) -> Result<BufReader<TcpStream>> {
    let mut stream = TcpStream::connect_timeout(&admin, ADMIN_TIMEOUT).with_context(|| {
        format!("connecting to the agent's admin server at {admin} (is `sockmesh run` up?)")
    })?;
    stream.set_read_timeout(read_timeout)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {admin}\r\n\r\n")?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line.split_whitespace().nth(1).unwrap_or("");
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    if status != "200" {
        let mut body = String::new();
        let _ = reader.read_to_string(&mut body);
        bail!(
            "{admin}{path} answered {}: {}",
            status_line.trim(),
            body.trim()
        );
    }
    Ok(reader)
}

/// The whole body of `GET path`.
fn get_text(admin: SocketAddr, path: &str) -> Result<String> {
    let mut body = String::new();
    get(admin, path, Some(ADMIN_TIMEOUT))?.read_to_string(&mut body)?;
    Ok(body)
}
