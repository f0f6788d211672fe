//! Webhook endpoint secrets at rest: AES-256-GCM under keys the service provides.
//!
//! Endpoint secrets must be readable by the delivery worker (it signs with them), so they cannot be
//! hashed; without encryption they sit in `oncely.webhook_endpoints` in plain text, and anyone who
//! can read that table — a backup, a replica, a `pg_dump`, a read-only analytics role — can forge
//! webhooks. Install a [`SecretKeys`] key ring in every process that creates endpoints or delivers
//! webhooks, and secrets are stored as `enc:v1:<key id>:<base64 of nonce ‖ ciphertext ‖ tag>`.
//!
//! # Threat model
//!
//! - **Protects against** readers of the database's contents without the key: backups, dumps,
//!   replicas, logs of the table, a role that can `SELECT` but does not run oncely.
//! - **Does not protect against** a process that holds the key (it can decrypt, by design), or a
//!   writer of the table: one can swap two endpoints' ciphertexts, or simply point an endpoint's
//!   URL elsewhere. The ciphertext is bound to its column (the associated data), not to its row.
//! - **Key rotation**: install the new key as current and keep the old one in the ring; reads
//!   decrypt with whichever key a value names, writes use the current key. Then
//!   [`reencrypt_endpoint_secrets`] rewrites every stored secret (plain-text ones too) under the
//!   current key, after which the old key can be dropped.
//!
//! Without a key ring, secrets are stored and read in plain text, as before; a stored encrypted
//! secret then fails to load with a clear error naming the missing key.
//!
//! The ring is process-wide ([`install_secret_keys`]), like a TLS library's default crypto
//! provider: every read and write of an endpoint, wherever it happens, sees the same keys. AES-GCM
//! comes from `ring`, which the stock HTTPS transport already builds.
//!
//! # Example
//!
//! ```
//! use oncely_core::secrets::{install_secret_keys, SecretKeys};
//! // 32 random bytes, e.g. from your secret manager; `k2026` names this key in stored values.
//! let keys = SecretKeys::new("k2026", &[7u8; 32])?;
//! install_secret_keys(keys);
//! # Ok::<(), oncely_core::Error>(())
//! ```

use std::fmt;
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use sqlx::{PgPool, Row};

use crate::error::{Error, Result};

/// The prefix of a webhook secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Shortest secret, in random bytes.
pub const MIN_SECRET_BYTES: usize = 24;
/// Longest secret, in random bytes.
pub const MAX_SECRET_BYTES: usize = 64;

/// A Standard Webhooks signing secret: `whsec_` followed by the base64 of 24 to 64 random bytes.
/// Its `Debug` form hides the key.
///
/// # Example
///
/// ```
/// use oncely_core::secrets::WebhookSecret;
/// let secret = WebhookSecret::generate();
/// assert!(secret.as_str().starts_with("whsec_"));
/// assert_eq!(secret.key().len(), 32);
/// assert!(WebhookSecret::parse("whsec_tooshort").is_err());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret {
    text: String,
    key: Vec<u8>,
}

impl WebhookSecret {
    /// A new secret of 32 random bytes.
    pub fn generate() -> Self {
        let key: [u8; 32] = rand::random();
        let text = format!("{SECRET_PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(key));
        WebhookSecret { text, key: key.to_vec() }
    }

    /// Parse `whsec_<base64>`, checking the key is 24 to 64 bytes.
    pub fn parse(text: &str) -> Result<Self> {
        let b64 = text
            .strip_prefix(SECRET_PREFIX)
            .ok_or_else(|| Error::InvalidInput(format!("a webhook secret starts with `{SECRET_PREFIX}`")))?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| Error::InvalidInput("a webhook secret is `whsec_` and standard base64".into()))?;
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&key.len()) {
            return Err(Error::InvalidInput(format!(
                "a webhook secret holds {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, this one {}",
                key.len()
            )));
        }
        Ok(WebhookSecret { text: text.to_owned(), key })
    }

    /// The secret as given to receivers (`whsec_...`).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The HMAC key: the decoded bytes after the prefix.
    pub fn key(&self) -> &[u8] {
        &self.key
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookSecret(whsec_…{} bytes)", self.key.len())
    }
}

