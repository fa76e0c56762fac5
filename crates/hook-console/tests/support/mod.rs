//! What the console's tests share: a console served on a loopback port over a test database,
//! real-shaped fixtures (a Claude Code session, failures, hostile values), and a minimal
//! HTTP/1.1 client (one request per connection), so that requests and headers are exactly what
//! the test says.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use hook_console::{ConsoleConfig, ConsoleState, Token};
use hook_store::testing::TestDb;
use hook_store::{PgStore, StoreOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The token the tests configure.
pub const TOKEN: &str = "test-token-0123456789abcdef";

/// Where the console is mounted in the tests (as an embedder would nest it).
pub const MOUNT: &str = "/console";

/// A console served on `127.0.0.1:<port>` under [`MOUNT`].
pub struct Served {
    pub db: TestDb,
    pub store: PgStore,
    pub addr: std::net::SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Served {
    /// `http://127.0.0.1:<port>/console<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{MOUNT}{path}", self.addr)
    }

    pub async fn get(&self, path: &str) -> Response {
        request(self.addr, "GET", &format!("{MOUNT}{path}"), &[], b"").await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        request(self.addr, "GET", &format!("{MOUNT}{path}"), headers, b"").await
    }

    pub async fn post(&self, path: &str, headers: &[(&str, &str)], form: &[(&str, &str)]) -> Response {
        let mut body = form_urlencoded::Serializer::new(String::new());
        for (k, v) in form {
            body.append_pair(k, v);
        }
        let body = body.finish();
        let mut all = vec![("content-type", "application/x-www-form-urlencoded")];
        all.extend_from_slice(headers);
        request(self.addr, "POST", &format!("{MOUNT}{path}"), &all, body.as_bytes()).await
    }

    /// Logs in with `token`; the cookie header value of the session.
    pub async fn login(&self) -> String {
        let response = self.post("/login", &[], &[("token", TOKEN)]).await;
        assert_eq!(response.status, 303, "login: {}", response.body);
        let cookie = response.header("set-cookie").expect("a session cookie");
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
        assert!(cookie.contains(&format!("Path={MOUNT}/")), "{cookie}");
        cookie.split(';').next().unwrap_or_default().to_owned()
    }

    /// The CSRF value on a page seen with `cookie`.
    pub async fn csrf(&self, cookie: &str) -> String {
        let page = self.get_with("/events", &[("cookie", cookie)]).await;
        hidden_value(&page.body, "csrf").expect("a csrf field on the events page when logged in")
    }
}

/// Serves the console over a fresh migrated database named after `test`.
pub async fn serve(test: &str, token: Option<&str>) -> Served {
    let db = TestDb::migrated(test).await;
    let store = db.store(StoreOptions { listen: false, pool_size: 4, ..StoreOptions::default() }).await;
    hook_console::build_indexes(store.pool()).await;
    let config = ConsoleConfig {
        token: token.map(|t| Token::new(t).expect("a valid token")),
        ..ConsoleConfig::default()
    };
    let state = ConsoleState::new(store.pool().clone(), config);
    let app = hook_console::mount(MOUNT, state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
    let addr = listener.local_addr().expect("the bound address");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Served { db, store, addr, server }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`), read to the end.
pub async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the console");
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("send the request");
    stream.write_all(body).await.expect("send the body");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw))
        .await
        .expect("the console answers within a minute")
        .expect("read the response");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 =
        lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("a status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Response { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 2 + size + 2..];
    }
    out
}

/// The value of the hidden input `name` on a page.
pub fn hidden_value(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker)? + marker.len();
    let end = html[start..].find('"')?;
    Some(html[start..start + end].to_owned())
}

/// The session of the fixtures' Claude Code session.
pub const SESSION: &str = "sess-7f3a";

/// A Claude Code session as hook-ingest stores it (payload = the hook's input, metadata =
/// `{hook_type, session_id, cwd, logged_at}`), ten minutes ago, second by second: start, a
/// prompt, a Bash call that took 2.5 s, an Edit that failed, a notification, stop, end. All
/// processed. Plus a second, older session.
pub const CLAUDE_SESSION: &str = "
    INSERT INTO hook_events (id, source, action, resource, resource_id, payload, metadata, processed,
                             created_at, processed_at, result_metadata)
    SELECT gen_random_uuid(), source, action, resource, resource_id, payload,
           jsonb_build_object('hook_type', source, 'session_id', s, 'cwd', '/work/app', 'logged_at', now()),
           true, now() - interval '10 minutes' + at * interval '1 second',
           now() - interval '10 minutes' + at * interval '1 second' + interval '20 milliseconds', result
    FROM (VALUES
      ('sess-7f3a', 0.0, 'SessionStart', 'session_initialized', 'session', 'sess-7f3a',
       '{\"session_id\": \"sess-7f3a\", \"hook_event_name\": \"SessionStart\", \"source\": \"startup\", \"cwd\": \"/work/app\"}'::jsonb,
       '{\"event\": \"session_start\"}'::jsonb),
      ('sess-7f3a', 1.0, 'UserPromptSubmit', 'prompt_submitted', 'session', 'sess-7f3a',
       '{\"session_id\": \"sess-7f3a\", \"hook_event_name\": \"UserPromptSubmit\", \"prompt\": \"Run the tests and fix the failing one\"}', '{}'),
      ('sess-7f3a', 2.0, 'PreToolUse', 'tool_invocation', 'tool', 'Bash',
       '{\"session_id\": \"sess-7f3a\", \"hook_event_name\": \"PreToolUse\", \"tool_name\": \"Bash\", \"tool_use_id\": \"toolu_01\", \"tool_input\": {\"command\": \"cargo test\"}}', '{}'),
      ('sess-7f3a', 4.5, 'PostToolUse', 'tool_completion', 'tool', 'Bash',
       '{\"session_id\": \"sess-7f3a\", \"hook_event_name\": \"PostToolUse\", \"tool_name\": \"Bash\", \"tool_use_id\": \"toolu_01\", \"tool_input\": {\"command\": \"cargo test\"}, \"tool_response\": {\"stdout\": \"ok\", \"stderr\": \"\"}}',
       '{\"success\": true, \"target\": \"cargo test\"}'),
      ('sess-7f3a', 5.0, 'PreToolUse', 'tool_invocation', 'tool', 'Edit',
       '{\"session_id\": \"sess-7f3a\", \"hook_event_name\": \"PreToolUse\", \"tool_name\": \"Edit\", \"tool_use_id\": \"toolu_02\", \"tool_input\": {\"file_path\": \"/work/app/src/lib.rs\"}}', '{}'),
      ('sess-7f3a', 5.25, 'PostToolUseFailure', 'post_tool_use_failure', 'tool', 'Edit',
       '{\"session_id\": \"sess-7f3a\", \"hook_event_name\": \"PostToolUseFailure\", \"tool_name\": \"Edit\", \"tool_use_id\": \"toolu_02\", \"tool_input\": {\"file_path\": \"/work/app/src/lib.rs\"}, \"error\": \"old_string not found\"}',
       '{\"success\": false, \"error\": \"old_string not found\"}'),
      ('sess-7f3a', 6.0, 'Notification', 'notification', 'session', 'sess-7f3a',
       '{\"session_id\": \"sess-7f3a\", \"hook_event_name\": \"Notification\", \"message\": \"Claude needs your permission\"}', '{}'),
      ('sess-7f3a', 8.0, 'Stop', 'response_completed', 'session', 'sess-7f3a',
       '{\"session_id\": \"sess-7f3a\", \"hook_event_name\": \"Stop\", \"stop_hook_active\": false}', '{}'),
      ('sess-7f3a', 9.0, 'SessionEnd', 'session_ended', 'session', 'sess-7f3a',
       '{\"session_id\": \"sess-7f3a\", \"hook_event_name\": \"SessionEnd\", \"reason\": \"exit\"}', '{}'),
      ('sess-old', -3000.0, 'UserPromptSubmit', 'prompt_submitted', 'session', 'sess-old',
       '{\"session_id\": \"sess-old\", \"hook_event_name\": \"UserPromptSubmit\", \"prompt\": \"hello\"}', '{}')
    ) AS t(s, at, source, action, resource, resource_id, payload, result)";

/// Failures: three dead `PostToolUse` events, two retrying `Stop` events, one processed after a
/// retry, all with errors; five minutes ago.
pub const FAILURES: &str = "
    INSERT INTO hook_events (id, source, action, resource, resource_id, payload, metadata, processed,
                             retry_count, processing_errors, created_at, processed_at, dead_at, next_attempt_at)
    SELECT gen_random_uuid(), source, action, 'tool', 'Bash', jsonb_build_object('n', n), '{}', processed,
           retry_count, errors, now() - interval '5 minutes' + n * interval '1 millisecond',
           CASE WHEN processed THEN now() END, CASE WHEN dead THEN now() - n * interval '1 second' END,
           CASE WHEN NOT processed AND NOT dead THEN now() + interval '1 hour' - n * interval '1 second' END
    FROM (VALUES
      (1, 'PostToolUse', 'tool_completion', false, true, 3, ARRAY['timeout 1', 'timeout 2', 'connection refused']),
      (2, 'PostToolUse', 'tool_completion', false, true, 3, ARRAY['a', 'b', 'connection refused']),
      (3, 'PostToolUse', 'tool_completion', false, true, 3, ARRAY['a', 'b', 'disk full']),
      (4, 'Stop', 'response_completed', false, false, 1, ARRAY['transient: connection refused']),
      (5, 'Stop', 'response_completed', false, false, 2, ARRAY['x', 'transient']),
      (6, 'Stop', 'response_completed', true, false, 1, ARRAY['once'])
    ) AS t(n, source, action, processed, dead, retry_count, errors)";

/// Inserts the fixtures.
pub async fn seed(db: &TestDb, sql: &[&str]) {
    let client = db.client().await;
    for statement in sql {
        client.batch_execute(statement).await.expect("insert fixtures");
    }
}
