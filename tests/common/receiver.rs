//! A local webhook receiver for the delivery scenarios: records every request it gets and answers
//! as the test's policy says (including hanging, to be killed mid-delivery).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Hit {
    /// The path segment after `/hooks/`.
    pub endpoint: String,
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: Bytes,
    /// Unix seconds when it arrived.
    pub arrived_unix: i64,
    pub arrived: Instant,
    /// 1 for the first request with this (endpoint, id), 2 for the next...
    pub nth: usize,
    /// What was answered (0 while hanging).
    pub status: u16,
    /// Requests with this id in flight at this one's arrival, itself included.
    pub in_flight: usize,
}

/// What to answer.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    StatusRetryAfter(u16, String),
    /// Apply the effect, then never answer.
    Hang,
    /// Apply the effect, then answer 200 after a pause.
    SlowOk(Duration),
}

pub type Policy = Arc<dyn Fn(&Hit) -> Reply + Send + Sync>;

#[derive(Default)]
struct Inner {
    hits: Vec<Hit>,
    counts: HashMap<(String, String), usize>,
    in_flight: HashMap<String, usize>,
    /// (endpoint, id) whose effect was applied: the receiver's deduplicated effects.
    effects: Vec<(String, String)>,
}

#[derive(Clone)]
pub struct Receiver {
    inner: Arc<Mutex<Inner>>,
    policy: Policy,
    pub base_url: String,
}

impl Receiver {
    /// Start on 127.0.0.1 with `policy`; runs until the test's runtime ends.
    pub async fn start(policy: impl Fn(&Hit) -> Reply + Send + Sync + 'static) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let r = Receiver { inner: Arc::default(), policy: Arc::new(policy), base_url };
        let app = Router::new().route("/hooks/{endpoint}", post(handle)).with_state(r.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        r
    }

    pub fn url(&self, endpoint: &str) -> String {
        format!("{}/hooks/{endpoint}", self.base_url)
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.inner.lock().unwrap().hits.clone()
    }

    /// Deduplicated effects (endpoint, webhook-id), in the order applied.
    pub fn effects(&self) -> Vec<(String, String)> {
        self.inner.lock().unwrap().effects.clone()
    }
}

async fn handle(State(r): State<Receiver>, Path(endpoint): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let id = h("webhook-id");
    let mut hit = Hit {
        endpoint: endpoint.clone(),
        id: id.clone(),
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
        body,
        arrived_unix: SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64,
        arrived: Instant::now(),
        nth: 0,
        status: 0,
        in_flight: 0,
    };
    {
        let mut inner = r.inner.lock().unwrap();
        let n = inner.counts.entry((endpoint.clone(), id.clone())).or_default();
        *n += 1;
        hit.nth = *n;
        let f = inner.in_flight.entry(format!("{endpoint}/{id}")).or_default();
        *f += 1;
        hit.in_flight = *f;
    }
    let reply = (r.policy)(&hit);
    let apply = |r: &Receiver| {
        let mut inner = r.inner.lock().unwrap();
        let key = (endpoint.clone(), id.clone());
        if !inner.effects.contains(&key) {
            inner.effects.push(key);
        }
    };
    let (status, response) = match reply {
        Reply::Status(s) => {
            if (200..300).contains(&s) {
                apply(&r);
            }
            (s, StatusCode::from_u16(s).unwrap().into_response())
        }
        Reply::StatusRetryAfter(s, ra) => {
            (s, (StatusCode::from_u16(s).unwrap(), [("retry-after", ra)]).into_response())
        }
        Reply::Hang => {
            apply(&r);
            {
                let mut inner = r.inner.lock().unwrap();
                inner.hits.push(hit.clone());
            }
            std::future::pending::<()>().await;
            unreachable!()
        }
        Reply::SlowOk(d) => {
            apply(&r);
            // The receiver's own slowness in answering, not synchronization. If the sender gives up
            // first, the connection closes and this request is never recorded as a hit.
            tokio::time::sleep(d).await;
            (200, StatusCode::OK.into_response())
        }
    };
    hit.status = status;
    let mut inner = r.inner.lock().unwrap();
    *inner.in_flight.get_mut(&format!("{endpoint}/{id}")).unwrap() -= 1;
    inner.hits.push(hit);
    response
}