/// The prefix of an encrypted stored secret (followed by the key id, a colon and base64).
pub const ENCRYPTED_PREFIX: &str = "enc:v1:";
/// The environment variable [`SecretKeys::from_env`] reads.
pub const SECRET_KEYS_ENV: &str = "ONCELY_SECRET_KEYS";
/// The associated data of every ciphertext: a value encrypted for another purpose does not decrypt
/// here.
const AAD: &[u8] = b"oncely.webhook_endpoints.secret";

/// A key ring for endpoint secrets at rest: the current key (encrypts) and older keys (decrypt
/// only). Its `Debug` form shows key ids, never keys.
#[derive(Clone)]
pub struct SecretKeys {
    current: String,
    keys: Vec<(String, Arc<LessSafeKey>)>,
}

impl SecretKeys {
    /// A ring whose current key is `key` (exactly 32 bytes: AES-256), named `id` in stored values
    /// (1 to 32 characters: letters, digits, `-` and `_`).
    pub fn new(id: &str, key: &[u8]) -> Result<Self> {
        let mut ring = SecretKeys { current: String::new(), keys: Vec::new() };
        ring.add(id, key)?;
        ring.current = id.to_owned();
        Ok(ring)
    }

    /// Add an older key, used only to decrypt values stored under it.
    pub fn with_old_key(mut self, id: &str, key: &[u8]) -> Result<Self> {
        self.add(id, key)?;
        Ok(self)
    }

    fn add(&mut self, id: &str, key: &[u8]) -> Result<()> {
        let valid_id =
            (1..=32).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid_id {
            return Err(Error::Secret(format!(
                "secret key id `{id}`: 1 to 32 characters of letters, digits, `-` and `_`"
            )));
        }
        if self.keys.iter().any(|(k, _)| k == id) {
            return Err(Error::Secret(format!("secret key id `{id}` given twice")));
        }
        if key.len() != 32 {
            return Err(Error::Secret(format!("secret key `{id}`: AES-256 needs 32 bytes, got {}", key.len())));
        }
        let unbound = UnboundKey::new(&AES_256_GCM, key)
            .map_err(|_| Error::Secret(format!("secret key `{id}` was refused by AES-256-GCM")))?;
        self.keys.push((id.to_owned(), Arc::new(LessSafeKey::new(unbound))));
        Ok(())
    }

    /// Parse `id:base64key[,id:base64key...]`: the first key is current, the rest are older keys.
    /// Keys are standard base64 of 32 bytes (`openssl rand -base64 32`).
    pub fn parse(spec: &str) -> Result<Self> {
        let mut ring: Option<SecretKeys> = None;
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, b64) = part.split_once(':').ok_or_else(|| {
                Error::Secret(format!(
                    "{SECRET_KEYS_ENV}: `id:base64key` expected, got `{id}:…`",
                    id = part.split(':').next().unwrap_or("")
                ))
            })?;
            let key = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| Error::Secret(format!("{SECRET_KEYS_ENV}: key `{id}` is not standard base64")))?;
            ring = Some(match ring {
                None => SecretKeys::new(id, &key)?,
                Some(r) => r.with_old_key(id, &key)?,
            });
        }
        ring.ok_or_else(|| Error::Secret(format!("{SECRET_KEYS_ENV}: no key given")))
    }

    /// The ring in [`SECRET_KEYS_ENV`], or `None` when it is unset or empty.
    pub fn from_env() -> Result<Option<Self>> {
        match std::env::var(SECRET_KEYS_ENV) {
            Ok(spec) if !spec.trim().is_empty() => Self::parse(&spec).map(Some),
            _ => Ok(None),
        }
    }

    /// The id of the key that encrypts.
    pub fn current_id(&self) -> &str {
        &self.current
    }

    fn key(&self, id: &str) -> Option<&LessSafeKey> {
        self.keys.iter().find(|(k, _)| k == id).map(|(_, key)| key.as_ref())
    }

    /// Encrypt a secret's text under the current key, with a fresh random nonce.
    pub fn encrypt(&self, plain: &str) -> String {
        let key = self.key(&self.current).expect("the current key is in the ring");
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut buf = plain.as_bytes().to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce_bytes), Aad::from(AAD), &mut buf)
            .expect("AES-GCM seals any input shorter than 64 GiB");
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&buf);
        format!("{ENCRYPTED_PREFIX}{}:{}", self.current, base64::engine::general_purpose::STANDARD.encode(out))
    }

    /// Decrypt a stored value (`enc:v1:...`); plain-text values are returned as they are.
    pub fn decrypt(&self, stored: &str) -> Result<String> {
        let Some((id, b64)) = split_encrypted(stored)? else { return Ok(stored.to_owned()) };
        let key = self.key(id).ok_or_else(|| missing_key(id))?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| corrupt(id))?;
        if bytes.len() < NONCE_LEN {
            return Err(corrupt(id));
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| corrupt(id))?;
        let mut buf = sealed.to_vec();
        let plain = key.open_in_place(nonce, Aad::from(AAD), &mut buf).map_err(|_| corrupt(id))?;
        String::from_utf8(plain.to_vec()).map_err(|_| corrupt(id))
    }
}

