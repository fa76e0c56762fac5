//! The routes file's checks: every mistake reported once, with its line; a good file read into
//! the settings it says.

use std::path::Path;
use std::time::Duration;

use hook_sinks::{LoadOptions, Problem, RoutesFile, SinkKind};

fn env(name: &str) -> Option<String> {
    match name {
        "SLACK_SECRET" => Some("whsec_czNjcmV0".into()),
        "NATS_TOKEN" => Some("t0ken".into()),
        "PATH" => Some("/usr/bin:/bin".into()),
        _ => None,
    }
}

fn parse(text: &str) -> Result<RoutesFile, Vec<Problem>> {
    let options = LoadOptions { handler_timeout: Duration::from_secs(30), env: &env };
    RoutesFile::parse(text, Path::new("routes.toml"), Path::new("/"), &options)
        .map_err(|e| e.problems().to_vec())
}

/// Asserts the file fails with exactly these `(line, text in the message)` problems.
fn check_problems(text: &str, expected: &[(usize, &str)]) {
    let problems = parse(text).expect_err("the file should be refused");
    let got: Vec<(usize, &str)> = problems.iter().map(|p| (p.line, p.message.as_str())).collect();
    assert_eq!(got.len(), expected.len(), "problems: {got:#?}");
    for ((line, message), (want_line, want_text)) in got.iter().zip(expected) {
        assert_eq!(line, want_line, "{message}");
        assert!(message.contains(want_text), "{message:?} does not mention {want_text:?}");
    }
}

const GOOD: &str = r#"
# Every sink type, and each precedence level.
[sinks.slack]
type = "webhook"
url = "https://hooks.example.invalid/services/T0/B0"
secret_env = "SLACK_SECRET"
timeout = "5s"
headers = { "X-Team" = "agents" }
body = { text = "{source}/{action} in {session_id}", attempt = "{attempt}" }

[sinks.notify]
type = "command"
argv = ["sh", "-c", "cat >/dev/null"]
timeout = 2
permanent_exit_codes = [65, 78]
max_output = 1024
env = { NOTIFY_CHANNEL = "ops" }

[sinks.bus]
type = "nats"
url = "nats://127.0.0.1:4222"
subject = "hooks.{source}.{action}"
token_env = "NATS_TOKEN"
create_stream = { name = "HOOKS", duplicate_window = "10m" }

[[routes]]
source = "Stop"
action = "response_completed"
sinks = ["slack", "notify"]

[[routes]]
source = "PreToolUse"
action = "*"
sinks = ["bus"]

[[routes]]
source = "*"
action = "*"
sinks = ["bus"]
"#;

#[test]
fn a_good_file_is_read_into_its_settings() {
    let file = parse(GOOD).expect("valid file");
    assert!(file.warnings.is_empty(), "{:?}", file.warnings);
    assert_eq!(file.routes.len(), 3);
    assert_eq!((file.routes[0].source.as_str(), file.routes[0].line), ("Stop", 26));
    let names: Vec<&str> = file.sinks.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["bus", "notify", "slack"]);
    for sink in &file.sinks {
        match &sink.kind {
            SinkKind::Webhook(w) => {
                assert_eq!(w.timeout, Duration::from_secs(5));
                assert_eq!(w.secret.as_ref().unwrap().key(), b"s3cret");
                assert_eq!(w.headers.len(), 1);
                assert!(w.body.is_some());
            }
            SinkKind::Command(c) => {
                assert_eq!(c.argv[0], "sh");
                assert_eq!(c.timeout, Duration::from_secs(2));
                assert_eq!(c.permanent_exit_codes, [65, 78]);
                assert_eq!(c.max_output, 1024);
            }
            SinkKind::Nats(n) => {
                let stream = n.create_stream.as_ref().unwrap();
                assert_eq!(stream.subjects, ["hooks.*.*"]);
                assert_eq!(stream.duplicate_window, Duration::from_secs(600));
                assert_eq!(n.timeout, Duration::from_secs(10));
            }
        }
    }
}

#[test]
fn a_typo_in_a_key_names_the_key_and_its_line() {
    check_problems(
        "[sinks.hook]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:1/\"\ntimeuot = \"5s\"\n\n[[routes]]\nsource = \"*\"\naction = \"*\"\nsinks = [\"hook\"]\n",
        &[(4, "timeuot")],
    );
    // A misspelt table at the top level.
    check_problems(
        "[sinks.hook]\ntype = \"command\"\nargv = [\"true\"]\n\n[[route]]\nsource = \"*\"\naction = \"*\"\nsinks = [\"hook\"]\n",
        &[(1, "no [[routes]]"), (5, "unknown key \"route\"")],
    );
}

#[test]
fn an_unknown_sink_is_named_with_the_defined_ones() {
    check_problems(
        "[sinks.slack]\ntype = \"command\"\nargv = [\"true\"]\n\n[[routes]]\nsource = \"Stop\"\naction = \"*\"\nsinks = [\"slack\", \"slak\"]\n",
        &[(8, "unknown sink \"slak\" (defined: slack)")],
    );
}

