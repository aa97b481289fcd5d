//! Reads that wait go out together: JSON batching (`POST /$batch`, up to 20 requests).
//!
//! Single-document reads (a user, a user's mailbox settings) pass through a queue per
//! tenant with a fixed number of slots (`graph.reads_in_flight`). A read that finds a slot
//! free is sent at once, on its own: no latency is added while Graph keeps up. Reads that
//! arrive while every slot is busy wait; whichever caller gets the next free slot takes up to
//! 20 of the waiting reads, oldest first, and sends them as one `$batch`. So batches form
//! exactly when a backlog does, and grow with it.
//!
//! No background task: the callers themselves send (a caller keeps taking slots until its
//! own answer has arrived). If a caller is cancelled while sending, the reads it carried get
//! no answer and their callers queue them again (a read may then be sent twice; reads are
//! idempotent).
//!
//! Each answer in a batch is classified as if it had been a request of its own (the same
//! status mapping as everywhere else); a `Retry-After` in one holds the whole tenant back,
//! as it does for a single request. A batch that fails as a whole fails each of its reads
//! with the same error. Answers are matched to reads by `id`, never by position (Graph
//! returns them in any order).

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::{Semaphore, oneshot};
use url::Url;

use super::{Endpoint, GraphClient, capped, parse_retry_after, read_json, status_error};
use crate::graph::GraphError;

/// Graph's limit of requests in one batch.
pub const MAX_BATCH: usize = 20;

/// What a read gets: the JSON of a 2xx answer, or the error its status means.
type ReadResult = Result<Value, GraphError>;

/// The read queues of all tenants.
#[derive(Debug)]
pub(super) struct ReadQueues {
    slots: usize,
    /// Keyed by lower-cased tenant id.
    tenants: Mutex<HashMap<String, Arc<TenantReads>>>,
}

#[derive(Debug)]
struct TenantReads {
    waiting: Mutex<VecDeque<Pending>>,
    slots: Arc<Semaphore>,
}

#[derive(Debug)]
struct Pending {
    url: Url,
    reply: oneshot::Sender<ReadResult>,
}

impl TenantReads {
    fn push(&self, url: Url) -> oneshot::Receiver<ReadResult> {
        let (reply, answer) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(Pending { url, reply });
        answer
    }

    /// Up to [`MAX_BATCH`] waiting reads, oldest first; reads whose caller has gone away are
    /// dropped, not sent.
    fn take(&self) -> Vec<Pending> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.retain(|p| !p.reply.is_closed());
        let n = waiting.len().min(MAX_BATCH);
        waiting.drain(..n).collect()
    }
}

impl ReadQueues {
    /// `slots`: reads (single or batched) in flight per tenant; at least 1.
    pub(super) fn new(slots: usize) -> Self {
        Self {
            slots: slots.max(1),
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// Take all of the tenant's slots until the permit is dropped (tests: make reads wait).
    #[cfg(test)]
    pub(super) fn hold_slots(&self, tenant_id: &str) -> tokio::sync::OwnedSemaphorePermit {
        let slots = u32::try_from(self.slots).expect("few slots");
        self.tenant(tenant_id)
            .slots
            .clone()
            .try_acquire_many_owned(slots)
            .expect("every slot free")
    }

    /// Reads waiting for a slot.
    #[cfg(test)]
    pub(super) fn waiting(&self, tenant_id: &str) -> usize {
        let tenant = self.tenant(tenant_id);
        let waiting = tenant.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.len()
    }

    fn tenant(&self, tenant_id: &str) -> Arc<TenantReads> {
        let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        tenants
            .entry(tenant_id.to_ascii_lowercase())
            .or_insert_with(|| {
                Arc::new(TenantReads {
                    waiting: Mutex::new(VecDeque::new()),
                    slots: Arc::new(Semaphore::new(self.slots)),
                })
            })
            .clone()
    }
}

/// `POST /$batch` body.
#[derive(Serialize)]
struct BatchRequest<'a> {
    requests: Vec<SubRequest<'a>>,
}

#[derive(Serialize)]
struct SubRequest<'a> {
    id: String,
    method: &'static str,
    url: &'a str,
}

#[derive(Deserialize)]
struct BatchAnswer {
    responses: Vec<SubAnswer>,
}

#[derive(Deserialize)]
struct SubAnswer {
    id: String,
    status: u16,
    #[serde(default)]
    headers: HashMap<String, Value>,
    #[serde(default)]
    body: Value,
}

