//! The agent's way out: straight to the coordinator, or through the hospital's HTTP proxy by
//! `CONNECT` (the TLS session to the coordinator then runs inside the tunnel, so the proxy
//! sees only the coordinator's host and port).
//!
//! Which one: `[coordinator] proxy` in site.toml when set (`""` or `"none"`: direct, whatever
//! the environment says); otherwise `HTTPS_PROXY` (or `https_proxy`, then `ALL_PROXY`) unless
//! `NO_PROXY` (or `no_proxy`) names the coordinator's host, with curl's rules: a
//! comma-separated list of host names, each matching itself and its subdomains (a leading dot
//! is ignored), IP addresses matched exactly, and `*` for every host.
//!
//! The CONNECT exchange is a dozen lines of HTTP/1.1 and no maintained crate does just that
//! for tonic 0.14's connector (hyper-proxy2 and hyper-http-proxy bring their own TLS stacks),
//! so it is written here: basic proxy authentication from the proxy URL's `user:password@`
//! (percent-decoded), a 64 KiB cap on the proxy's answer, and an error naming the proxy and
//! its status line when it refuses.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;

/// How the agent reaches the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Direct,
    /// Through the HTTP proxy at `host:port`; `auth` is the `Proxy-Authorization` value.
    Proxy {
        url: String,
        host: String,
        port: u16,
        auth: Option<String>,
    },
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Direct => write!(f, "directly"),
            Route::Proxy { host, port, .. } => write!(f, "through the proxy {host}:{port}"),
        }
    }
}

/// The route to `coordinator` (its URL) given the configured `proxy` and the environment
/// (`env` reads a variable). Errors say which setting is wrong.
pub fn route(
    coordinator: &str,
    proxy: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Route, String> {
    let var = |names: &[&str]| names.iter().find_map(|n| env(n).filter(|v| !v.trim().is_empty()));
    let (url, source) = match proxy.map(str::trim) {
        Some("" | "none") => return Ok(Route::Direct),
        Some(url) => (url.to_owned(), "[coordinator] proxy"),
        None => {
            let Some(url) = var(&["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]) else {
                return Ok(Route::Direct);
            };
            let host = coordinator
                .parse::<Uri>()
                .ok()
                .and_then(|u| u.host().map(str::to_owned))
                .unwrap_or_default();
            if let Some(no) = var(&["NO_PROXY", "no_proxy"])
                && no_proxy_matches(&no, &host)
            {
                return Ok(Route::Direct);
            }
            (url, "HTTPS_PROXY")
        }
    };
    parse_proxy(&url).map_err(|why| format!("{source} = \"{url}\": {why}"))
}

fn parse_proxy(url: &str) -> Result<Route, String> {
    let with_scheme = if url.contains("://") { url.to_owned() } else { format!("http://{url}") };
    let uri: Uri = with_scheme.parse().map_err(|e| format!("not a URL ({e})"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// proxies are supported (the tunnel inside is TLS)".into());
    }
    let authority = uri.authority().ok_or("no host")?;
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = authority.port_u16().unwrap_or(3128);
    let auth = authority.as_str().rsplit_once('@').map(|(userinfo, _)| {
        use base64::Engine;
        let decoded: Vec<u8> = percent_encoding::percent_decode_str(userinfo).collect();
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(decoded))
    });
    let shown = match authority.as_str().rsplit_once('@') {
        Some((_, hostport)) => format!("http://***@{hostport}"),
        None => format!("http://{authority}"),
    };
    Ok(Route::Proxy { url: shown, host, port, auth })
}

/// Whether `NO_PROXY` (`list`) exempts `host`.
pub fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    list.split(',').map(|e| e.trim().to_ascii_lowercase()).filter(|e| !e.is_empty()).any(|e| {
        if e == "*" {
            return true;
        }
        // "host:port" entries: the port is not compared.
        let e = match e.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => {
                h.to_owned()
            }
            _ => e,
        };
        let e = e.trim_start_matches('.').trim_start_matches('[').trim_end_matches(']');
        host == e || host.ends_with(&format!(".{e}"))
    })
}