#[test]
fn a_missing_secret_is_reported_at_its_key() {
    check_problems(
        "[sinks.hook]\ntype = \"webhook\"\nurl = \"https://x.invalid/\"\nsecret_env = \"NOT_SET_ANYWHERE\"\n\n[[routes]]\nsource = \"*\"\naction = \"*\"\nsinks = [\"hook\"]\n",
        &[(4, "NOT_SET_ANYWHERE (secret_env) is not set")],
    );
    check_problems(
        "[sinks.hook]\ntype = \"webhook\"\nurl = \"https://x.invalid/\"\nsecret_file = \"/nonexistent/secret\"\n\n[[routes]]\nsource = \"*\"\naction = \"*\"\nsinks = [\"hook\"]\n",
        &[(4, "cannot read the secret file /nonexistent/secret")],
    );
    // A secret written into the file itself is refused, with what to write instead.
    check_problems(
        "[sinks.hook]\ntype = \"webhook\"\nurl = \"https://x.invalid/\"\nsecret = \"hunter2\"\n\n[[routes]]\nsource = \"*\"\naction = \"*\"\nsinks = [\"hook\"]\n",
        &[(4, "use secret_env or secret_file instead")],
    );
}

#[test]
fn every_mistake_is_reported_not_only_the_first() {
    let text = r#"[sinks.a]
type = "webhok"

[sinks.b]
type = "command"
argv = ["/no/such/program"]

[sinks.c]
type = "nats"
subject = "hooks.{sorce}"

[sinks.d]
type = "webhook"
url = "ftp://x/"
timeout = "soon"

[sinks.e]
type = "command"
argv = ["true"]
timeout = "60s"

[[routes]]
source = "*"
action = "Stop"
sinks = ["a"]

[[routes]]
source = "X"
action = "*"
sinks = []

[[routes]]
source = "X"
action = "*"
sinks = ["b", "b"]
"#;
    check_problems(
        text,
        &[
            (2, "unknown type \"webhok\""),
            (6, "/no/such/program does not exist"),
            (10, "unknown placeholder {sorce}"),
            (14, "must be http://HOST"),
            (15, "\"soon\" is not a duration"),
            (17, "must be shorter than the handler timeout (30s"),
            (24, "a concrete action needs a concrete source"),
            (30, "names no sink"),
            (32, "defined twice (first on line 27)"),
            (35, "names sink \"b\" twice"),
        ],
    );
}

#[test]
fn syntax_errors_have_lines_too() {
    let problems = parse("[sinks.a]\ntype = \"command\"\nargv = [\"true\"\n").expect_err("bad toml");
    assert!(!problems.is_empty());
    assert!(problems.iter().all(|p| p.line >= 3), "{problems:?}");
}

#[test]
fn an_unused_sink_is_a_warning_not_a_mistake() {
    let file = parse(
        "[sinks.a]\ntype = \"command\"\nargv = [\"true\"]\n\n[sinks.b]\ntype = \"command\"\nargv = [\"true\"]\n\n[[routes]]\nsource = \"*\"\naction = \"*\"\nsinks = [\"a\"]\n",
    )
    .expect("valid");
    assert_eq!(file.warnings.len(), 1);
    assert_eq!(file.warnings[0].line, 5);
    assert!(file.warnings[0].message.contains("\"b\" is used by no route"));
}

const ORDERED: &str = r#"
[sinks.hook]
type = "command"
argv = ["true"]

[[routes]]
source = "PreToolUse"
action = "*"
sinks = ["hook"]
order = "session"

[[routes]]
source = "PreToolUse"
action = "tool_invocation"
sinks = ["hook"]

[[routes]]
source = "Stop"
action = "*"
sinks = ["hook"]
order = "none"
"#;

#[test]
fn order_session_on_a_route_orders_its_events_and_nothing_else() {
    let file = parse(ORDERED).expect("a good file");
    let orders: Vec<Option<bool>> = file.routes.iter().map(|r| r.ordered).collect();
    assert_eq!(orders, [Some(true), None, Some(false)]);
    let order = file.session_order();
    assert!(order.is_on());
    // The most specific route decides, as for handlers: the exact route has no order.
    assert!(order.ordered("PreToolUse", "tool_result"));
    assert!(!order.ordered("PreToolUse", "tool_invocation"));
    assert!(!order.ordered("Stop", "response_completed"));
    assert!(!order.ordered("Notification", "notification"), "no route, no top-level order");
}

#[test]
fn a_top_level_order_is_every_routes_default_and_covers_events_without_a_route() {
    let file = parse(&format!("order = \"session\"\n{ORDERED}")).expect("a good file");
    assert!(file.order_all);
    let order = file.session_order();
    assert!(order.ordered("PreToolUse", "tool_invocation"), "the route without an order");
    assert!(!order.ordered("Stop", "response_completed"), "the route's own order = \"none\"");
    assert!(order.ordered("Notification", "notification"), "no route: the top-level order");
    assert!(!parse(ORDERED.replace("order = \"session\"", "").as_str())
        .expect("good")
        .session_order()
        .is_on());
}

#[test]
fn a_bad_order_value_is_reported_with_its_line() {
    check_problems(
        &ORDERED.replace("order = \"session\"", "order = \"sesion\""),
        &[(10, "route (\"PreToolUse\", \"*\"): unknown order \"sesion\" (one of \"session\" or \"none\")")],
    );
    check_problems(
        &format!("order = \"fifo\"\n{ORDERED}"),
        &[(1, "the top-level order: unknown order \"fifo\" (one of \"session\" or \"none\")")],
    );
    check_problems(&format!("order = 1\n{ORDERED}"), &[(1, "invalid type: integer `1`, expected a string")]);
}
