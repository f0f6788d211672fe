//! Webhook delivery over HTTPS: a local TLS receiver whose certificate (made here with rcgen) is
//! trusted through the transport's extra root gets signed deliveries; receivers whose certificate
//! is not trusted, or names another host, get nothing, and the reason is recorded on the delivery.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use oncely::core::outbox::{publish, Event, DEFAULT_DELIVERY_QUEUE};
use oncely::core::webhook::{create_endpoint, list_deliveries, DeliveryFilter, DeliveryState, NewEndpoint};
use oncely_webhooks::{verify, DeliveryConfig, HttpTransport, RetrySchedule, Transport, WebhookDelivery};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

/// A certificate authority made for one test.
struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    /// A server certificate for `host`, signed by this CA, and its key.
    fn issue(
        &self,
        host: &str,
    ) -> (rustls::pki_types::CertificateDer<'static>, rustls::pki_types::PrivateKeyDer<'static>) {
        let params = CertificateParams::new(vec![host.to_owned()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.der().clone(), rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
    }
}

/// One request as the TLS receiver read it.
#[derive(Debug, Clone)]
struct TlsHit {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl TlsHit {
    fn header(&self, name: &str) -> &str {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).unwrap_or_default()
    }
}

/// A minimal HTTPS receiver on 127.0.0.1 (tokio-rustls): reads one request per connection and
/// answers 204. Returns its port and what it received.
async fn tls_receiver(
    cert: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> (u16, Arc<Mutex<Vec<TlsHit>>>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(Mutex::new(Vec::new()));
    let seen = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                // A handshake the client refuses ends here.
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                let headers: Vec<(String, String)> = head
                    .lines()
                    .skip(1)
                    .filter_map(|l| l.split_once(':').map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned())))
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                seen.lock().unwrap().push(TlsHit { headers, body: buf[head_end..head_end + len].to_vec() });
                let _ =
                    tls.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, hits)
}

#[tokio::test(flavor = "multi_thread")]
async fn https_deliveries_reach_a_receiver_trusted_through_an_added_root_and_fail_clearly_otherwise() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let trusted_ca = TestCa::new("oncely test CA");
    let stranger_ca = TestCa::new("a CA nobody trusts");

    let (good_cert, good_key) = trusted_ca.issue("localhost");
    let (good_port, good_hits) = tls_receiver(good_cert, good_key).await;
    let (untrusted_cert, untrusted_key) = stranger_ca.issue("localhost");
    let (untrusted_port, untrusted_hits) = tls_receiver(untrusted_cert, untrusted_key).await;
    let (wrong_name_cert, wrong_name_key) = trusted_ca.issue("hooks.example.com");
    let (wrong_name_port, wrong_name_hits) = tls_receiver(wrong_name_cert, wrong_name_key).await;

    let transport = HttpTransport::builder()
        .allow_private_networks(true)
        .add_root_certificate_pem(trusted_ca.cert.pem().as_bytes())
        .unwrap()
        .build()
        .unwrap();
    let policy = transport.endpoint_policy();
    let endpoint =
        |port: u16| NewEndpoint::new(format!("https://localhost:{port}/hooks"), ["*"]).policy(policy.clone());
    let good = create_endpoint(pool, &endpoint(good_port)).await.unwrap();
    let untrusted = create_endpoint(pool, &endpoint(untrusted_port)).await.unwrap();
    let wrong_name = create_endpoint(pool, &endpoint(wrong_name_port)).await.unwrap();

    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(publish(pool, &Event::new("invoice.paid", &i).unwrap().max_attempts(2)).await.unwrap());
    }
    let config = DeliveryConfig {
        request_timeout: Duration::from_secs(5),
        schedule: RetrySchedule { delays: vec![Duration::from_millis(20)], jitter: 0.0 },
        ..DeliveryConfig::default()
    };
    let worker = builder(db.new_pool(4).await)
        .register(WebhookDelivery::with_transport(config, transport))
        .queue(DEFAULT_DELIVERY_QUEUE, 4)
        .build()
        .unwrap()
        .start();
    wait_all_finished(pool, Duration::from_secs(60)).await;
    worker.shutdown().await;

    // The trusted receiver got every event once, each signed with its endpoint's secret.
    let hits = good_hits.lock().unwrap().clone();
    assert_eq!(hits.len(), 3, "{hits:?}");
    for hit in &hits {
        let verified = verify(
            &good.secret,
            hit.header("webhook-id"),
            hit.header("webhook-timestamp"),
            hit.header("webhook-signature"),
            &hit.body,
            Duration::from_secs(300),
        );
        assert!(verified.is_ok(), "{verified:?} for {hit:?}");
        assert!(verify(
            &untrusted.secret,
            hit.header("webhook-id"),
            hit.header("webhook-timestamp"),
            hit.header("webhook-signature"),
            &hit.body,
            Duration::from_secs(300)
        )
        .is_err());
    }
    let mut ids: Vec<&str> = hits.iter().map(|h| h.header("webhook-id")).collect();
    ids.sort();
    let mut want: Vec<&str> = sent.iter().map(|e| e.message_id.as_str()).collect();
    want.sort();
    assert_eq!(ids, want);

    // The others received no request (the handshake failed), and each delivery says why.
    assert!(untrusted_hits.lock().unwrap().is_empty() && wrong_name_hits.lock().unwrap().is_empty());
    let all = list_deliveries(pool, &DeliveryFilter { limit: Some(100), ..Default::default() }).await.unwrap();
    for d in &all {
        if d.endpoint_id == good.id {
            assert_eq!((d.state, d.last_status), (DeliveryState::Delivered, Some(204)), "{d:?}");
            continue;
        }
        assert_eq!((d.state, d.attempts, d.last_status), (DeliveryState::Dead, 2, None), "{d:?}");
        let error = d.last_error.as_deref().unwrap_or_default();
        assert!(error.contains("certificate"), "{error}");
        if d.endpoint_id == untrusted.id {
            assert!(error.contains("UnknownIssuer"), "{error}");
        } else {
            assert_eq!(d.endpoint_id, wrong_name.id);
            assert!(error.contains("not valid for name"), "{error}");
        }
    }
    assert_eq!(all.len(), 9);

    // Without the added root, the trusted receiver's certificate is unknown too.
    let plain = HttpTransport::new().allow_private_networks();
    let request = oncely_webhooks::WebhookRequest {
        url: format!("https://localhost:{good_port}/hooks"),
        headers: vec![],
        body: Default::default(),
        timeout: Duration::from_secs(5),
    };
    let err = plain.send(request).await.unwrap_err().to_string();
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert_eq!(good_hits.lock().unwrap().len(), 3);
    // A root that is not a certificate is a typed error.
    assert!(matches!(
        HttpTransport::builder().add_root_certificate_pem(b"not a certificate"),
        Err(oncely_webhooks::TransportError::Config(_))
    ));
}