impl fmt::Debug for SecretKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKeys")
            .field("current", &self.current)
            .field("key_ids", &self.keys.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>())
            .finish()
    }
}

/// `Some((key id, base64))` for an encrypted stored value, `None` for plain text.
fn split_encrypted(stored: &str) -> Result<Option<(&str, &str)>> {
    let Some(rest) = stored.strip_prefix(ENCRYPTED_PREFIX) else { return Ok(None) };
    let (id, b64) = rest.split_once(':').ok_or_else(|| corrupt("?"))?;
    Ok(Some((id, b64)))
}

fn missing_key(id: &str) -> Error {
    Error::Secret(format!(
        "a webhook endpoint secret is encrypted under key `{id}`, which the installed key ring \
         ({SECRET_KEYS_ENV}) does not hold"
    ))
}

fn corrupt(id: &str) -> Error {
    Error::Secret(format!(
        "a webhook endpoint secret stored under key `{id}` does not decrypt: the key is wrong or the \
         stored value was altered"
    ))
}

static KEYS: RwLock<Option<SecretKeys>> = RwLock::new(None);

/// Install the process-wide key ring: from now on endpoint secrets are encrypted when written and
/// decrypted when read. Installing again replaces the ring (a key rotation).
pub fn install_secret_keys(keys: SecretKeys) {
    tracing::info!(current = %keys.current, "webhook secret key ring installed");
    *KEYS.write().unwrap_or_else(|e| e.into_inner()) = Some(keys);
}

/// Remove the process-wide key ring: secrets are written in plain text again, and encrypted ones
/// no longer load.
pub fn uninstall_secret_keys() {
    *KEYS.write().unwrap_or_else(|e| e.into_inner()) = None;
}

/// The installed key ring, if any.
pub fn installed_secret_keys() -> Option<SecretKeys> {
    KEYS.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The stored form of a secret's text: encrypted when a ring is installed.
pub(crate) fn seal(plain: &str) -> String {
    match &*KEYS.read().unwrap_or_else(|e| e.into_inner()) {
        Some(keys) => keys.encrypt(plain),
        None => plain.to_owned(),
    }
}

/// A secret's text from its stored form.
pub(crate) fn open(stored: &str) -> Result<String> {
    match &*KEYS.read().unwrap_or_else(|e| e.into_inner()) {
        Some(keys) => keys.decrypt(stored),
        None => match split_encrypted(stored)? {
            Some((id, _)) => Err(missing_key(id)),
            None => Ok(stored.to_owned()),
        },
    }
}

/// What [`reencrypt_endpoint_secrets`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reencrypted {
    /// Endpoints whose stored secrets were rewritten.
    pub rewritten: u64,
    /// Endpoints already stored under the current key.
    pub unchanged: u64,
}

