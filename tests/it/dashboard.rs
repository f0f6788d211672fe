//! The dashboard: its pages and actions over HTTP (auth, CSRF, read-only, keyset pagination,
//! escaping), and the dead letter driven in a real headless Chromium over WebDriver.

use std::time::Duration;

use crate::common::*;
use axum::body::Body;
use http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use oncely::dashboard::Dashboard;
use oncely::{enqueue, handler_fn, JobArgs, NewJob, Outcome};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tower::ServiceExt;

#[derive(Debug, Serialize, Deserialize)]
struct Report {
    report_id: i64,
    note: String,
}
impl JobArgs for Report {
    const KIND: &'static str = "report";
}

/// Run reports that take one step and then fail for good: they land in the dead letter with an
/// error and a completed step record each.
async fn dead_reports(pool: &PgPool, ids: &[i64]) -> Vec<i64> {
    let mut jobs = Vec::new();
    for id in ids {
        let job = NewJob::new(&Report { report_id: *id, note: format!("<b>report {id}</b>") }).unwrap().max_attempts(1);
        jobs.push(enqueue(pool, job).await.unwrap().id.0);
    }
    let builder = builder(pool.clone()).register(handler_fn(|ctx, r: Report| async move {
        ctx.step("generate").run(|| async move { Ok::<_, std::io::Error>(r.report_id * 10) }).await?;
        Err::<(), _>(Outcome::fail("the model refused the report"))
    }));
    oncely::testkit::run_until_idle(pool, builder.queue("default", 2), Duration::from_secs(30)).await;
    jobs
}

async fn state(pool: &PgPool, id: i64) -> String {
    sqlx::query_scalar("SELECT state FROM oncely.jobs WHERE id = $1").bind(id).fetch_one(pool).await.unwrap()
}

struct Reply {
    status: StatusCode,
    body: String,
    headers: http::HeaderMap,
}

async fn call(app: &axum::Router, req: Request<Body>) -> Reply {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    Reply { status, body, headers }
}

async fn get(app: &axum::Router, uri: &str) -> Reply {
    call(app, Request::get(uri).body(Body::empty()).unwrap()).await
}

async fn post(app: &axum::Router, uri: &str, form: &str) -> Reply {
    let req = Request::post(uri)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form.to_owned()))
        .unwrap();
    call(app, req).await
}