impl GraphClient {
    /// GET one JSON document through the tenant's read queue (or directly, when batching
    /// is off).
    pub(super) async fn read(&self, queues: &ReadQueues, tenant_id: &str, url: Url) -> ReadResult {
        let tenant = queues.tenant(tenant_id);
        let mut answer = tenant.push(url.clone());
        loop {
            tokio::select! {
                biased;
                got = &mut answer => match got {
                    Ok(result) => return result,
                    // The caller carrying it was cancelled: queue it again.
                    Err(_) => answer = tenant.push(url.clone()),
                },
                slot = tenant.slots.acquire() => {
                    let _slot = slot.expect("the semaphore is never closed");
                    let taken = tenant.take();
                    if taken.is_empty() {
                        // Ours is on its way in another caller's request.
                        drop(_slot);
                        match (&mut answer).await {
                            Ok(result) => return result,
                            Err(_) => answer = tenant.push(url.clone()),
                        }
                        continue;
                    }
                    self.send_reads(tenant_id, taken).await;
                }
            }
        }
    }

    /// Send `taken` (1 to [`MAX_BATCH`] reads): one alone as a plain GET, more as a batch.
    async fn send_reads(&self, tenant_id: &str, mut taken: Vec<Pending>) {
        if taken.len() == 1 {
            let read = taken.remove(0);
            let result = self.get_json(tenant_id, "read", &read.url).await;
            let _ = read.reply.send(result);
            return;
        }
        match self.batch(tenant_id, &taken).await {
            Err(e) => {
                for read in taken {
                    let _ = read.reply.send(Err(e.clone()));
                }
            }
            Ok(mut answers) => {
                for (i, read) in taken.into_iter().enumerate() {
                    let result = match answers.remove(&i.to_string()) {
                        Some(a) => self.sub_result(tenant_id, a),
                        None => Err(GraphError::Server {
                            status: 502,
                            body: "the $batch answer has no response for this request".into(),
                        }),
                    };
                    let _ = read.reply.send(result);
                }
            }
        }
    }

    /// A plain GET of one JSON document.
    pub(super) async fn get_json(
        &self,
        tenant_id: &str,
        op: &'static str,
        url: &Url,
    ) -> ReadResult {
        let resp = self.send(tenant_id, op, |h| h.get(url.clone())).await?;
        read_json(resp).await
    }

    /// `POST /$batch` with the reads, ids `0..n`; the answers by id.
    async fn batch(
        &self,
        tenant_id: &str,
        reads: &[Pending],
    ) -> Result<HashMap<String, SubAnswer>, GraphError> {
        let relative: Vec<String> = reads.iter().map(|r| self.relative(&r.url)).collect();
        let body = BatchRequest {
            requests: relative
                .iter()
                .enumerate()
                .map(|(i, url)| SubRequest {
                    id: i.to_string(),
                    method: "GET",
                    url,
                })
                .collect(),
        };
        let url = Self::url_with(&self.api_url, &["$batch"]);
        let resp = self
            .send(tenant_id, "batch", |h| h.post(url.clone()).json(&body))
            .await?;
        let answer: BatchAnswer = read_json(resp).await?;
        tracing::debug!(
            tenant = tenant_id,
            reads = reads.len(),
            "graph reads sent as one $batch"
        );
        Ok(answer
            .responses
            .into_iter()
            .map(|a| (a.id.clone(), a))
            .collect())
    }

    /// One answer of a batch, classified as a request of its own would be.
    fn sub_result(&self, tenant_id: &str, a: SubAnswer) -> ReadResult {
        if (200..300).contains(&a.status) {
            return Ok(a.body);
        }
        // The answer's headers read as an HTTP answer's would (`Retry-After` as seconds or
        // an HTTP-date).
        let headers: reqwest::header::HeaderMap = a
            .headers
            .iter()
            .filter_map(|(name, value)| {
                let value = match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                Some((name.parse().ok()?, value.parse().ok()?))
            })
            .collect();
        let retry_after = parse_retry_after(&headers, Utc::now());
        let body = match &a.body {
            Value::String(s) => capped(s.as_bytes()),
            other => capped(other.to_string().as_bytes()),
        };
        let error = status_error(a.status, retry_after, body, Endpoint::Api);
        if let GraphError::Throttled {
            retry_after: Some(wait),
            ..
        } = &error
        {
            self.throttle(tenant_id, *wait);
        }
        Err(error)
    }

    /// `url` relative to the API base, as a batch names it: `/users/{id}?$select=...`.
    fn relative(&self, url: &Url) -> String {
        let base = self.api_url.path().trim_end_matches('/');
        let path = url.path().strip_prefix(base).unwrap_or(url.path());
        match url.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests;
