//! The `hook-replay` binary as operators run it: a dry run, ids on standard input, and bad input,
//! which must change nothing and exit 2 with one clear line. Every run gets a clean environment
//! (none of the variables the binary reads) and a working directory without a `.env`.

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;

use hook_store::testing::TestDb;
use hook_store::tokio_postgres::Client;
use uuid::Uuid;

fn workdir() -> PathBuf {
    // Under cargo's temporary directory for tests (in target/), so that runs leave nothing in /tmp.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("hook-replay-cli");
    std::fs::create_dir_all(&dir).expect("create a working directory");
    dir
}

/// Runs the binary on `db` (when given) with `stdin` as its input; returns (status, stdout, stderr).
fn replay(db: Option<&TestDb>, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut command = hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-replay"));
    if let Some(db) = db {
        command.env("DATABASE_URL", db.url());
    }
    let mut child = command
        .args(args)
        .current_dir(workdir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hook-replay");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.as_bytes()).expect("write stdin");
    drop(input);
    let output = child.wait_with_output().expect("run hook-replay");
    (
        output.status.code().expect("exited"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Inserts a dead event of `(source, action)`; returns its id.
async fn insert_dead(client: &Client, source: &str, action: &str) -> Uuid {
    let id = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, retry_count, processing_errors,
                                      dead_at)
             VALUES ($1, $2, $3, 'tool', 'Bash', 3, ARRAY['a', 'b', 'c'], now())",
            &[&id, &source, &action],
        )
        .await
        .expect("insert a dead event");
    id
}

async fn snapshot(client: &Client) -> Vec<String> {
    client
        .query("SELECT t::text FROM hook_events AS t ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn dead(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM hook_events WHERE dead_at IS NOT NULL", &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test]
async fn a_dry_run_prints_counts_by_kind_and_a_few_ids_and_changes_nothing() {
    let db = TestDb::migrated("replay_cli_dry_run").await;
    let client = db.client().await;
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(insert_dead(&client, "PreToolUse", "tool_invocation").await);
    }
    ids.push(insert_dead(&client, "Stop", "session_stopped").await);
    let before = snapshot(&client).await;

    let (code, stdout, stderr) = replay(Some(&db), &["--dry-run"], "");
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "hook-replay: dry run: 8 events would be re-queued", "{stdout}");
    assert_eq!(lines[1].split_whitespace().collect::<Vec<_>>(), ["7", "PreToolUse/tool_invocation"]);
    assert_eq!(lines[2].split_whitespace().collect::<Vec<_>>(), ["1", "Stop/session_stopped"]);
    assert!(lines[3].trim_start().starts_with("first ids: ") && lines[3].ends_with(", ..."), "{stdout}");
    assert_eq!(lines[3].matches(", ").count(), 5, "five ids and an ellipsis: {stdout}");
    assert_eq!(snapshot(&client).await, before, "a dry run changes nothing");

    let (code, stdout, _) = replay(Some(&db), &["--dry-run", "--source", "Nope"], "");
    assert_eq!(code, 0);
    assert!(stdout.starts_with("hook-replay: dry run: nothing to re-queue"), "{stdout}");
}

#[tokio::test]
async fn ids_from_standard_input_are_replayed_and_bad_ones_refused() {
    let db = TestDb::migrated("replay_cli_stdin").await;
    let client = db.client().await;
    let a = insert_dead(&client, "PreToolUse", "tool_invocation").await;
    let b = insert_dead(&client, "PreToolUse", "tool_invocation").await;
    let c = insert_dead(&client, "Stop", "session_stopped").await;
    let before = snapshot(&client).await;

    let (code, stdout, stderr) = replay(Some(&db), &["--id", "-"], &format!("{a}\nnot-a-uuid\n"));
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("hook-replay: error: --id -: \"not-a-uuid\""), "{stderr}");
    let (code, _, stderr) = replay(Some(&db), &["--id", "nope"], "");
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(snapshot(&client).await, before, "bad input changes nothing");

    let (code, stdout, stderr) =
        replay(Some(&db), &["--id", "-", "--clear-errors"], &format!("{a}\n{b}, {a}\n"));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("hook-replay: re-queued 2 events in 1 batch, "), "{stdout}");
    assert_eq!(dead(&client).await, 1);
    let still_dead: Uuid = client
        .query_one("SELECT id FROM hook_events WHERE dead_at IS NOT NULL", &[])
        .await
        .expect("row")
        .get(0);
    assert_eq!(still_dead, c);

    // The rest, by the default filter; then nothing is left to do.
    let (code, stdout, _) = replay(Some(&db), &[], "");
    assert_eq!(code, 0);
    assert!(stdout.starts_with("hook-replay: re-queued 1 event in 1 batch, "), "{stdout}");
    let (code, stdout, _) = replay(Some(&db), &[], "");
    assert_eq!(code, 0);
    assert!(stdout.starts_with("hook-replay: nothing to re-queue"), "{stdout}");
}

