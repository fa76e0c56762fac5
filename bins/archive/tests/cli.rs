//! The `hook-archive` binary as cron and operators run it: killed with SIGKILL mid-run, run
//! twice at once, and given bad flags or no database. Every run gets a clean environment (none
//! of the variables the binary reads) and a working directory without a `.env`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hook_store::testing::TestDb;
use hook_store::tokio_postgres::Client;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(60);

/// An empty working directory, so that no `.env` is found.
fn workdir() -> PathBuf {
    // Under cargo's temporary directory for tests (in target/), so that runs leave nothing in /tmp.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("hook-archive-cli");
    std::fs::create_dir_all(&dir).expect("create a working directory");
    dir
}

/// The binary with a clean environment; on `db` when given.
fn archive(db: Option<&TestDb>, args: &[&str]) -> Command {
    let mut command = hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-archive"));
    if let Some(db) = db {
        command.env("DATABASE_URL", db.url());
    }
    command.args(args).current_dir(workdir()).stdin(Stdio::null());
    command
}

fn run(db: Option<&TestDb>, args: &[&str]) -> (i32, String, String) {
    let Output { status, stdout, stderr } = archive(db, args).output().expect("run hook-archive");
    let code = status.code().expect("exited, not killed");
    (code, String::from_utf8_lossy(&stdout).into_owned(), String::from_utf8_lossy(&stderr).into_owned())
}

fn spawn(db: &TestDb, args: &[&str]) -> Child {
    archive(Some(db), args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start hook-archive")
}

/// Inserts `n` events processed `days_ago` days ago.
async fn insert_processed(client: &Client, n: i32, days_ago: i32) {
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, created_at, processed,
                                      processed_at)
             SELECT gen_random_uuid(), 'PostToolUse', 'tool_completion', 'tool', 'Bash',
                    jsonb_build_object('tool_name', 'Bash', 'n', g),
                    now() - $2 * interval '1 day' + g * interval '1 millisecond', TRUE,
                    now() - $2 * interval '1 day' + g * interval '1 millisecond' + interval '1 second'
             FROM generate_series(1, $1) AS g",
            &[&n, &f64::from(days_ago)],
        )
        .await
        .expect("insert processed events");
}

async fn count(client: &Client, query: &str) -> i64 {
    client.query_one(query, &[]).await.expect("count").get(0)
}

async fn ids(client: &Client, query: &str) -> BTreeSet<Uuid> {
    client.query(query, &[]).await.expect("ids").iter().map(|r| r.get(0)).collect()
}

/// The ids in `hook_events` and in `hook_events_archive`, read in one snapshot.
async fn both_tables(client: &Client) -> (BTreeSet<Uuid>, BTreeSet<Uuid>) {
    let rows = client
        .query("SELECT id, FALSE FROM hook_events UNION ALL SELECT id, TRUE FROM hook_events_archive", &[])
        .await
        .expect("ids of both tables");
    let (mut live, mut archived) = (BTreeSet::new(), BTreeSet::new());
    for row in rows {
        let id: Uuid = row.get(0);
        let fresh = if row.get::<_, bool>(1) { archived.insert(id) } else { live.insert(id) };
        assert!(fresh, "{id} twice in one table");
    }
    (live, archived)
}

