use super::{Backend, BackendError, ErrorKind, FileKind, Result};
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{ObjectStore, PutPayload};
use std::sync::Arc;

/// A repository on object storage (`s3://bucket/prefix`, `az://container/prefix`,
/// `gs://bucket/prefix`) through the `object_store` crate.
///
/// Credentials come from the usual environment variables (`AWS_*`, `AZURE_*`, `GOOGLE_*`;
/// `AZURE_STORAGE_USE_EMULATOR=true` for Azurite). Object stores offer no portable
/// create-if-absent, so a write first asks whether the object exists and compares the bytes if it
/// does. Repository file names are hashes of their content, so two writers racing on one name
/// write the same bytes.
#[derive(Debug)]
pub struct ObjectBackend {
    store: Arc<dyn ObjectStore>,
    /// Signs URLs that read one object without the credentials (the vault's direct reads).
    signer: Arc<dyn Signer>,
    prefix: String,
    url: String,
    runtime: tokio::runtime::Runtime,
}

impl ObjectBackend {
    /// Opens `url`, its credentials from the environment.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, &[])
    }

    /// Opens `url` with `settings` (named as the environment variables are: `AWS_ENDPOINT`,
    /// `AZURE_STORAGE_ACCOUNT_KEY`, …) that win over the environment. A name the store does
    /// not know is refused, naming it.
    pub fn open_with(url: &str, settings: &[(String, String)]) -> Result<Self> {
        let fail = |message: String| BackendError {
            kind: ErrorKind::Unavailable,
            operation: "open",
            path: String::new(),
            location: url.to_string(),
            message,
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| fail("not a URL".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(fail("the URL names no bucket or container".into()));
        }
        // Retries are `RetryBackend`'s, which counts them: the client's own would be silent.
        let no_retries = object_store::RetryConfig { max_retries: 0, ..Default::default() };
        // Each setting is parsed by the store's own builder, which knows its names.
        fn apply<B, K: std::str::FromStr>(
            mut builder: B,
            settings: &[(String, String)],
            with: fn(B, K, &str) -> B,
        ) -> std::result::Result<B, String> {
            for (name, value) in settings {
                let key = name.to_ascii_lowercase().parse::<K>().map_err(|_| format!("unknown setting `{name}`"))?;
                builder = with(builder, key, value);
            }
            Ok(builder)
        }
        fn both<S: ObjectStore + Signer>(store: S) -> (Arc<dyn ObjectStore>, Arc<dyn Signer>) {
            let store = Arc::new(store);
            (store.clone(), store)
        }
        let (store, signer) = match scheme {
            "s3" => both(
                apply(object_store::aws::AmazonS3Builder::from_env(), settings, |b, k, v| b.with_config(k, v))
                    .map_err(fail)?
                    .with_bucket_name(bucket)
                    .with_retry(no_retries)
                    .build()
                    .map_err(|e| fail(e.to_string()))?,
            ),
            "az" | "azure" => both(
                apply(object_store::azure::MicrosoftAzureBuilder::from_env(), settings, |b, k, v| b.with_config(k, v))
                    .map_err(fail)?
                    .with_container_name(bucket)
                    .with_retry(no_retries)
                    .build()
                    .map_err(|e| fail(e.to_string()))?,
            ),
            "gs" => both(
                apply(object_store::gcp::GoogleCloudStorageBuilder::from_env(), settings, |b, k, v| {
                    b.with_config(k, v)
                })
                .map_err(fail)?
                .with_bucket_name(bucket)
                .with_retry(no_retries)
                .build()
                .map_err(|e| fail(e.to_string()))?,
            ),
            other => return Err(fail(format!("unknown scheme `{other}`: use s3://, az:// or gs://"))),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sysstate-object-io")
            .enable_all()
            .build()
            .map_err(|e| fail(e.to_string()))?;
        Ok(ObjectBackend { store, signer, prefix: prefix.trim_matches('/').to_string(), url: url.to_string(), runtime })
    }

    fn object_path(&self, kind: FileKind, name: &str) -> ObjectPath {
        let relative = kind.path(name);
        if self.prefix.is_empty() {
            ObjectPath::from(relative)
        } else {
            ObjectPath::from(format!("{}/{}", self.prefix, relative))
        }
    }

    fn error(&self, operation: &'static str, kind: FileKind, name: &str, error: object_store::Error) -> BackendError {
        use object_store::Error as E;
        let classified = match &error {
            E::NotFound { .. } => ErrorKind::NotFound,
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => ErrorKind::Permission,
            E::Generic { source, .. } => classify_message(&source.to_string()),
            _ => ErrorKind::Permanent,
        };
        BackendError {
            kind: classified,
            operation,
            path: kind.path(name),
            location: self.url.clone(),
            message: error.to_string(),
        }
    }
}

/// The object_store crate folds HTTP failures into `Generic`; tell passing faults and a
/// missing bucket apart by their text. Its retry wrapper prefixes "Error after 10 retries in
/// 3.684037785s, max_retries:10, retry_timeout:180s, source:": numbers and words there are not
/// the failure's, so only the source is read, and a status code only counts as a whole number.
fn classify_message(message: &str) -> ErrorKind {
    let lower = message.to_ascii_lowercase();
    let lower = lower.split_once("source:").map_or(lower.as_str(), |(_, source)| source);
    let status = |code: &str| {
        lower.match_indices(code).any(|(at, _)| {
            let before = lower[..at].chars().next_back();
            let after = lower[at + code.len()..].chars().next();
            let joined = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '.');
            !joined(before) && !joined(after)
        })
    };
    if lower.contains("nosuchbucket")
        || lower.contains("containernotfound")
        || lower.contains("connection refused")
        || lower.contains("dns error")
    {
        ErrorKind::Unavailable
    } else if lower.contains("accessdenied") || lower.contains("authorizationfailure") || status("403") {
        ErrorKind::Permission
    } else if lower.contains("timed out")
        || lower.contains("error sending request")
        || lower.contains("connection reset")
        // A body cut short (a connection closed or reset while it was read).
        || lower.contains("error decoding response body")
        || lower.contains("connection closed before message completed")
        || lower.contains("unexpected eof")
        || status("503")
        || status("500")
    {
        ErrorKind::Transient
    } else {
        ErrorKind::Permanent
    }
}