/// A TCP connection to `host:port`, through the proxy when `route` says so: after this the
/// stream carries bytes to and from the coordinator.
pub async fn dial(route: &Route, host: &str, port: u16) -> io::Result<TcpStream> {
    let Route::Proxy { url, host: proxy_host, port: proxy_port, auth } = route else {
        return TcpStream::connect((host, port)).await;
    };
    let mut tcp = TcpStream::connect((proxy_host.as_str(), *proxy_port))
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("connecting to the proxy {url}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let target =
        if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(a) = auth {
        request.push_str(&format!("Proxy-Authorization: {a}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await?;
    // The answer up to its blank line, read a byte at a time so that nothing of the tunnel
    // that follows is taken.
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= 64 * 1024 {
            return Err(io::Error::other(format!("the proxy {url} sent an endless answer")));
        }
        let mut byte = [0u8; 1];
        if tcp.read(&mut byte).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the proxy {url} closed the connection before answering CONNECT"),
            ));
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let status = text.lines().next().unwrap_or_default().trim().to_owned();
    let code = status.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(200..=299) => Ok(tcp),
        Some(407) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the proxy {url} wants credentials (\"{status}\"): put them in the proxy URL, \
                 http://USER:PASSWORD@host:port"
            ),
        )),
        _ => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "the proxy {url} refused to open a tunnel to {target} (\"{status}\"): ask the \
                 proxy's administrators to allow CONNECT to that host and port"
            ),
        )),
    }
}

/// tonic's connector for a route: tonic runs TLS over what it returns.
#[derive(Clone, Debug)]
pub struct Connector(pub Route);

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, uri: Uri) -> Self::Future {
        let route = self.0.clone();
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| io::Error::other("the address has no host"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().unwrap_or(443);
            Ok(TokioIo::new(dial(&route, &host, port).await?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> =
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn the_route_follows_config_then_environment_then_no_proxy() {
        let c = "https://coord.example.org:7443";
        assert_eq!(route(c, None, env(&[])).unwrap(), Route::Direct);
        let via = route(c, None, env(&[("HTTPS_PROXY", "http://proxy:3128")])).unwrap();
        assert!(
            matches!(&via, Route::Proxy { host, port: 3128, auth: None, .. } if host == "proxy")
        );
        let lower = route(c, None, env(&[("https_proxy", "proxy.lan:8080")])).unwrap();
        assert!(matches!(lower, Route::Proxy { port: 8080, .. }));
        for no in [
            "example.org",
            ".example.org",
            "coord.example.org:7443",
            "x, *",
            "other,coord.example.org",
        ] {
            let r = route(c, None, env(&[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", no)]));
            assert_eq!(r.unwrap(), Route::Direct, "NO_PROXY={no}");
        }
        for no in ["ample.org", "other.org", "org.example"] {
            let r = route(c, None, env(&[("HTTPS_PROXY", "http://p:1"), ("no_proxy", no)]));
            assert!(matches!(r.unwrap(), Route::Proxy { .. }), "NO_PROXY={no}");
        }
        // The config wins over the environment, NO_PROXY included; "none" is direct.
        let r = route(
            c,
            Some("http://cfg:9"),
            env(&[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", "*")]),
        );
        assert!(matches!(r.unwrap(), Route::Proxy { port: 9, .. }));
        assert_eq!(
            route(c, Some("none"), env(&[("HTTPS_PROXY", "http://p:1")])).unwrap(),
            Route::Direct
        );
        let e = route(c, Some("https://p:1"), env(&[])).unwrap_err();
        assert!(e.contains("[coordinator] proxy") && e.contains("only http://"), "{e}");
        assert!(route(c, Some("http://"), env(&[])).is_err());
    }

    #[test]
    fn credentials_become_a_basic_header_and_are_not_shown() {
        let r = route("https://c:1", Some("http://alice:p%40ss@proxy:3128"), env(&[])).unwrap();
        let Route::Proxy { url, auth, .. } = r else { panic!("a proxy") };
        assert_eq!(auth.as_deref(), Some("Basic YWxpY2U6cEBzcw=="), "alice:p@ss");
        assert_eq!(url, "http://***@proxy:3128");
    }
}
