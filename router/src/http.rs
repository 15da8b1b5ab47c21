//! The minimal HTTP/1.1 the router's API speaks: one request per connection, a bounded
//! head, `Connection: close`. (The daemon's control server uses hyper.)

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response: status code, content type, body.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => Response {
                status,
                content_type: "application/json",
                body,
            },
            Err(e) => Response::text(500, format!("encoding response: {e}\n")),
        }
    }

    /// `{"error": reason}` with `status`.
    pub fn error(status: u16, reason: impl std::fmt::Display) -> Self {
        Response::json(status, &serde_json::json!({ "error": reason.to_string() }))
    }
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// A parsed request head.
pub struct Head {
    pub method: String,
    /// The target without its query string.
    pub path: String,
    /// `Content-Length`, when given (repeated values must agree).
    pub content_length: Option<usize>,
    /// A `Transfer-Encoding` header was sent (neither server accepts chunked bodies).
    pub transfer_encoding: bool,
    /// Bytes read past the head (the start of a body).
    pub rest: Vec<u8>,
}

/// Reads and parses a request head of at most `max_head_bytes`. A bad request becomes the
/// response to send; `Err` is a socket error.
pub async fn read_head(
    stream: &mut TcpStream,
    max_head_bytes: usize,
) -> std::io::Result<Result<Head, Response>> {
    let too_large = || {
        Response::error(
            431,
            format!("request head larger than {max_head_bytes} bytes"),
        )
    };
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > max_head_bytes {
            return Ok(Err(too_large()));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Err(Response::error(
                400,
                "connection closed before the end of the request head",
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if end > max_head_bytes {
        return Ok(Err(too_large()));
    }
    let Ok(text) = std::str::from_utf8(&buf[..end]) else {
        return Ok(Err(Response::error(400, "request head is not UTF-8")));
    };
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Ok(Err(Response::error(
            400,
            format!("malformed request line `{}`", request_line.escape_debug()),
        )));
    };
    if !version.starts_with("HTTP/1.") {
        return Ok(Err(Response::error(
            400,
            format!("unsupported protocol `{}`", version.escape_debug()),
        )));
    }
    let mut content_length: Option<usize> = None;
    let mut transfer_encoding = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Ok(Err(Response::error(
                400,
                format!("malformed header `{}`", line.escape_debug()),
            )));
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            match value.parse::<usize>() {
                Ok(n) if content_length.is_none_or(|c| c == n) => content_length = Some(n),
                _ => return Ok(Err(Response::error(400, "invalid Content-Length"))),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
        }
    }
    Ok(Ok(Head {
        method: method.to_string(),
        path: target.split('?').next().unwrap_or("").to_string(),
        content_length,
        transfer_encoding,
        rest: buf[end + 4..].to_vec(),
    }))
}

/// Writes `response` (the head only, for a HEAD request) and closes the write side.
pub async fn write_response(
    stream: &mut TcpStream,
    response: &Response,
    head_only: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason_phrase(response.status),
        response.content_type,
        response.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(response.body.as_bytes()).await?;
    }
    stream.shutdown().await
}
