//! Webhook endpoint secrets at rest: encrypted under the service's key ring, rotated, and still
//! signing deliveries a receiver verifies. The key ring is process-wide, so this file is its own
//! test binary and runs its scenario as one test.

mod common;

use std::time::Duration;

use common::receiver::{Receiver, Reply};
use common::*;
use oncely::core::outbox::{publish, Event, DEFAULT_DELIVERY_QUEUE};
use oncely::core::secrets::{
    install_secret_keys, reencrypt_endpoint_secrets, uninstall_secret_keys, Reencrypted, SecretKeys,
};
use oncely::core::webhook::{
    create_endpoint, get_endpoint, list_deliveries, rotate_secret, DeliveryFilter, DeliveryState, EndpointId,
    EndpointPolicy, NewEndpoint, WebhookSecret,
};
use oncely_webhooks::signature::verify;
use oncely_webhooks::{DeliveryConfig, HttpTransport, RetrySchedule, WebhookDelivery};
use sqlx::PgPool;

async fn stored(pool: &PgPool, id: EndpointId) -> (String, Option<String>) {
    sqlx::query_as("SELECT secret, previous_secret FROM oncely.webhook_endpoints WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn worker(pool: PgPool) -> oncely::WorkerHandle {
    let config = DeliveryConfig {
        request_timeout: Duration::from_secs(2),
        schedule: RetrySchedule { delays: vec![Duration::from_millis(50)], jitter: 0.0 },
        ..DeliveryConfig::default()
    };
    let delivery = WebhookDelivery::with_transport(config, HttpTransport::new().allow_private_networks());
    builder(pool).register(delivery).queue(DEFAULT_DELIVERY_QUEUE, 4).build().unwrap().start()
}

async fn wait_delivered(pool: &PgPool, n: usize) {
    eventually(Duration::from_secs(30), "every delivery delivered", || async {
        let all = list_deliveries(pool, &DeliveryFilter::default()).await.ok()?;
        (all.len() == n && all.iter().all(|d| d.state == DeliveryState::Delivered)).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_are_encrypted_at_rest_rotated_and_still_sign() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let rx = Receiver::start(|_| Reply::Status(200)).await;
    let local = |name: &str| {
        NewEndpoint::new(rx.url(name), ["*"]).policy(EndpointPolicy::default().allow_private_networks(true))
    };
    let k1 = [1u8; 32];
    let k2 = [2u8; 32];

    // Before any key ring: stored as given (the upgrade path starts here).
    uninstall_secret_keys();
    let plain = create_endpoint(pool, &local("plain")).await.unwrap();
    assert_eq!(stored(pool, plain.id).await.0, plain.secret.as_str());

    // With a ring: stored sealed under its current key, read back whole.
    install_secret_keys(SecretKeys::new("k1", &k1).unwrap());
    let sealed = create_endpoint(pool, &local("sealed")).await.unwrap();
    let (column, _) = stored(pool, sealed.id).await;
    assert!(column.starts_with("enc:v1:k1:"), "{column}");
    assert!(!column.contains(&sealed.secret.as_str()[6..]), "the key is not in the column");
    assert_eq!(get_endpoint(pool, sealed.id).await.unwrap().secret, sealed.secret);
    assert_eq!(get_endpoint(pool, plain.id).await.unwrap().secret, plain.secret, "plain text still reads");

    // Key rotation: k2 current, k1 kept to read; re-encrypt everything, then drop k1.
    install_secret_keys(SecretKeys::new("k2", &k2).unwrap().with_old_key("k1", &k1).unwrap());
    let rotated = WebhookSecret::generate();
    rotate_secret(pool, sealed.id, &rotated, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(reencrypt_endpoint_secrets(pool).await.unwrap(), Reencrypted { rewritten: 2, unchanged: 0 });
    assert_eq!(reencrypt_endpoint_secrets(pool).await.unwrap(), Reencrypted { rewritten: 0, unchanged: 2 });
    for id in [plain.id, sealed.id] {
        let (secret, previous) = stored(pool, id).await;
        assert!(secret.starts_with("enc:v1:k2:"), "{secret}");
        assert!(previous.as_deref().is_none_or(|p| p.starts_with("enc:v1:k2:")), "{previous:?}");
    }
    install_secret_keys(SecretKeys::new("k2", &k2).unwrap());
    let now = get_endpoint(pool, sealed.id).await.unwrap();
    assert_eq!((now.secret.clone(), now.previous_secret.clone()), (rotated.clone(), Some(sealed.secret.clone())));

    // Deliveries are signed with the decrypted secrets: the receiver verifies with what it was given.
    publish(pool, &Event::new("t", &1).unwrap()).await.unwrap();
    let h = worker(db.new_pool(4).await);
    wait_delivered(pool, 2).await;
    h.shutdown().await;
    let hits = rx.hits();
    assert_eq!(hits.len(), 2);
    for hit in &hits {
        let secret = if hit.endpoint == "plain" { &plain.secret } else { &rotated };
        verify(secret, &hit.id, &hit.timestamp, &hit.signature, &hit.body, Duration::from_secs(300))
            .unwrap_or_else(|e| panic!("{}: {e:?}", hit.endpoint));
    }

    // A ring without the key the values name: a clear error, and a delivery records it.
    install_secret_keys(SecretKeys::new("k3", &[3u8; 32]).unwrap());
    let err = get_endpoint(pool, sealed.id).await.unwrap_err();
    assert!(matches!(err, oncely::core::Error::Secret(_)) && err.to_string().contains("`k2`"), "{err}");
    let event = publish(pool, &Event::new("t", &2).unwrap()).await.unwrap();
    let h = worker(db.new_pool(4).await);
    let job =
        list_deliveries(pool, &DeliveryFilter { event: Some(event.id), ..Default::default() }).await.unwrap()[0].job_id;
    let message = eventually(Duration::from_secs(30), "the failure in the job's history", || async {
        oncely::get_job(pool, job).await.ok()?.errors.first().map(|e| e.message.clone())
    })
    .await;
    h.shutdown().await;
    assert!(message.contains("webhook secret at rest") && message.contains("does not hold"), "{message}");
    assert_eq!(rx.hits().len(), 2, "nothing was sent unsigned or mis-signed");

    // No ring at all: encrypted values are refused, not mistaken for plain text.
    uninstall_secret_keys();
    assert!(matches!(get_endpoint(pool, plain.id).await.unwrap_err(), oncely::core::Error::Secret(_)));
}
