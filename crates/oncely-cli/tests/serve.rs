//! `oncely serve` as a process: it answers health, readiness, metrics and the dashboard, runs the
//! maintenance services (a job whose lease expired is rescued), and stops on SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use oncely_core::{JobArgs, NewJob};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

#[derive(Serialize, Deserialize)]
struct Ping {}
impl JobArgs for Ping {
    const KIND: &'static str = "ping";
}

/// One HTTP/1.1 GET; the status code and the body.
async fn http_get(addr: &str, path: &str, auth: Option<&str>) -> (u16, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("serve accepts connections");
    let auth = auth.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).await.unwrap();
    let status = raw.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("an HTTP status line");
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_answers_runs_maintenance_and_stops_on_sigterm() {
    let db = oncely_testkit::TestDb::new().await;
    let id = oncely_core::enqueue(db.pool(), NewJob::new(&Ping {}).unwrap()).await.unwrap().id.0;
    // A job claimed by a worker that died: its lease ran out a minute ago.
    sqlx::query(
        "UPDATE oncely.jobs SET state = 'running', attempt = 1, attempted_at = now(), worker_id = 'gone', \
         lease_expires_at = now() - interval '1 minute' WHERE id = $1",
    )
    .bind(id)
    .execute(db.pool())
    .await
    .unwrap();

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncely"))
        .env_remove("RUST_LOG")
        .env("ONCELY_DASHBOARD_TOKEN", "t0ken")
        .args(["--database-url", db.url(), "serve", "--listen", "127.0.0.1:0", "--pool-size", "4"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("oncely serve starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("serve prints its address in time")
        .unwrap()
        .expect("a line");
    let addr = first.trim_start_matches("oncely serve: listening on http://").trim_end_matches('/').to_owned();

    assert_eq!(http_get(&addr, "/healthz", None).await.0, 200);
    assert_eq!(http_get(&addr, "/readyz", None).await, (200, "ready".to_owned()));
    assert_eq!(http_get(&addr, "/", None).await.0, 401, "the token from the environment is required");
    let (status, page) = http_get(&addr, "/", Some("t0ken")).await;
    assert_eq!(status, 200);
    assert!(page.contains("Queues"), "{page}");

    // Maintenance rescues the job.
    oncely_testkit::eventually(Duration::from_secs(30), "serve's maintenance to rescue the job", || async {
        let state: String = sqlx::query_scalar("SELECT state FROM oncely.jobs WHERE id = $1")
            .bind(id)
            .fetch_one(db.pool())
            .await
            .unwrap();
        (state == "available").then_some(())
    })
    .await;
    let (status, metrics) = http_get(&addr, "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("oncely_queue_depth{") && l.contains("state=\"available\"") && l.ends_with(" 1")),
        "{metrics}"
    );

    let pid = child.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("serve stops within 30 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "serve exits cleanly on SIGTERM: {status}");
    // It gave up the maintenance leadership on the way out.
    let leaders: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.leaders WHERE expires_at > now()")
        .fetch_one(db.pool())
        .await
        .unwrap_or(0);
    assert_eq!(leaders, 0);
}

/// `--config FILE`: the file names the database, the address and a token; the environment beats
/// the file (its token is the one required); SIGINT stops it cleanly; an unknown key stops serve
/// with a usage error.
#[tokio::test(flavor = "multi_thread")]
async fn serve_reads_a_configuration_file_under_the_environment_and_refuses_unknown_keys() {
    let db = oncely_testkit::TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("oncely-serve-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("oncely.toml");
    std::fs::write(
        &file,
        format!(
            "database-url = \"{}\"\nlisten = \"127.0.0.1:0\"\ntoken = \"from-file\"\npool-size = 3\nno-maintenance = true\n",
            db.url()
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncely"))
        .env_remove("RUST_LOG")
        .env_remove("DATABASE_URL")
        .env("ONCELY_DASHBOARD_TOKEN", "from-env")
        .args(["serve", "--config"])
        .arg(&file)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("oncely serve starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("serve prints its address in time")
        .unwrap()
        .expect("a line");
    let addr = first.trim_start_matches("oncely serve: listening on http://").trim_end_matches('/').to_owned();
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":8080"), "the file's address: {addr}");
    assert_eq!(http_get(&addr, "/readyz", None).await, (200, "ready".to_owned()), "the file's database");
    assert_eq!(http_get(&addr, "/", Some("from-file")).await.0, 401, "the environment beats the file");
    assert_eq!(http_get(&addr, "/", Some("from-env")).await.0, 200);
    // SIGINT (Ctrl-C) stops it as cleanly as SIGTERM does in the test above.
    let pid = child.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("stops on SIGINT").unwrap();
    assert!(status.success(), "serve exits cleanly on SIGINT: {status}");

    std::fs::write(&file, "listen = \"127.0.0.1:0\"\nread_only = true\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_oncely"))
        .args(["--database-url", db.url(), "serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad configuration file") && stderr.contains("unknown field `read_only`"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every request the test's webhook receiver got: its headers and body.
type Received = std::sync::Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, axum::body::Bytes)>>>;

/// A webhook receiver on a loopback port that answers 204 and records each request; the URL.
async fn start_receiver(received: Received) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let received = received.clone();
            async move {
                received.lock().unwrap().push((headers, body));
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// `oncely serve --webhooks`: the serve process delivers a published event to an endpoint once,
/// signed with the Standard Webhooks headers, and still stops cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread")]
async fn serve_with_webhooks_delivers_a_published_event_once_signed_and_stops_on_sigterm() {
    use oncely_core::outbox::{publish, Event, DELIVERY_KIND};
    use oncely_core::webhook::{create_endpoint, EndpointPolicy, NewEndpoint};
    use oncely_webhooks::signature::{verify_headers, DEFAULT_TOLERANCE};

    let db = oncely_testkit::TestDb::new().await;
    let received = Received::default();
    let url = start_receiver(received.clone()).await;
    let endpoint = create_endpoint(
        db.pool(),
        &NewEndpoint::new(url, ["order.paid"]).policy(EndpointPolicy::default().allow_private_networks(true)),
    )
    .await
    .unwrap();

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncely"))
        .env_remove("RUST_LOG")
        .env_remove("ONCELY_DASHBOARD_TOKEN")
        .args(["--database-url", db.url(), "serve", "--listen", "127.0.0.1:0", "--pool-size", "4"])
        .args(["--webhooks", "--webhook-allow-private-networks", "--webhook-concurrency", "2"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("oncely serve starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("serve prints its address in time")
        .unwrap()
        .expect("a line");
    assert!(first.starts_with("oncely serve: listening on http://"), "{first}");

    let published =
        publish(db.pool(), &Event::new("order.paid", &serde_json::json!({"order": 42})).unwrap()).await.unwrap();
    assert_eq!(published.deliveries, 1);
    let job_completed = || async {
        let state: Option<String> = sqlx::query_scalar("SELECT state::text FROM oncely.jobs WHERE kind = $1")
            .bind(DELIVERY_KIND)
            .fetch_optional(db.pool())
            .await
            .ok()?;
        (state.as_deref() == Some("completed")).then_some(())
    };
    oncely_testkit::eventually(Duration::from_secs(30), "serve delivers the webhook", job_completed).await;

    {
        let hits = received.lock().unwrap();
        assert_eq!(hits.len(), 1, "delivered once: {hits:?}");
        let (headers, body) = &hits[0];
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        assert_eq!(header("webhook-id"), published.message_id);
        assert!(header("webhook-timestamp").parse::<i64>().is_ok(), "{headers:?}");
        assert!(header("webhook-signature").starts_with("v1,"), "{headers:?}");
        assert_eq!(header("content-type"), "application/json");
        verify_headers(&endpoint.secret, headers, body, DEFAULT_TOLERANCE).expect("signed with the endpoint's secret");
        let body: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!((body["type"].as_str(), &body["data"]), (Some("order.paid"), &serde_json::json!({"order": 42})));
    }

    let pid = child.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("serve stops within 30 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "serve with --webhooks exits cleanly on SIGTERM: {status}");
    assert_eq!(received.lock().unwrap().len(), 1, "nothing sent again on the way out");
    let delivered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM oncely.webhook_deliveries WHERE delivered_at IS NOT NULL")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(delivered, 1, "the delivery is recorded as delivered");
}