#[test]
fn no_database_is_a_usage_error() {
    let (code, stdout, stderr) = replay(None, &[], "");
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.starts_with("hook-replay: error: no database configured"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let (code, _, _) = replay(None, &["--since", "2025-10-20", "--until", "2025-10-19"], "");
    assert_eq!(code, 2);
}

/// The binary with a clean environment plus `vars`, in an empty working directory.
fn replay_with(vars: &[(String, String)], args: &[&str]) -> std::process::Output {
    hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-replay"))
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .args(args)
        .current_dir(workdir())
        .stdin(Stdio::null())
        .output()
        .expect("run hook-replay")
}

/// A common mistake: the variables and flags, the exit status and the text of the one line.
type Mistake = (Vec<(String, String)>, &'static [&'static str], i32, String);

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Each way libpq users give a password reaches a server that demands one (scram-sha-256); a
/// wrong one fails with one line that says where it came from and does not show it; a password
/// file others may read is ignored with a warning.
#[tokio::test]
async fn passwords_are_found_the_way_libpq_finds_them() {
    let cluster = hook_store::testing::PasswordCluster::start("replay").await;
    let role = cluster.role("replayer").await;
    for (way, vars) in role.ways() {
        let output = replay_with(&vars, &["--dry-run"]);
        let (stdout, stderr) =
            (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert_eq!(output.status.code(), Some(0), "{way}: {stderr}");
        assert!(stdout.contains("dry run: nothing to re-queue"), "{way}: {stdout}{stderr}");
        assert_eq!(stderr, "", "{way}");
    }

    let output = replay_with(&role.wrong("not-the-password"), &["--dry-run"]);
    let (code, line) = hook_store::testing::error_line("hook-replay", &output);
    assert_eq!(code, Some(1), "{line}");
    assert!(line.contains(r#"password authentication failed for user "replayer""#), "{line}");
    assert!(line.contains("(password from PGPASSWORD)"), "{line}");
    assert!(!line.contains("not-the-password") && !line.contains(&role.password), "{line}");

    let open = vars(&[("DATABASE_URL", &role.url()), ("HOME", &role.open_home.display().to_string())]);
    let mut command = hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-replay"));
    command.env_remove("PGPASSFILE");
    let output = command
        .envs(open.iter().map(|(k, v)| (k, v)))
        .arg("--dry-run")
        .current_dir(workdir())
        .output()
        .expect("run hook-replay");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].starts_with("hook-replay: warning: password file ")
            && lines[0].contains("group or world access")
    );
    assert!(lines[1].contains("the server asks for a password and none was given"), "{stderr}");
}

/// The common mistakes, each with the one line it gets and its exit status.
#[tokio::test]
async fn common_mistakes_get_one_line_that_says_what_to_fix() {
    let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let refused_url = format!("postgres://app@127.0.0.1:{refused}/events");
    let mut nobody = hook_store::testing::server().await;
    nobody.user("nobody").dbname("postgres");
    let nobody = hook_store::testing::config_to_url(&nobody);
    let cases: Vec<Mistake> = vec![
        (vec![], &[], 2, "no database configured: set DATABASE_URL".into()),
        (
            vars(&[("DATABASE_URL", "postgres://app:zq@xv@db/events")]),
            &[],
            2,
            "percent-encode @ in the user name or password as %40".into(),
        ),
        (
            vars(&[("DATABASE_URL", "postgres://app@db:notaport/events")]),
            &[],
            2,
            "the port is not a number".into(),
        ),
        (
            vars(&[("DATABASE_URL", "mysql://app@db/events")]),
            &[],
            2,
            "must start with postgres:// or postgresql://, not mysql://".into(),
        ),
        (
            vars(&[("POSTGRES_PORT", "abc")]),
            &[],
            2,
            "POSTGRES_PORT=\"abc\": invalid digit found in string".into(),
        ),
        (vars(&[("PGHOST", "db"), ("PGPORT", "abc")]), &[], 2, "PGPORT \"abc\" is not a port number".into()),
        (vars(&[("LOG_LEVEL", "loud")]), &[], 2, "LOG_LEVEL: \"loud\" is not a level".into()),
        (vec![], &["--since", "soon"], 2, "\"soon\" is not a time".into()),
        (vec![], &["--bogus"], 2, "unexpected argument '--bogus' found (see --help)".into()),
        (
            vars(&[("DATABASE_URL", &refused_url)]),
            &[],
            1,
            format!("connecting to postgresql://app@127.0.0.1:{refused}/events: Connection refused"),
        ),
        (vars(&[("DATABASE_URL", &nobody)]), &[], 1, r#": FATAL: role "nobody" does not exist"#.into()),
    ];
    for (vars, args, code, expected) in cases {
        let output = replay_with(&vars, args);
        let (got, line) = hook_store::testing::error_line("hook-replay", &output);
        eprintln!("{vars:?} {args:?} -> {got:?} {line}");
        assert_eq!(got, Some(code), "{vars:?} {args:?}: {line}");
        assert!(line.contains(&expected), "{vars:?} {args:?}: {expected:?} missing from: {line}");
        for repeated in ["error connecting to server", "db error", "database error: database error"] {
            assert!(!line.contains(repeated), "{line}");
        }
        assert!(!line.contains("zq") && !line.contains("xv"), "{line}");
    }
}