/// Rewrite every endpoint's stored secrets (current and previous) under the installed ring's
/// current key: plain-text ones are encrypted, ones under older keys re-encrypted. Run it after
/// installing a ring for the first time, or after making a new key current; then the old key can
/// leave the ring. One short transaction per endpoint (its row is locked and re-read), so it can
/// run while workers deliver.
pub async fn reencrypt_endpoint_secrets(pool: &PgPool) -> Result<Reencrypted> {
    let keys = installed_secret_keys()
        .ok_or_else(|| Error::Secret(format!("re-encrypting secrets needs a key ring ({SECRET_KEYS_ENV})")))?;
    let current = format!("{ENCRYPTED_PREFIX}{}:", keys.current);
    let ids: Vec<i64> = crate::pooler::query_scalar("SELECT id FROM oncely.webhook_endpoints ORDER BY id")
        .fetch_all(crate::pooler::db(pool))
        .await?;
    let mut done = Reencrypted::default();
    for id in ids {
        let mut tx = pool.begin().await?;
        let Some(row) = crate::pooler::query(
            "SELECT secret, previous_secret FROM oncely.webhook_endpoints WHERE id = $1 FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        else {
            continue;
        };
        let secret: String = row.try_get("secret")?;
        let previous: Option<String> = row.try_get("previous_secret")?;
        let stale = |v: &str| !v.starts_with(&current);
        if !stale(&secret) && !previous.as_deref().is_some_and(stale) {
            done.unchanged += 1;
            continue;
        }
        let secret = keys.encrypt(&keys.decrypt(&secret)?);
        let previous = previous.map(|p| keys.decrypt(&p).map(|p| keys.encrypt(&p))).transpose()?;
        crate::pooler::query("UPDATE oncely.webhook_endpoints SET secret = $2, previous_secret = $3 WHERE id = $1")
            .bind(id)
            .bind(&secret)
            .bind(&previous)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        done.rewritten += 1;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_and_bad_ones_are_refused() {
        let s = WebhookSecret::generate();
        assert_eq!(WebhookSecret::parse(s.as_str()).unwrap(), s);
        assert!(!format!("{s:?}").contains(&s.as_str()[6..]), "Debug must not show the key");
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; n]);
        assert!(WebhookSecret::parse(&format!("whsec_{}", b64(23))).is_err());
        assert!(WebhookSecret::parse(&format!("whsec_{}", b64(24))).is_ok());
        assert!(WebhookSecret::parse(&format!("whsec_{}", b64(64))).is_ok());
        assert!(WebhookSecret::parse(&format!("whsec_{}", b64(65))).is_err());
        assert!(WebhookSecret::parse(&b64(32)).is_err());
        assert!(WebhookSecret::parse("whsec_not base64!").is_err());
    }

    #[test]
    fn round_trip_rotation_and_tampering() {
        let k1 = SecretKeys::new("k1", &[1u8; 32]).unwrap();
        let sealed = k1.encrypt("whsec_abc");
        assert!(sealed.starts_with("enc:v1:k1:") && !sealed.contains("whsec_abc"));
        assert_ne!(sealed, k1.encrypt("whsec_abc"), "a fresh nonce every time");
        assert_eq!(k1.decrypt(&sealed).unwrap(), "whsec_abc");
        assert_eq!(k1.decrypt("whsec_plain").unwrap(), "whsec_plain", "plain text passes through");

        let k2 = SecretKeys::new("k2", &[2u8; 32]).unwrap().with_old_key("k1", &[1u8; 32]).unwrap();
        assert_eq!(k2.decrypt(&sealed).unwrap(), "whsec_abc", "old keys still decrypt");
        assert!(k2.encrypt("x").starts_with("enc:v1:k2:"), "the current key encrypts");
        let only_k2 = SecretKeys::new("k2", &[2u8; 32]).unwrap();
        assert!(only_k2.decrypt(&sealed).unwrap_err().to_string().contains("does not hold"));

        let wrong = SecretKeys::new("k1", &[9u8; 32]).unwrap();
        assert!(wrong.decrypt(&sealed).unwrap_err().to_string().contains("does not decrypt"));
        let mut bytes = base64::engine::general_purpose::STANDARD.decode(&sealed["enc:v1:k1:".len()..]).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        let tampered = format!("enc:v1:k1:{}", base64::engine::general_purpose::STANDARD.encode(bytes));
        assert!(k1.decrypt(&tampered).is_err(), "a changed byte is refused");
    }

    #[test]
    fn bad_keys_and_specs_are_refused_clearly() {
        assert!(SecretKeys::new("k1", &[1u8; 16]).unwrap_err().to_string().contains("32 bytes"));
        assert!(SecretKeys::new("bad id", &[1u8; 32]).is_err());
        let b64 = base64::engine::general_purpose::STANDARD.encode([3u8; 32]);
        let ring = SecretKeys::parse(&format!("new:{b64}, old:{b64}")).unwrap();
        assert_eq!(ring.current_id(), "new");
        assert!(!format!("{ring:?}").contains(&b64), "Debug shows ids only");
        assert!(SecretKeys::parse("nocolon").is_err());
        assert!(SecretKeys::parse("a:!!!").unwrap_err().to_string().contains("base64"));
        assert!(SecretKeys::parse(&format!("a:{b64},a:{b64}")).unwrap_err().to_string().contains("twice"));
        assert!(SecretKeys::parse(" ").is_err());
    }
}