impl Backend for ObjectBackend {
    fn location(&self) -> String {
        self.url.clone()
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn create(&self) -> Result<()> {
        // Buckets and containers are made by their owner; check that this one answers.
        self.list(FileKind::Config).map(|_| ())
    }

    fn list(&self, kind: FileKind) -> Result<Vec<(String, u64)>> {
        let prefix = match kind {
            FileKind::Config => {
                return match self.runtime.block_on(self.store.head(&self.object_path(kind, "config"))) {
                    Ok(meta) => Ok(vec![("config".into(), meta.size as u64)]),
                    Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
                    Err(e) => Err(self.error("list", kind, "config", e)),
                }
            }
            _ if self.prefix.is_empty() => ObjectPath::from(kind.dir()),
            _ => ObjectPath::from(format!("{}/{}", self.prefix, kind.dir())),
        };
        let listed: Vec<object_store::ObjectMeta> = self
            .runtime
            .block_on(self.store.list(Some(&prefix)).try_collect())
            .map_err(|e| self.error("list", kind, "", e))?;
        let mut out: Vec<(String, u64)> = listed
            .into_iter()
            // The store keeps a name's signs percent-encoded (`~` as `%7E`): listed as written.
            .filter_map(|meta| {
                let name = meta.location.filename()?;
                Some((percent_encoding::percent_decode_str(name).decode_utf8_lossy().into_owned(), meta.size as u64))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
        let path = self.object_path(kind, name);
        self.runtime
            .block_on(async { self.store.get(&path).await?.bytes().await })
            // Without a copy when the body came in one buffer.
            .map(Vec::from)
            .map_err(|e| self.error("read", kind, name, e))
    }

    fn signed_read_url(&self, kind: FileKind, name: &str, valid_for: std::time::Duration) -> Result<Option<String>> {
        let path = self.object_path(kind, name);
        let url = self
            .runtime
            .block_on(self.signer.signed_url(reqwest::Method::GET, &path, valid_for))
            .map_err(|e| self.error("sign", kind, name, e))?;
        Ok(Some(url.to_string()))
    }

    fn read_range(&self, kind: FileKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        super::gather_range(self, kind, name, offset, length)
    }

    fn read_range_streamed(
        &self,
        kind: FileKind,
        name: &str,
        offset: u64,
        length: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<()> {
        if length == 0 {
            return Ok(());
        }
        let path = self.object_path(kind, name);
        let options = object_store::GetOptions {
            range: Some(object_store::GetRange::Bounded(offset as usize..(offset + length) as usize)),
            ..Default::default()
        };
        let given = self
            .runtime
            .block_on(async {
                let mut pieces = self.store.get_opts(&path, options).await?.into_stream();
                let mut given = 0u64;
                while given < length {
                    let Some(piece) = pieces.try_next().await? else { break };
                    super::give(&piece, &mut given, length, sink);
                }
                Ok(given)
            })
            .map_err(|e| self.error("read", kind, name, e))?;
        if given != length {
            return Err(BackendError {
                kind: ErrorKind::Mismatch,
                operation: "read",
                path: kind.path(name),
                location: self.url.clone(),
                message: format!("short read: {given} of {length} bytes at offset {offset}"),
            });
        }
        Ok(())
    }

    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        self.write_shared(kind, name, bytes::Bytes::copy_from_slice(data))
    }

    fn write_shared(&self, kind: FileKind, name: &str, data: bytes::Bytes) -> Result<()> {
        let path = self.object_path(kind, name);
        if kind != FileKind::Lock {
            match self.read(kind, name) {
                Ok(existing) if existing == data => return Ok(()),
                Ok(_) => {
                    return Err(BackendError {
                        kind: ErrorKind::Mismatch,
                        operation: "write",
                        path: kind.path(name),
                        location: self.url.clone(),
                        message: "the object already exists with other bytes".into(),
                    })
                }
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        self.runtime
            .block_on(self.store.put(&path, PutPayload::from(data)))
            .map(|_| ())
            .map_err(|e| self.error("write", kind, name, e))
    }

    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        match self.runtime.block_on(self.store.delete(&self.object_path(kind, name))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("remove", kind, name, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_the_store_does_not_know_is_refused_by_name_and_known_ones_are_taken() {
        let settings = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
        };
        let typo = ObjectBackend::open_with("s3://bucket", &settings(&[("AWS_ACESS_KEY_ID", "x")])).unwrap_err();
        assert!(typo.message.contains("unknown setting `AWS_ACESS_KEY_ID`"), "{typo}");
        let other_store = ObjectBackend::open_with("az://container", &settings(&[("AWS_REGION", "x")])).unwrap_err();
        assert!(other_store.message.contains("`AWS_REGION`"), "{other_store}");
        let known = settings(&[
            ("AWS_ACCESS_KEY_ID", "GK1"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("AWS_ENDPOINT", "http://127.0.0.1:9"),
            ("AWS_REGION", "garage"),
            ("AWS_ALLOW_HTTP", "true"),
        ]);
        ObjectBackend::open_with("s3://bucket", &known).unwrap();
    }

    #[test]
    fn numbers_in_the_retry_prefix_are_not_status_codes() {
        let dead = "Generic S3 error: Error after 10 retries in 3.684037785s, max_retries:10, retry_timeout:180s, \
                    source:error sending request for url (http://127.0.0.1:9/nobody/x/config)";
        assert_eq!(classify_message(dead), ErrorKind::Transient);
        assert_eq!(classify_message("Generic S3 error: Received redirect without LOCATION, this normally indicates an incorrectly configured region: status 403 Forbidden"), ErrorKind::Permission);
        assert_eq!(classify_message("Error after 2 retries in 1.5003s, max_retries:10, retry_timeout:180s, source:HTTP status server error (503 Service Unavailable)"), ErrorKind::Transient);
        assert_eq!(classify_message("source: NoSuchBucket: the bucket does not exist"), ErrorKind::Unavailable);
        // Seen through the fault proxy: a body cut in half.
        assert_eq!(
            classify_message("Generic S3 error: Error after 0 retries in 2.416914ms, max_retries:0, retry_timeout:180s, source:error decoding response body"),
            ErrorKind::Transient
        );
    }
}