/// Waits until no other session is connected to the database (a killed client's backend may
/// still be running the statement it was sent).
async fn wait_for_sessions_to_end(client: &Client) {
    let deadline = Instant::now() + PATIENCE;
    let others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                  AND pid <> pg_backend_pid() AND backend_type = 'client backend'";
    while count(client, others).await > 0 {
        assert!(Instant::now() < deadline, "the killed run's session did not end");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls until `query` returns more than zero.
async fn wait_for_some(client: &Client, query: &str) -> i64 {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let n = count(client, query).await;
        if n > 0 {
            return n;
        }
        assert!(Instant::now() < deadline, "{query} stayed 0");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn wait(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().expect("wait for hook-archive") {
            return status;
        }
        assert!(Instant::now() < deadline, "hook-archive did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

const ROWS: i32 = 30_000;

#[tokio::test]
async fn a_run_killed_mid_way_loses_and_duplicates_nothing_and_a_rerun_finishes() {
    let db = TestDb::migrated("archive_cli_sigkill").await;
    let client = db.client().await;
    insert_processed(&client, ROWS, 40).await;
    let all = ids(&client, "SELECT id FROM hook_events").await;

    let mut child = spawn(&db, &["--batch-size", "20"]);
    let seen = wait_for_some(&client, "SELECT count(*) FROM hook_events_archive").await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("SIGKILL hook-archive");
    let status = wait(&mut child);
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));

    // The server may still finish the batch the process had sent: wait for its session to end.
    wait_for_sessions_to_end(&client).await;
    let (live, archived) = both_tables(&client).await;
    assert!(
        archived.len() as i64 >= seen && archived.len() < all.len(),
        "killed mid-way: {} archived",
        archived.len()
    );
    assert!(live.is_disjoint(&archived), "no row in both tables");
    assert_eq!(live.len() + archived.len(), all.len(), "no row lost");
    assert_eq!(archived.len() % 20, 0, "only whole batches committed");

    // The killed session's lock is gone with it: a re-run takes over and finishes.
    let (code, stdout, stderr) = run(Some(&db), &["--batch-size", "1000"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let left = all.len() - archived.len();
    assert!(stdout.starts_with(&format!("hook-archive: moved {left} rows in ")), "{stdout}");
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events").await, 0);
    assert_eq!(ids(&client, "SELECT id FROM hook_events_archive").await, all);
}

#[tokio::test]
async fn a_second_concurrent_run_exits_0_without_moving_anything() {
    let db = TestDb::migrated("archive_cli_concurrent").await;
    let client = db.client().await;
    insert_processed(&client, ROWS, 40).await;

    // A run in progress holds the lock (here: this test's session, so nothing else moves rows).
    let store = db.store(hook_store::StoreOptions { listen: false, ..Default::default() }).await;
    let holder = store.pool().get().await.expect("a connection");
    assert!(hook_store::archive::try_lock(&holder).await.expect("lock"));
    let (code, stdout, stderr) = run(Some(&db), &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("another hook-archive is running") && stdout.contains("nothing done"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events_archive").await, 0, "nothing moved");
    hook_store::archive::unlock(&holder).await.expect("unlock");

    // Two real processes: the second finds the first running.
    let mut first = spawn(&db, &["--batch-size", "20"]);
    wait_for_some(&client, "SELECT count(*) FROM hook_events_archive").await;
    let (code, stdout, stderr) = run(Some(&db), &[]);
    assert!(first.try_wait().expect("poll the first run").is_none(), "the first run was still going");
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("another hook-archive is running"), "{stdout}");
    assert!(wait(&mut first).success());
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events_archive").await, i64::from(ROWS));
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events").await, 0);
}

#[tokio::test]
async fn dry_run_max_duration_stats_and_nothing_to_do() {
    let db = TestDb::migrated("archive_cli_flags").await;
    let client = db.client().await;
    insert_processed(&client, 250, 40).await;
    insert_processed(&client, 10, 2).await;

    let (code, stdout, _) = run(Some(&db), &["--dry-run", "--purge-archive-older-than", "365d"]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("hook-archive: dry run: would move 250 rows (processed before "), "{stdout}");
    assert!(stdout.contains("would purge 0 archived rows"), "{stdout}");
    assert_eq!(
        count(&client, "SELECT count(*) FROM hook_events_archive").await,
        0,
        "a dry run moves nothing"
    );

    let (code, stdout, _) = run(Some(&db), &["--batch-size", "100", "--max-duration", "0s"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.starts_with("hook-archive: moved 100 rows in 1 batch, "), "{stdout}");
    assert!(stdout.contains("stopped at --max-duration, about 150 rows left"), "{stdout}");

    let (code, stdout, _) = run(Some(&db), &["--batch-size", "100", "--stats"]);
    assert_eq!(code, 0, "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("hook-archive: moved 150 rows in 2 batches, "), "{stdout}");
    assert!(lines[1].starts_with("hook-archive: stats: 2 statements, longest "), "{stdout}");

    let (code, stdout, _) = run(Some(&db), &[]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("hook-archive: nothing to archive"), "{stdout}");
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events").await, 10);
}

#[test]
fn bad_usage_exits_2_and_failures_exit_1_with_one_line() {
    let (code, _, stderr) = run(None, &["--older-than", "5x"]);
    assert_eq!(code, 2, "{stderr}");

    let (code, stdout, stderr) = run(None, &[]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.starts_with("hook-archive: error: no database configured"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let mut command = archive(None, &[]);
    command.env("DATABASE_URL", "postgres://hooks:s3cret-pw@127.0.0.1:1/events?connect_timeout=5");
    let output = command.output().expect("run hook-archive");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("hook-archive: error: connecting to postgresql://hooks@127.0.0.1:1/events"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

/// The binary with a clean environment plus `vars`, in an empty working directory.
fn archive_with(vars: &[(String, String)], args: &[&str]) -> Output {
    hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-archive"))
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .args(args)
        .current_dir(workdir())
        .stdin(Stdio::null())
        .output()
        .expect("run hook-archive")
}

/// A common mistake: the variables and flags, the exit status and the text of the one line.
type Mistake = (Vec<(String, String)>, &'static [&'static str], i32, String);

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Each way libpq users give a password reaches a server that demands one (scram-sha-256); a
/// wrong one fails with one line that does not show it.
#[tokio::test]
async fn passwords_are_found_the_way_libpq_finds_them() {
    let cluster = hook_store::testing::PasswordCluster::start("archive").await;
    let role = cluster.role("archiver").await;
    for (way, vars) in role.ways() {
        let output = archive_with(&vars, &["--dry-run"]);
        let (stdout, stderr) =
            (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert_eq!(output.status.code(), Some(0), "{way}: {stderr}");
        assert!(stdout.starts_with("hook-archive: dry run: would move 0 rows"), "{way}: {stdout}{stderr}");
        assert_eq!(stderr, "", "{way}");
    }
    let output = archive_with(&role.wrong("not-the-password"), &["--dry-run"]);
    let (code, line) = hook_store::testing::error_line("hook-archive", &output);
    assert_eq!(code, Some(1), "{line}");
    assert!(line.contains(r#"password authentication failed for user "archiver""#), "{line}");
    assert!(!line.contains("not-the-password") && !line.contains(&role.password), "{line}");
}

/// A bare number is seconds, as for every duration of hook-events: `--older-than 30` moves what
/// was processed more than 30 seconds ago.
#[tokio::test]
async fn a_bare_number_is_seconds_like_everywhere() {
    let db = TestDb::migrated("archive_cli_seconds").await;
    let client = db.client().await;
    for seconds_ago in [10.0_f64, 90.0, 4000.0] {
        client
            .execute(
                "INSERT INTO hook_events (id, source, action, resource, resource_id, created_at, processed,
                                          processed_at)
                 VALUES (gen_random_uuid(), 'Stop', 'response_completed', 'session', 's',
                         now() - ($1::float8 + 1) * interval '1 second', TRUE, now() - $1::float8 * interval '1 second')",
                &[&seconds_ago],
            )
            .await
            .expect("insert a processed event");
    }
    for (older_than, rows) in [("30", 2), ("30s", 2), ("0.5m", 2), ("1h", 1), ("1.5 hours", 0)] {
        let (code, stdout, stderr) = run(Some(&db), &["--dry-run", "--older-than", older_than]);
        assert_eq!(code, 0, "{older_than}: {stderr}");
        assert!(
            stdout.starts_with(&format!("hook-archive: dry run: would move {rows} rows")),
            "{older_than}: {stdout}"
        );
    }
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
            vec![],
            &["--older-than", "5x"],
            2,
            "invalid value '5x' for '--older-than <OLDER_THAN>': \"5x\" is not a duration".into(),
        ),
        (
            vec![],
            &["--max-duration", "soon"],
            2,
            "'--max-duration <DURATION>': \"soon\" is not a duration".into(),
        ),
        (
            vars(&[("DATABASE_URL", "postgres://app:zq@xv@db/events")]),
            &[],
            2,
            "percent-encode @ in the user name or password as %40".into(),
        ),
        (
            vars(&[("POSTGRES_PORT", "abc")]),
            &[],
            2,
            "POSTGRES_PORT=\"abc\": invalid digit found in string".into(),
        ),
        (
            vars(&[("PGHOST", "db"), ("PGSSLMODE", "always")]),
            &[],
            2,
            "PGSSLMODE \"always\" is not one of".into(),
        ),
        (
            vars(&[("DATABASE_URL", &refused_url)]),
            &[],
            1,
            format!("connecting to postgresql://app@127.0.0.1:{refused}/events: Connection refused"),
        ),
        (vars(&[("DATABASE_URL", &nobody)]), &[], 1, r#": FATAL: role "nobody" does not exist"#.into()),
    ];
    for (vars, args, code, expected) in cases {
        let output = archive_with(&vars, args);
        let (got, line) = hook_store::testing::error_line("hook-archive", &output);
        eprintln!("{vars:?} {args:?} -> {got:?} {line}");
        assert_eq!(got, Some(code), "{vars:?} {args:?}: {line}");
        assert!(line.contains(&expected), "{vars:?} {args:?}: {expected:?} missing from: {line}");
        for repeated in ["error connecting to server", "db error"] {
            assert!(!line.contains(repeated), "{line}");
        }
        assert!(!line.contains("zq") && !line.contains("xv"), "{line}");
    }
}