/// The CSRF token embedded in a page's forms.
fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("the page has a CSRF field") + 19;
    page[at..at + 64].to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_action_without_the_csrf_token_is_refused() {
    init_tracing();
    let db = TestDb::new().await;
    let ids = dead_reports(db.pool(), &[1, 2, 3]).await;
    let app = Dashboard::new(db.pool().clone()).router();

    let page = get(&app, "/dead").await;
    assert_eq!(page.status, StatusCode::OK);
    for id in &ids {
        assert!(page.body.contains(&format!("id=\"job-{id}\"")), "job {id} is in the dead letter");
    }
    let no_token = post(&app, "/dead/action", &format!("action=retry&id={}", ids[0])).await;
    assert_eq!(no_token.status, StatusCode::FORBIDDEN);
    let wrong = post(&app, "/dead/action", &format!("csrf={}&action=retry&id={}", "0".repeat(64), ids[0])).await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    assert_eq!(state(db.pool(), ids[0]).await, "dead", "a refused action changed nothing");

    // With the page's token: bulk retry of two, cancel of the third, then delete it.
    let csrf = csrf_of(&page.body);
    let ok = post(&app, "/dead/action", &format!("csrf={csrf}&action=retry&id={}&id={}", ids[0], ids[1])).await;
    assert_eq!(ok.status, StatusCode::SEE_OTHER, "{}", ok.body);
    assert_eq!(state(db.pool(), ids[0]).await, "available");
    assert_eq!(state(db.pool(), ids[1]).await, "available");
    post(&app, "/dead/action", &format!("csrf={csrf}&action=cancel&id={}", ids[2])).await;
    assert_eq!(state(db.pool(), ids[2]).await, "cancelled");
    post(&app, "/dead/action", &format!("csrf={csrf}&action=delete&id={}", ids[2])).await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.jobs WHERE id = $1")
        .bind(ids[2])
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(left, 0, "the dismissed job was deleted");
    // A job's page action needs the token as well.
    let refused = post(&app, &format!("/jobs/{}/action", ids[0]), "action=cancel").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let forged =
        post(&app, &format!("/jobs/{}/action", ids[0]), &format!("csrf={}&action=cancel", "0".repeat(64))).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN, "a forged token is refused on a job's page");
    assert_eq!(state(db.pool(), ids[0]).await, "available");
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_hides_actions_and_refuses_them() {
    let db = TestDb::new().await;
    let ids = dead_reports(db.pool(), &[1]).await;
    let app = Dashboard::new(db.pool().clone()).read_only(true).router();
    let page = get(&app, "/dead").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains(&format!("id=\"job-{}\"", ids[0])));
    assert!(!page.body.contains("name=\"csrf\""), "no action form in read-only mode");
    // Even with the token a read-write dashboard would embed, nothing is done.
    let res = post(&app, "/dead/action", &format!("csrf={}&action=retry&id={}", "0".repeat(64), ids[0])).await;
    assert_eq!(res.status, StatusCode::FORBIDDEN);
    assert_eq!(state(db.pool(), ids[0]).await, "dead");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_guards_the_pages_but_not_health() {
    let db = TestDb::new().await;
    let app = Dashboard::new(db.pool().clone()).token("s3cret-token").router();
    assert_eq!(get(&app, "/").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(get(&app, "/healthz").await.status, StatusCode::OK);
    assert_eq!(get(&app, "/readyz").await.status, StatusCode::OK);
    let bearer = Request::get("/").header(header::AUTHORIZATION, "Bearer s3cret-token").body(Body::empty()).unwrap();
    assert_eq!(call(&app, bearer).await.status, StatusCode::OK);
    let wrong = Request::get("/").header(header::AUTHORIZATION, "Bearer s3cret-tokem").body(Body::empty()).unwrap();
    assert_eq!(call(&app, wrong).await.status, StatusCode::UNAUTHORIZED);
    // The login form sets a cookie that lets the browser in.
    assert_eq!(post(&app, "/login", "token=nope").await.status, StatusCode::UNAUTHORIZED);
    let login = post(&app, "/login", "token=s3cret-token").await;
    let cookie = login.headers[header::SET_COOKIE].to_str().unwrap().split(';').next().unwrap().to_owned();
    assert!(login.headers[header::SET_COOKIE].to_str().unwrap().contains("HttpOnly"));
    let with_cookie = Request::get("/jobs").header(header::COOKIE, cookie).body(Body::empty()).unwrap();
    assert_eq!(call(&app, with_cookie).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_needs_the_migrations() {
    let db = TestDb::new().await;
    sqlx::query("DELETE FROM oncely._migrations WHERE version = (SELECT max(version) FROM oncely._migrations)")
        .execute(db.pool())
        .await
        .unwrap();
    let app = Dashboard::new(db.pool().clone()).router();
    let res = get(&app, "/readyz").await;
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.body.contains("not migrated"), "{}", res.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_jobs_list_pages_by_keyset_and_filters() {
    let db = TestDb::new().await;
    let jobs: Vec<NewJob> = (0..120)
        .map(|i| {
            NewJob::new(&Report { report_id: i, note: if i % 3 == 0 { "vip".into() } else { "plain".into() } }).unwrap()
        })
        .collect();
    oncely::enqueue_many(db.pool(), &jobs).await.unwrap();
    let app = Dashboard::new(db.pool().clone()).router();
    let mut seen = std::collections::HashSet::new();
    let mut uri = "/jobs?state=available".to_owned();
    let mut pages = 0;
    loop {
        let page = get(&app, &uri).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        pages += 1;
        for row in page.body.split("id=\"job-").skip(1) {
            let id: i64 = row[..row.find('"').unwrap()].parse().unwrap();
            assert!(seen.insert(id), "job {id} shown twice");
        }
        match page.body.find("id=\"next\" href=\"") {
            Some(at) => {
                let rest = &page.body[at + 16..];
                uri = format!("/jobs{}", rest[..rest.find('"').unwrap()].replace("&amp;", "&"));
                assert!(uri.contains("after="), "{uri}");
            }
            None => break,
        }
    }
    assert_eq!((seen.len(), pages), (120, 3));
    // Text in the arguments.
    let vip = get(&app, "/jobs?q=vip").await;
    assert_eq!(vip.body.matches("id=\"job-").count(), 40);
    assert_eq!(get(&app, "/jobs?state=bogus").await.status, StatusCode::INTERNAL_SERVER_ERROR);
}

/// Mounted in another service's router under a prefix, as docs/operations.md shows: the pages,
/// their relative links, an action's redirect, the auth hook and health all work there, next to
/// the service's own routes.
#[tokio::test(flavor = "multi_thread")]
async fn the_router_mounts_under_a_prefix_with_an_auth_hook() {
    let db = TestDb::new().await;
    let ids = dead_reports(db.pool(), &[4]).await;
    let hook: oncely::dashboard::AuthHook =
        std::sync::Arc::new(|parts: &http::request::Parts| parts.headers.get("x-admin").is_some_and(|v| v == "yes"));
    let ops = Dashboard::new(db.pool().clone()).auth_hook(hook).router();
    // Nested at `/ops/` (axum then matches `/ops/`, not `/ops`, so the relative links resolve), and
    // `/ops` sends the browser there.
    let app = axum::Router::new()
        .route("/api", axum::routing::get(|| async { "the service's own route" }))
        .route("/ops", axum::routing::get(|| async { axum::response::Redirect::permanent("/ops/") }))
        .nest("/ops/", ops);
    let admin = |method: &str, uri: &str, form: Option<String>| {
        let builder = Request::builder().method(method).uri(uri).header("x-admin", "yes");
        match form {
            Some(f) => builder.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(Body::from(f)),
            None => builder.body(Body::empty()),
        }
        .unwrap()
    };
    assert_eq!(get(&app, "/api").await.body, "the service's own route");
    let to_root = get(&app, "/ops").await;
    assert_eq!(to_root.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(to_root.headers[header::LOCATION], "/ops/");
    assert_eq!(get(&app, "/ops/").await.status, StatusCode::UNAUTHORIZED, "the hook says no without the header");
    assert_eq!(get(&app, "/ops/healthz").await.status, StatusCode::OK, "health stays open");

    let root = call(&app, admin("GET", "/ops/", None)).await;
    assert_eq!(root.status, StatusCode::OK);
    // At `/ops/`, `./dead` is `/ops/dead` (the template escapes the slash).
    assert!(root.body.contains(r#"href=".&#x2f;dead""#), "{}", root.body);
    let dead = call(&app, admin("GET", "/ops/dead", None)).await;
    assert_eq!(dead.status, StatusCode::OK);
    assert!(dead.body.contains(&format!("id=\"job-{}\"", ids[0])));
    // At `/ops/jobs/ID`, `../dead` is `/ops/dead`; the page is there.
    let job = call(&app, admin("GET", &format!("/ops/jobs/{}", ids[0]), None)).await;
    assert_eq!(job.status, StatusCode::OK);
    assert!(job.body.contains(r#"href="..&#x2f;dead""#), "{}", job.body);
    // An action: from `/ops/dead/action`, the redirect `../dead` is `/ops/dead`.
    let form = format!("csrf={}&action=retry&id={}", csrf_of(&dead.body), ids[0]);
    let done = call(&app, admin("POST", "/ops/dead/action", Some(form))).await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    assert_eq!(done.headers[header::LOCATION], "../dead");
    assert_eq!(state(db.pool(), ids[0]).await, "available");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_page_shows_arguments_errors_and_steps_escaped() {
    let db = TestDb::new().await;
    let ids = dead_reports(db.pool(), &[7]).await;
    let app = Dashboard::new(db.pool().clone()).router();
    let page = get(&app, &format!("/jobs/{}", ids[0])).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("the model refused the report"), "the error history is shown");
    assert!(page.body.contains(&format!("job:{}:generate", ids[0])), "the step timeline is shown");
    assert!(page.body.contains("&lt;b&gt;report 7"), "arguments are escaped");
    assert!(!page.body.contains("<b>report"));
    assert_eq!(get(&app, "/jobs/999999").await.status, StatusCode::NOT_FOUND);
    assert!(page.body.contains(r#"<td colspan="3" id="traceparent">-</td>"#), "no trace stored, none shown");
    // A job enqueued with a traceparent shows its trace id, to look the trace up.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced = NewJob::new(&Report { report_id: 8, note: String::new() }).unwrap().traceparent(tp.parse().unwrap());
    let id = enqueue(db.pool(), traced).await.unwrap().id;
    let page = get(&app, &format!("/jobs/{id}")).await;
    assert!(page.body.contains("trace 4bf92f3577b34da6a3ce929d0e0e4736"), "the trace id is shown");
    assert!(page.body.contains(&format!("<code>{tp}</code>")));
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_pages_never_show_secrets_and_stored_responses_only_when_asked() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let ep = oncely::webhook::create_endpoint(
        pool,
        &oncely::webhook::NewEndpoint::new("https://billing.example/hooks", ["invoice.paid"])
            .secret(oncely::webhook::WebhookSecret::parse(secret).unwrap()),
    )
    .await
    .unwrap();
    let app = Dashboard::new(pool.clone()).router();
    let page = get(&app, "/webhooks").await;
    assert!(page.body.contains("billing.example"), "{}", page.body);
    assert!(!page.body.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), "the secret is not shown");
    // Disable, then enable, by form.
    let csrf = csrf_of(&page.body);
    let res = post(&app, "/webhooks/action", &format!("csrf={csrf}&action=disable&endpoint={}", ep.id.0)).await;
    assert_eq!(res.status, StatusCode::SEE_OTHER, "{}", res.body);
    let enabled = || async {
        sqlx::query_scalar::<_, bool>("SELECT enabled FROM oncely.webhook_endpoints WHERE id = $1")
            .bind(ep.id.0)
            .fetch_one(pool)
            .await
            .unwrap()
    };
    assert!(!enabled().await);
    post(&app, "/webhooks/action", &format!("csrf={csrf}&action=enable&endpoint={}", ep.id.0)).await;
    assert!(enabled().await);
    // Redeliver, by form: an event whose delivery job died gets a new job.
    let event =
        oncely::outbox::publish(pool, &oncely::outbox::Event::new("invoice.paid", &serde_json::json!({})).unwrap())
            .await
            .unwrap()
            .id;
    let delivery_job = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT job_id FROM oncely.webhook_deliveries WHERE endpoint_id = $1 AND event_id = $2",
        )
        .bind(ep.id.0)
        .bind(event.0)
        .fetch_one(pool)
        .await
        .unwrap()
    };
    let first = delivery_job().await;
    sqlx::query("UPDATE oncely.jobs SET state = 'dead', finished_at = now() WHERE id = $1")
        .bind(first)
        .execute(pool)
        .await
        .unwrap();
    let no_csrf =
        post(&app, "/webhooks/action", &format!("action=redeliver&endpoint={}&event={}", ep.id.0, event.0)).await;
    assert_eq!(no_csrf.status, StatusCode::FORBIDDEN);
    assert_eq!(delivery_job().await, first, "a refused redeliver changed nothing");
    let res =
        post(&app, "/webhooks/action", &format!("csrf={csrf}&action=redeliver&endpoint={}&event={}", ep.id.0, event.0))
            .await;
    assert_eq!(res.status, StatusCode::SEE_OTHER, "{}", res.body);
    let again = delivery_job().await;
    assert_ne!(again, first, "a new delivery job");
    assert_eq!(state(pool, again).await, "available");

    // A stored HTTP response (an idempotency record) is hidden unless the dashboard allows it
    // and the viewer asks.
    let stored: serde_json::Value =
        oncely::core::with_idempotency(pool, "checkout:1", Duration::from_secs(3600), || async {
            Ok::<_, std::io::Error>(serde_json::json!({ "card": "4242-SENSITIVE" }))
        })
        .await
        .unwrap();
    assert_eq!(stored["card"], "4242-SENSITIVE");
    let key: String = sqlx::query_scalar("SELECT key FROM oncely.ledger WHERE namespace = 'idempotency'")
        .fetch_one(pool)
        .await
        .unwrap();
    let uri = format!("/ledger?namespace=idempotency&key={key}");
    assert!(!get(&app, &uri).await.body.contains("SENSITIVE"));
    assert!(!get(&app, &format!("{uri}&output=1")).await.body.contains("SENSITIVE"), "not allowed by the dashboard");
    let allowing = Dashboard::new(pool.clone()).show_idempotency_output(true).router();
    assert!(!get(&allowing, &uri).await.body.contains("SENSITIVE"), "not asked");
    assert!(get(&allowing, &format!("{uri}&output=1")).await.body.contains("SENSITIVE"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parked_step_is_resolved_from_its_record_page() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let record = claim_record(pool, "step", "charge:order:9", Duration::ZERO, None).await;
    // A second claimant took over and died too: the record is parked (previous owner, no lease).
    let opts = oncely::core::ledger::ClaimOptions {
        owner: "job:0:2",
        fingerprint: None,
        lease: Duration::ZERO,
        ttl: None,
        supersedes: None,
        now: None,
        read_first: false,
    };
    oncely::core::ledger::claim(&mut pool.acquire().await.unwrap(), &record, &opts).await.unwrap();
    let app = Dashboard::new(pool.clone()).router();
    let list = get(&app, "/ledger").await;
    assert!(list.body.contains("charge:order:9"), "the parked record is listed: {}", list.body);
    let page = get(&app, "/ledger?namespace=step&key=charge%3Aorder%3A9").await;
    assert!(page.body.contains("Took effect"), "{}", page.body);
    let csrf = csrf_of(&page.body);
    let fields = "namespace=step&key=charge%3Aorder%3A9&resolution=took_effect&output=%7B%22charge%22%3A%22ch_1%22%7D";
    // Without the page's token, or with a forged one, the resolution is refused and changes nothing.
    assert_eq!(post(&app, "/ledger/resolve", fields).await.status, StatusCode::FORBIDDEN);
    let forged = post(&app, "/ledger/resolve", &format!("csrf={}&{fields}", "0".repeat(64))).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let unresolved: String =
        sqlx::query_scalar("SELECT state FROM oncely.ledger WHERE namespace = 'step' AND key = 'charge:order:9'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_ne!(unresolved, "completed", "a refused resolution changed nothing");
    let form = format!("csrf={csrf}&{fields}");
    let res = post(&app, "/ledger/resolve", &form).await;
    assert_eq!(res.status, StatusCode::SEE_OTHER, "{}", res.body);
    let (state, output): (String, serde_json::Value) =
        sqlx::query_as("SELECT state, output FROM oncely.ledger WHERE namespace = 'step' AND key = 'charge:order:9'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), output), ("completed", serde_json::json!({ "charge": "ch_1" })));
}

mod browser {
    //! A real headless Chromium over WebDriver (chromedriver).

    use super::*;
    use fantoccini::{ClientBuilder, Locator};

    /// chromedriver and the browser, from `ONCELY_CHROMEDRIVER` / `ONCELY_CHROMIUM` or the
    /// distribution's paths.
    fn find_browser() -> Option<(String, String)> {
        let first = |env: &str, paths: &[&str]| {
            std::env::var(env)
                .ok()
                .into_iter()
                .chain(paths.iter().map(|p| p.to_string()))
                .find(|p| std::path::Path::new(p).exists())
        };
        let driver = first("ONCELY_CHROMEDRIVER", &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"])?;
        let chrome =
            first("ONCELY_CHROMIUM", &["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"])?;
        Some((driver, chrome))
    }

    /// Serve the router on a free port; returns its base URL.
    async fn serve(app: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/")
    }

    /// chromedriver on a free port and a headless session with it.
    async fn browser() -> Option<(fantoccini::Client, tokio::process::Child)> {
        let Some((driver, chrome)) = find_browser() else {
            eprintln!(
                "\n\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                 !!! SKIPPED: no chromedriver/chromium found; the browser test did not run.      !!!\n\
                 !!! Install them (apt-get install chromium chromium-driver), or set            !!!\n\
                 !!! ONCELY_CHROMEDRIVER and ONCELY_CHROMIUM.                                   !!!\n\
                 !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
            );
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = tokio::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chrome,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"]
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let client = eventually(Duration::from_secs(30), "chromedriver answers and opens a session", || {
            let (caps, url) = (caps.clone(), url.clone());
            async move {
                let connector = hyper_util::client::legacy::connect::HttpConnector::new();
                ClientBuilder::new(connector).capabilities(caps).connect(&url).await.ok()
            }
        })
        .await;
        Some((client, child))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_dead_job_is_retried_by_a_click_in_a_real_browser() {
        init_tracing();
        let Some((client, _driver)) = browser().await else { return };
        let db = TestDb::new().await;
        let ids = dead_reports(db.pool(), &[1, 2]).await;
        let base = serve(Dashboard::new(db.pool().clone()).token("browser-token").router()).await;

        // Log in through the form, then open the dead letter.
        client.goto(&format!("{base}login")).await.unwrap();
        client
            .form(Locator::Css("form"))
            .await
            .unwrap()
            .set_by_name("token", "browser-token")
            .await
            .unwrap()
            .submit()
            .await
            .unwrap();
        // The login's redirect to the queues page must land before the next navigation, or it
        // can land after it and replace the dead letter.
        eventually(Duration::from_secs(20), "the login to land on the queues page", || async {
            let heading = client.find(Locator::Css("h1")).await.ok()?.text().await.ok()?;
            (heading == "Queues").then_some(())
        })
        .await;
        client.goto(&format!("{base}dead")).await.unwrap();
        let heading = client.find(Locator::Css("h1")).await.unwrap().text().await.unwrap();
        assert_eq!(heading, "Dead letter");
        client.find(Locator::Id(&format!("job-{}", ids[0]))).await.unwrap();
        client.find(Locator::Id(&format!("retry-{}", ids[0]))).await.unwrap().click().await.unwrap();
        eventually(Duration::from_secs(20), "the clicked job is available again", || async {
            (state(db.pool(), ids[0]).await == "available").then_some(())
        })
        .await;
        assert_eq!(state(db.pool(), ids[1]).await, "dead", "only the clicked job was retried");
        // Back on the dead letter, only the other job is left.
        let url = client.current_url().await.unwrap();
        assert!(url.path().ends_with("/dead"), "{url}");
        let rows = client.find_all(Locator::Css("tr[id^=job-]")).await.unwrap();
        assert_eq!(rows.len(), 1);

        // The browser sending the form without its CSRF field is refused.
        client
            .execute("document.querySelector('input[name=csrf]').remove(); document.getElementById('bulk-retry').scrollIntoView();", vec![])
            .await
            .unwrap();
        client.find(Locator::Css(&format!("input[name=id][value='{}']", ids[1]))).await.unwrap().click().await.unwrap();
        client.find(Locator::Id("bulk-retry")).await.unwrap().click().await.unwrap();
        let body = eventually(Duration::from_secs(20), "the refusal page", || async {
            let text = client.find(Locator::Css("body")).await.ok()?.text().await.ok()?;
            text.contains("CSRF").then_some(text)
        })
        .await;
        assert!(body.contains("missing or wrong CSRF token"), "{body}");
        assert_eq!(state(db.pool(), ids[1]).await, "dead", "the refused action changed nothing");

        // The job page with its step timeline; saved as docs' screenshot when asked.
        client.goto(&format!("{base}jobs/{}", ids[0])).await.unwrap();
        client.find(Locator::Id("steps")).await.unwrap();
        if let Ok(path) = std::env::var("ONCELY_SCREENSHOT") {
            std::fs::write(path, client.screenshot().await.unwrap()).unwrap();
        }
        client.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_queues_page_shows_pauses_and_the_runs_page_lists_function_runs() {
    use oncely::function::{register_functions, Function};
    use oncely::outbox::{publish, Event};
    use oncely::pause::{pause, PauseTarget};
    let db = TestDb::new().await;
    let pool = db.pool();
    enqueue(pool, NewJob::new(&Report { report_id: 1, note: "n".into() }).unwrap()).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let now = sqlx::query_scalar("SELECT now()").fetch_one(&mut *conn).await.unwrap();
    register_functions(&mut conn, &[Function::new("on-report").on_event("report.requested")], now).await.unwrap();
    drop(conn);
    let event =
        publish(pool, &Event::new("report.requested", &serde_json::json!({"report": 7})).unwrap()).await.unwrap();
    assert_eq!(event.runs, 1);
    pause(pool, &PauseTarget::queue("default"), Some("maintenance <window>")).await.unwrap();
    pause(pool, &PauseTarget::kind("report"), None).await.unwrap();
    let app = Dashboard::new(pool.clone()).router();

    let page = get(&app, "/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("paused: maintenance &lt;window&gt;"), "escaped reason: {}", page.body);
    assert!(
        page.body.contains("id=\"paused-kinds\"") && page.body.contains("<li>report: paused</li>"),
        "{}",
        page.body
    );

    let page = get(&app, "/runs").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("on-report"), "{}", page.body);
    assert!(page.body.contains(&format!("event {} (report.requested)", event.id)), "{}", page.body);
}
